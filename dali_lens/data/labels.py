"""Training on a survey: several data roots, labels joined by id from files (human grades), per-sample loss
weights, and the class ratio a run trains on (issue 24: survey-like imbalance, grades back into training).

* **Data roots.** ``--data-root`` may be given several times (or as a comma list, when the whole text is not
  itself a path); each entry is ``PATH`` or ``NAME=PATH``. The name (default: the folder's basename) is what
  ``--source-weight`` calls it. Every root is discovered on its own (``sources.discover``: any layout); the
  splits of the same name are concatenated, in the order the roots were given. A root without a train split (a
  flat folder of survey cutouts, split ``predict``) joins the train split when label files are given or several
  roots are: its samples train once a label file names them (the others stay unlabelled and are left out).
* **Label files** (``--labels FILE``, repeatable): the grading page's export ``id,grade[,score]`` (grades 2-3:
  lens; 0: non-lens, a hard negative; 1: dropped, or with ``--grade1 weak`` a lens whose loss weight is
  ``--grade1-weight``) or a plain ``id,label`` file (``label`` as in manifests: 1/0, lens/nonlens). Labels join
  by the samples' ``id`` (the file name without its extension) in every split, or by ``ID@split`` (what the
  page exports when an id repeats across splits). Ids not in the data are counted and the first ones named (an
  error when none matches). A label that contradicts the data's own is counted; ``--label-conflict file``
  (default) lets the file win, ``data`` keeps the data's. Grade 1 with ``--grade1 drop`` leaves the sample
  out of training (unlabelled). Each file is recorded with its sha256 (``config.json["label_files"]``).
* **Loss weights.** A sample's weight is the product of its root's ``--source-weight`` and (when a label file
  set its label) that file's (named by its stem), times ``--grade1-weight`` for a weak grade 1. The training
  loss is ``sum_i w_i * p_i * BCE_i / sum_i w_i`` over a batch, with ``p_i`` the ``--pos-weight`` for lenses
  (1 for non-lenses): with every ``w_i`` = 1 exactly torch's ``BCEWithLogitsLoss(pos_weight=p)``.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field

import numpy as np

from .dataset import DataError, Dataset, Sample, parse_label
from .io import open_text

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
#: what the samples of each kind of label carry: lens (1), non-lens (0), or left out (None)
GRADE_LABELS = {0: 0, 2: 1, 3: 1}


# ------------------------------------------------------------------------------------------------ options


def parse_data_roots(value):
    """``--data-root``: one root as the text it was (old runs' config.json, a single --data-root: unchanged), or
    several as a tuple of ``PATH`` / ``NAME=PATH`` entries (a list of texts, or one comma list that is not
    itself an existing path). ValueError for an empty entry."""
    if value is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out: list[str] = []
    while any(isinstance(item, (list, tuple)) for item in items):  # argparse's list of parsed entries
        items = [v for item in items for v in (item if isinstance(item, (list, tuple)) else [item])]
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected a path, got {item!r}")
        if "," in item and not os.path.exists(os.path.expanduser(item)):
            parts = [p.strip() for p in item.split(",")]
        else:
            parts = [item]
        for p in parts:
            if not p.strip() or p.strip().endswith("="):
                raise ValueError(f"empty data root in {item!r}")
            out.append(p)
    return out[0] if len(out) == 1 else tuple(out)


def root_entries(data_root) -> list[tuple[str, str]]:
    """``[(name, path)]`` of ``--data-root``'s value (``parse_data_roots``): ``NAME=PATH`` or the path's
    basename. ValueError when two roots get the same name."""
    roots = data_root if isinstance(data_root, (list, tuple)) else [data_root]
    out = []
    for r in roots:
        name, sep, path = r.partition("=")
        if not sep or not _NAME.match(name) or os.path.exists(os.path.expanduser(r)):
            name, path = os.path.basename(os.path.normpath(os.path.expanduser(r))) or r, r
        out.append((name, path))
    names = [n for n, _ in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--data-root: two roots are called {dup!r}; name them with NAME=PATH")
    return out


def parse_source_weights(value) -> str | None:
    """``--source-weight sim=1,graded=5``: names and non-negative weights, as the normalised text (None: no
    weights). The names are checked against the data roots and label files when the run starts."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value.split(",") if isinstance(value, str) else value
    out = []
    for item in items:
        name, sep, w = str(item).partition("=")
        if not sep or not _NAME.match(name.strip()):
            raise ValueError(f"expected NAME=WEIGHT, got {item!r}")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(f"{name.strip()}: weight {w!r} is not a number") from None
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"{name.strip()}: weight {w!r} is not a finite number >= 0")
        out.append(f"{name.strip()}={weight:g}")
    return ",".join(out)


def source_weights(text: str | None) -> dict[str, float]:
    return {k: float(v) for k, v in (e.split("=") for e in text.split(","))} if text else {}


def parse_pos_weight(value):
    """``--pos-weight``: ``auto`` (the training split's n_non-lens / n_lens) or a positive number; None: 1."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "off")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if isinstance(value, bool):
        raise ValueError("expected auto or a positive number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected auto or a positive number") from None
    if not np.isfinite(v) or v <= 0:
        raise ValueError("expected auto or a positive number")
    return v


def parse_label_files(value) -> tuple[str, ...] | None:
    """``--labels`` (repeatable): a tuple of paths, None when none is given."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else list(value)
    items = [v for item in items for v in (item if isinstance(item, (list, tuple)) else [item])]  # argparse's
    if not all(isinstance(p, str) and p.strip() for p in items):
        raise ValueError("expected file paths")
    return tuple(items) or None


# ---------------------------------------------------------------------------------------------- label files


@dataclass
class LabelFile:
    """One ``--labels`` file: ``labels`` maps an id to ``(label or None, weight)``."""

    path: str
    name: str
    sha256: str
    kind: str  # 'grades' or 'labels'
    labels: dict[str, tuple[int | None, float]] = field(default_factory=dict)
    dropped: int = 0  # grade-1 rows left out (--grade1 drop)

    def record(self) -> dict:
        return {"path": os.path.abspath(self.path), "name": self.name, "sha256": self.sha256, "kind": self.kind,
                "rows": len(self.labels)}


def read_label_file(path: str, grade1: str = "drop", grade1_weight: float = 0.5) -> LabelFile:
    """A grades CSV (``id,grade[,score]``) or an ``id,label`` CSV; DataError naming the file (and line)."""
    if not os.path.isfile(path):
        raise DataError(f"--labels {path}: no such file")
    with open_text(path, newline="") as fh:
        cols = next(csv.reader(fh), None) or []
    cols = [c.strip() for c in cols]
    name = os.path.splitext(os.path.basename(path))[0]
    from .shards import file_sha256

    out = LabelFile(path, name, file_sha256(path), "grades" if "grade" in cols else "labels")
    if out.kind == "grades":
        from ..inspection.candidates import read_grades  # the page's export has one reader

        for ident, (grade, _) in read_grades(path).items():
            if grade == 1:
                if grade1 == "drop":
                    out.labels[ident] = (None, 1.0)
                    out.dropped += 1
                else:
                    out.labels[ident] = (1, float(grade1_weight))
            else:
                out.labels[ident] = (GRADE_LABELS[grade], 1.0)
        return out
    if "id" not in cols or "label" not in cols:
        raise DataError(f"{path}: not a label file (needs columns id,label or the grading page's id,grade[,score]; "
                        f"has {cols})")
    with open_text(path, newline="") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            where = f"{path}, line {lineno}"
            ident = (row.get("id") or "").strip()
            if not ident:
                raise DataError(f"{where}: empty id")
            out.labels[ident] = (parse_label(row.get("label") or "", where), 1.0)
    return out


# -------------------------------------------------------------------------------------------- gathering


@dataclass
class Gathered:
    """The splits of every root with the label files joined, and each training sample's loss weight."""

    splits: dict[str, Dataset]
    weights: dict[tuple[str, ...], float]  # sample.files -> weight (absent: 1)
    label_files: list[LabelFile]
    root: str  # one folder for messages and the data record: the root, or the roots' common folder


def gather(data_root, discover, *, hdus=None, val_fraction: float = 0.15, seed: int = 0, label_paths=(),
           grade1: str = "drop", grade1_weight: float = 0.5, conflict: str = "file", weights_text=None,
           log=print) -> Gathered:
    """Discover every root, concatenate their splits, join the label files, compute the loss weights."""
    from .sources import stratified_split

    entries = root_entries(data_root)
    files = [read_label_file(p, grade1, grade1_weight) for p in (label_paths or ())]
    wanted = source_weights(weights_text)
    known = [n for n, _ in entries] + [f.name for f in files]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise DataError(f"--source-weight: unknown name(s) {', '.join(unknown)}; the data roots and label files "
                        f"are called {', '.join(known)}")
    per_root: list[tuple[str, dict[str, Dataset]]] = []
    for name, path in entries:
        found = discover(path, hdus=hdus, val_fraction=val_fraction, seed=seed)
        if "train" not in found and "predict" in found and (files or len(entries) > 1):
            found = {("train" if k == "predict" else k): v for k, v in found.items()}
            found["train"].split = "train"
        per_root.append((name, found))
    splits = _concatenate(per_root)
    weights: dict[tuple[str, ...], float] = {}
    for name, found in per_root:
        w = wanted.get(name, 1.0)
        if w != 1.0:
            for ds in found.values():
                for s in ds.samples:
                    weights[s.files] = w
    for lf in files:
        splits = _join(splits, lf, conflict, wanted.get(lf.name, 1.0), weights, log)
    if files and "val" not in splits and "train" in splits and val_fraction > 0:
        train = splits["train"]
        labelled = [s for s in train.samples if s.label is not None]
        keep, held = stratified_split(labelled, val_fraction, seed)
        rest = [s for s in train.samples if s.label is None]
        splits["train"] = _like(train, keep + rest, "train")
        splits["val"] = _like(train, held, "val")
    root = entries[0][1] if len(entries) == 1 else os.path.commonpath(
        [os.path.abspath(os.path.expanduser(p)) for _, p in entries])
    return Gathered(splits, weights, files, root)


def _like(ds: Dataset, samples: list[Sample], split: str) -> Dataset:
    return Dataset(samples, ds.bands, ds.kind, ds.root, split, ds.hdus, ds.shape)


def _concatenate(per_root) -> dict[str, Dataset]:
    if len(per_root) == 1:
        return dict(per_root[0][1])
    out: dict[str, Dataset] = {}
    first: dict[str, str] = {}
    for name, found in per_root:
        for split, ds in found.items():
            if split not in out:
                out[split], first[split] = ds, name
                continue
            ref = out[split]
            if ds.kind != ref.kind or ds.bands != ref.bands:
                raise DataError(f"--data-root {name} ({ds.root}): {split} split has {ds.bands} band(s) of {ds.kind} "
                                f"data but root {first[split]} ({ref.root}) has {ref.bands} band(s) of {ref.kind} "
                                "data; mixed roots need one kind and band count")
            shape = ref.shape if ref.shape == ds.shape else None
            out[split] = Dataset(ref.samples + ds.samples, ref.bands, ref.kind, ref.root, split, ref.hdus, shape)
    kinds = {(d.kind, d.bands) for d in out.values()}
    if len(kinds) > 1:
        raise DataError(f"--data-root: the roots hold different kinds or band counts {sorted(kinds)}")
    return out


def _join(splits: dict[str, Dataset], lf: LabelFile, conflict: str, file_weight: float, weights: dict, log):
    by_id: dict[str, list[tuple[str, int]]] = {}
    for split, ds in splits.items():
        for i, s in enumerate(ds.samples):
            by_id.setdefault(s.id, []).append((split, i))
    changes: dict[str, dict[int, Sample]] = {}
    missing, contradicts, matched, counts, several = [], 0, 0, {0: 0, 1: 0, None: 0}, []
    for ident, (label, weight) in lf.labels.items():
        hits = by_id.get(ident)
        if hits is None and "@" in ident:  # the page's ID@split for an id that repeats across splits
            base, _, split = ident.rpartition("@")
            hits = [h for h in by_id.get(base, []) if h[0] == split] or None
        if not hits:
            missing.append(ident)
            continue
        matched += 1
        counts[label] += 1
        if len(hits) > 1:
            several.append(ident)
        for split, i in hits:
            s = changes.get(split, {}).get(i) or splits[split].samples[i]
            if s.label is not None and label is not None and s.label != label:
                contradicts += 1
                if conflict == "data":
                    continue
            changes.setdefault(split, {})[i] = Sample(s.path, label, s.id, s.band_paths, s.meta)
            w = weight * file_weight
            if w != 1.0:
                weights[s.files] = weights.get(s.files, 1.0) * w
    if not matched:
        raise DataError(f"--labels {lf.path}: none of its {len(lf.labels)} id(s) is in the data (first: "
                        f"{', '.join(list(lf.labels)[:3]) or 'none'}); ids are the file names without extension")
    out = dict(splits)
    for split, new in changes.items():
        ds = splits[split]
        out[split] = _like(ds, [new.get(i, s) for i, s in enumerate(ds.samples)], split)
    parts = [f"{matched} id(s) matched ({counts[1]} lens, {counts[0]} non-lens"
             + (f", {lf.dropped} grade-1 left out (--grade1 drop)" if lf.dropped else "")
             + (f", {counts[None] - lf.dropped} unlabelled" if counts[None] > lf.dropped else "") + ")"]
    if missing:
        parts.append(f"{len(missing)} not in the data: {', '.join(missing[:5])}"
                     + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if several:
        parts.append(f"{len(several)} name several samples (all labelled: {', '.join(several[:3])}"
                     + (" ..." if len(several) > 3 else "") + "; ID@split names one split's)")
    if contradicts:
        parts.append(f"{contradicts} contradict the data's own label ("
                     + ("the file's label wins" if conflict == "file" else "the data's label kept")
                     + "; --label-conflict file|data)")
    log(f"{'warning: ' if missing or several else ''}labels {lf.path} (sha256 {lf.sha256[:12]}): " + "; ".join(parts))
    return out


# -------------------------------------------------------------------------------------------- imbalance


def class_counts(train: Dataset) -> tuple[int, int]:
    c = train.counts()
    return c["lens"], c["nonlens"]


def resolve_pos_weight(option, train: Dataset) -> float:
    """``--pos-weight``'s value for this training split: ``auto`` is n_non-lens / n_lens; None is 1."""
    if option is None:
        return 1.0
    if option == "auto":
        pos, neg = class_counts(train)
        return neg / pos if pos else 1.0
    return float(option)


def ratio_text(pos: int, neg: int) -> str:
    if not pos or not neg:
        return f"{pos}:{neg}"
    return f"1:{neg / pos:.3g}" if neg >= pos else f"{pos / neg:.3g}:1"


def class_record(train: Dataset, pos_weight: float, sampler: str) -> dict:
    """What config.json's ``class_ratio`` records: the training split's counts, ratio, pos-weight, sampler."""
    pos, neg = class_counts(train)
    return {"lens": pos, "nonlens": neg, "ratio": ratio_text(pos, neg), "pos_weight": round(float(pos_weight), 6),
            "sampler": sampler}


def class_line(record: dict) -> str:
    """The run log's line, e.g. ``train: class ratio 1:100 (30 lens, 3000 non-lens); pos-weight 100.0``."""
    text = (f"train: class ratio {record['ratio']} ({record['lens']} lens, {record['nonlens']} non-lens); "
            f"pos-weight {record['pos_weight']:.4g}")
    if record["sampler"] == "balanced":
        text += "; sampler balanced (each epoch draws lenses and non-lenses equally)"
    return text


def sample_weights(train: Dataset, weights: dict) -> np.ndarray | None:
    """Per training sample (dataset position) its loss weight, or None when every weight is 1."""
    if not weights:
        return None
    w = np.array([weights.get(s.files, 1.0) for s in train.samples], dtype=np.float32)
    return None if np.all(w == 1.0) else w
