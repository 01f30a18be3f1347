"""Find the samples of a dataset on disk and describe them as :class:`Dataset` splits.

Supported layouts (checked in this order):

1. CSV manifests ``train.csv`` / ``val.csv`` / ``test.csv`` with columns ``filepath,label`` (paths relative to
   the data root; extra columns become per-sample catalogue metadata, numbers or text) — the mechine_lensing layout.
2. Split folders ``train/``, ``val/``, ``test/`` each holding class folders ``lens/`` and ``nonlens/``.
3. Class folders ``lens/`` and ``nonlens/`` directly under the root (one ``train`` split).
4. Files directly under the root, or a single CSV file: unlabelled samples (split ``predict``).

A folder holding a packed set's ``manifest.json`` (``python -m dali_lens.pack``) gives its splits as datasets of
kind ``'shards'`` (see ``data/shards.py``).

Files may be PNG/JPEG, ``.npy`` (bands, H, W) or FITS (one band per HDU, or one 3-D HDU). If there is no
``val`` split, a seeded, stratified fraction of ``train`` becomes ``val``.
"""
from __future__ import annotations

import contextvars
import csv
import hashlib
import os

from .dataset import DataError, Dataset, Sample, catalogue_value, kind_of, parse_label, sample_id, supported_files
from .io import open_text

SPLITS = ("train", "val", "test")
LENS_NAMES = {"lens", "lenses", "1", "positive", "pos"}
NONLENS_NAMES = {"nonlens", "nonlenses", "non_lens", "non-lens", "0", "negative", "neg"}


_REGISTERED: dict[str, tuple] = {}


def register_source(name: str, detect, read) -> None:
    """Add a data source without touching loaders or trainers.

    ``detect(root) -> bool`` says whether ``root`` is in your layout; ``read(root) -> {split: Dataset}``
    describes it (each :class:`Dataset` lists :class:`Sample` objects of a supported ``kind``). Registered
    sources are tried before the built-in layouts, in registration order; registering a name again
    replaces it.
    """
    _REGISTERED[name] = (detect, read)


def _list_files(folder: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(folder):
        out.extend(os.path.join(dirpath, n) for n in names if kind_of(n))
    return sorted(out)


#: issue 25 (--inject): a training split of one class (non-lenses only: the arcs are painted on) is valid input
#: while set (``pipelines.injecting.discover_backgrounds``); otherwise an empty class is an error
ONE_CLASS_OK: contextvars.ContextVar[bool] = contextvars.ContextVar("one_class_ok", default=False)


def _class_folders(folder: str) -> list[Sample] | None:
    subdirs = [d for d in sorted(os.listdir(folder)) if os.path.isdir(os.path.join(folder, d))]
    labelled = {d: 1 for d in subdirs if d.lower() in LENS_NAMES}
    labelled.update({d: 0 for d in subdirs if d.lower() in NONLENS_NAMES})
    if not labelled:
        return None
    unknown = [d for d in subdirs if d not in labelled]
    if unknown:
        raise DataError(f"{folder}: unknown class folder(s) {unknown}; expected 'lens/' and 'nonlens/'")
    samples = []
    for d, label in labelled.items():
        files = _list_files(os.path.join(folder, d))
        if not files:
            raise DataError(f"{os.path.join(folder, d)}: class folder is empty")
        samples.extend(Sample(os.path.abspath(f), label, sample_id(f)) for f in files)
    for label, name in ((1, "lens"), (0, "nonlens")):
        if not any(s.label == label for s in samples) and not ONE_CLASS_OK.get():
            raise DataError(f"{folder}: no '{name}' samples (an empty class)")
    return samples


def read_manifest(path: str, root: str) -> list[Sample]:
    """Samples from a CSV with a ``filepath`` column (``path``/``file`` accepted) and optional ``label``."""
    with open_text(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        path_col = next((c for c in ("filepath", "path", "file", "filename") if c in cols), None)
        if not cols:
            raise DataError(f"{path}: empty manifest (no header row; expected columns filepath,label)")
        if path_col is None:
            raise DataError(f"{path}: no 'filepath' column (columns: {cols})")
        label_col = next((c for c in ("label", "is_lens", "y") if c in cols), None)
        samples, missing = [], []
        for lineno, row in enumerate(reader, start=2):
            where = f"{path}, line {lineno}"
            rel = (row.get(path_col) or "").strip()
            if not rel:
                raise DataError(f"{where}: empty file path")
            full = rel if os.path.isabs(rel) else os.path.join(root, rel)
            if not os.path.exists(full):  # kept: reported by check and the loaders, skipped by --skip-bad
                missing.append(f"{where}: file not found: {full}")
            label = parse_label(row[label_col], where) if label_col else None
            meta = {c: v for c in cols if c not in (path_col, label_col) and (v := catalogue_value(row[c])) is not None}
            samples.append(Sample(os.path.abspath(full), label, sample_id(full), meta=meta))
    if not samples:
        raise DataError(f"{path}: manifest lists no samples")
    if len(missing) == len(samples):
        raise DataError(missing[0] + (f" (and every other file it lists: {len(missing)})" if len(missing) > 1 else ""))
    return samples


def not_utf8(names) -> str | None:
    """The first of ``names`` that is not valid UTF-8 text (a lone surrogate: how Python shows a file name's bytes
    that are not UTF-8), or None."""
    for v in names:
        try:
            str(v).encode("utf-8")
        except UnicodeEncodeError:
            return str(v)
    return None


def make_dataset(samples: list[Sample], root: str, split: str, hdus=None) -> Dataset:
    """A Dataset of ``samples`` (loose files of one kind, found by extension) with the band count and size
    most of its first samples have."""
    from .readers import reference_layout

    bad = not_utf8(s.path for s in samples) or not_utf8(s.id for s in samples)
    if bad is not None:
        raise DataError(f"{bad}: not valid UTF-8 (a byte of the file name that is not text, shown escaped); rename "
                        "the file: predict's outputs and DALI's readers take UTF-8 names only")
    kinds = {kind_of(s.path) for s in samples}
    if None in kinds:
        bad = next(s.path for s in samples if kind_of(s.path) is None)
        raise DataError(f"{bad}: unsupported file type (dali-lens reads {supported_files()})")
    if len(kinds) > 1:
        raise DataError(f"{root} ({split}): mixed file types {sorted(kinds)}; use one format per dataset")
    kind = kinds.pop()
    probe = Dataset(samples, bands=0, kind=kind, root=root, split=split, hdus=hdus)
    probe.bands, probe.shape = reference_layout(probe)
    return probe


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split ``samples`` into (keep, held_out) with ``fraction`` of each class held out, reproducibly.

    Which samples are held out depends only on their ids and ``seed`` (within each class, the samples whose
    hash of (seed, id) ranks lowest), not on the order in which a CSV or a folder listing gives them: the same
    files read through manifests or through folders give the same validation split. Both lists keep the input
    order."""
    keep, held = [], []
    for label in sorted({s.label for s in samples}, key=lambda v: -2 if v is None else v):
        group = [s for s in samples if s.label == label]
        group.sort(key=lambda s: (_rank(seed, s.id), s.id, s.path))
        n_held = max(1, round(len(group) * fraction)) if len(group) > 1 else 0
        held.extend(group[:n_held])
        keep.extend(group[n_held:])
    order = {s: i for i, s in enumerate(samples)}
    return sorted(keep, key=order.get), sorted(held, key=order.get)


def _rank(seed: int, ident: str) -> bytes:
    return hashlib.blake2b(f"{int(seed)}\0{ident}".encode("utf-8", "surrogatepass"), digest_size=8).digest()


def discover(root: str, hdus: tuple[int | str, ...] | None = None, val_fraction: float = 0.15,
             seed: int = 0) -> dict[str, Dataset]:
    """Describe the dataset at ``root`` as ``{split: Dataset}`` (see the module docstring for layouts)."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(root):
        raise DataError(f"{root}: no such file or directory")
    found: dict[str, list[Sample]] = {}
    if os.path.isfile(root):
        if not root.lower().endswith(".csv"):
            kind = kind_of(root)
            if kind is None:
                raise DataError(f"{root}: not a dataset folder, CSV manifest or supported file")
            found["predict"] = [Sample(root, None, sample_id(root))]
        else:
            found["predict"] = read_manifest(root, os.path.dirname(root))
        base = os.path.dirname(root)
    else:
        base = root
        from .challenge import is_challenge_layout, read_challenge
        from .shards import MANIFEST, is_packed, load_packed

        if is_packed(root):  # written by `python -m dali_lens.pack`
            return _with_val(load_packed(root), val_fraction, seed)

        for detect, read in _REGISTERED.values():
            if detect(root):
                datasets = read(root)
                _check_consistent(datasets)
                return _with_val(datasets, val_fraction, seed)

        if is_challenge_layout(root):
            return _with_val(read_challenge(root), val_fraction, seed)
        manifests = {s: os.path.join(root, f"{s}.csv") for s in SPLITS}
        if any(os.path.exists(p) for p in manifests.values()):
            found = {s: read_manifest(p, root) for s, p in manifests.items() if os.path.exists(p)}
        elif any(os.path.isdir(os.path.join(root, s)) for s in SPLITS):
            for s in SPLITS:
                folder = os.path.join(root, s)
                if os.path.isdir(folder):
                    samples = _class_folders(folder)
                    if samples is None:
                        raise DataError(f"{folder}: expected class folders 'lens/' and 'nonlens/'")
                    found[s] = samples
        else:
            samples = _class_folders(root)
            if samples is not None:
                found["train"] = samples
            else:
                files = _list_files(root)
                if not files:
                    tars = [n for n in os.listdir(root) if n.lower().endswith(".tar")]
                    hint = (f"; it holds {len(tars)} .tar file(s) but no {MANIFEST}: only sets written by "
                            "`python -m dali_lens.pack` are read as shards, so pack the original files with it"
                            if tars else "")
                    raise DataError(f"{root}: no images, .npy or FITS files found{hint}")
                found["predict"] = [Sample(os.path.abspath(f), None, sample_id(f)) for f in files]
    datasets = {s: make_dataset(v, base, s, hdus) for s, v in found.items()}
    _check_consistent(datasets)
    return _with_val(datasets, val_fraction, seed)


#: the splits a training run learns from and selects its best epoch on: every sample needs a target
TRAINING_SPLITS = ("train", "val")


def leave_out_unlabelled(datasets: dict[str, Dataset], log=print) -> dict[str, Dataset]:
    """``datasets`` with the unlabelled samples (label empty, ``-1``, ``nan``, ``none``: ``parse_label``) left
    out of the splits a run trains and validates on (:data:`TRAINING_SPLITS`), which have no target for them
    (they entered the BCE loss with target -1, driving it negative); one line says how many per split and names
    the first. The other splits keep them (scored, left out of the metrics)."""
    out, counts, dropped = dict(datasets), [], []
    for name in TRAINING_SPLITS:
        ds = datasets.get(name)
        if ds is None:
            continue
        keep = [i for i, s in enumerate(ds.samples) if s.label is not None]
        if len(keep) == len(ds):
            continue
        if not keep:
            raise DataError(f"{ds.root}: the {name} split has no labelled samples")
        counts.append(f"{name} {len(ds) - len(keep)}")
        dropped += [s.path for s in ds.samples if s.label is None]
        out[name] = ds.subset(keep)
    if dropped:
        names = ", ".join(dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
        log(f"{len(dropped)} unlabelled sample(s) (label empty, -1 or nan) left out of training "
            f"({', '.join(counts)}): {names}")
    return out


def explicit_splits(root: str) -> bool:
    """True when the data at ``root`` names its splits itself: split manifests (``train.csv`` ...), split folders
    (``train/`` ...), a packed set (its manifest records them) or a registered source. False for class folders
    (``lens/``, ``nonlens/``), the challenge layout, flat files and a CSV file: their only splits are ``train``
    and the ``val`` that ``discover`` holds out of it, so a command asking for another split uses all of it."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        return False
    from .challenge import is_challenge_layout
    from .shards import is_packed

    if is_packed(root) or any(detect(root) for detect, _ in _REGISTERED.values()):
        return True
    if is_challenge_layout(root):
        return False
    return any(os.path.exists(os.path.join(root, f"{s}.csv")) or os.path.isdir(os.path.join(root, s)) for s in SPLITS)


def _check_consistent(datasets: dict[str, Dataset]) -> None:
    ref_name, ref = next(iter(datasets.items()))
    for name, d in datasets.items():
        if d.kind != ref.kind or d.bands != ref.bands:
            raise DataError(f"{d.samples[0].path}: {name} split has {d.bands} band(s) of {d.kind} data but "
                            f"{ref_name} has {ref.bands} band(s) of {ref.kind} data")


def _with_val(datasets: dict[str, Dataset], val_fraction: float, seed: int) -> dict[str, Dataset]:
    if "train" in datasets and "val" not in datasets and val_fraction > 0:
        train = datasets["train"]
        keep, held = stratified_split(train.samples, val_fraction, seed)
        datasets["train"] = Dataset(keep, train.bands, train.kind, train.root, "train", train.hdus, train.shape)
        datasets["val"] = Dataset(held, train.bands, train.kind, train.root, "val", train.hdus, train.shape)
    for name in ("train",):
        if name in datasets:
            counts = datasets[name].counts()
            if (counts["lens"] == 0 or counts["nonlens"] == 0) and not ONE_CLASS_OK.get():
                empty = "lens" if counts["lens"] == 0 else "nonlens"
                raise DataError(f"{datasets[name].root}: the {name} split has no '{empty}' samples (an empty class)")
    return datasets
