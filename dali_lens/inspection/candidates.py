"""Which cutouts to look at: rows of a predictions CSV, matched to the data and selected; grades and purity."""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field

from ..data.dataset import DataError, Dataset, Sample
from ..data.io import from_cell, open_text

GRADES = {0: "not a lens", 1: "possible", 2: "probable", 3: "definite"}
DEFAULT_BINS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass
class Candidate:
    """One row of a predictions CSV (``file,id[,label],score[,score_<member>...,member_std]``)."""

    id: str
    score: float
    file: str = ""
    label: int | None = None
    spread: float | None = None
    members: dict[str, float] = field(default_factory=dict)
    groups: list[str] = field(default_factory=list)  # why it was picked: top, bottom, ids, false-positive, missed
    mark: str = ""  # 'false-positive' / 'missed': labelled and on the wrong side of the threshold (set by select)
    sample: Sample | None = None
    dataset: Dataset | None = None
    problem: str | None = None  # why its cutout could not be shown
    similarity: float | None = None  # inspect --similar: cosine similarity of its embedding to the query's

    @property
    def kind(self) -> str:
        """'false-positive', 'missed' or '' (how the gallery marks it)."""
        return self.mark


def _float(text: str, where: str, column: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {column} {text!r} is not a number") from None
    return v


def read_predictions(path: str) -> list[Candidate]:
    """The rows of a predictions CSV written by ``predict``, ``evaluate`` or a training run, or of a Parquet
    output of ``predict`` (``OUT.parquet``, a folder of parts or one file)."""
    from ..prediction_table import is_parquet

    if is_parquet(path) and os.path.exists(path):
        return _read_parquet(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open_text(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "score" not in cols or not ({"id", "file"} & set(cols)):
            raise DataError(f"{path}: not a predictions CSV (needs 'score' and 'id' or 'file' columns; has {cols})")
        members = [c for c in cols if c.startswith("score_")]
        rows = []
        for lineno, row in enumerate(reader, start=2):
            where = f"{path}, line {lineno}"
            file = from_cell(row.get("file") or "")  # exactly as written: no strip, the quote undone
            cid = from_cell(row.get("id") or "") or os.path.basename(file)
            label_text = (row.get("label") or "").strip()
            label = None
            if label_text not in ("", "-1"):
                label = 1 if _float(label_text, where, "label") > 0 else 0
            spread = (row.get("member_std") or "").strip()
            rows.append(Candidate(
                cid, _float(row["score"], where, "score"), file, label,
                _float(spread, where, "member_std") if spread else None,
                {c[len("score_"):]: _float(row[c], where, c) for c in members if (row.get(c) or "").strip()}))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _read_parquet(path: str) -> list[Candidate]:
    from ..prediction_table import read_table

    try:
        t = read_table(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable Parquet predictions output ({str(exc).splitlines()[0]})") from None
    cols = t.column_names
    if "score" not in cols or not ({"id", "file"} & set(cols)):
        raise DataError(f"{path}: not a predictions table (needs 'score' and 'id' or 'file' columns; has {cols})")
    if t.num_rows == 0:
        raise DataError(f"{path}: no rows")
    n = t.num_rows

    def col(name):
        return t.column(name).to_pylist() if name in cols else [None] * n

    members = [c for c in cols if c.startswith("score_")]
    files, ids, labels, scores, spread = col("file"), col("id"), col("label"), col("score"), col("member_std")
    mem = {c[len("score_"):]: col(c) for c in members}
    return [Candidate(ids[j] or os.path.basename(files[j] or ""), float(scores[j]), files[j] or "",
                      None if labels[j] is None or labels[j] < 0 else int(labels[j] > 0), spread[j],
                      {k: float(v[j]) for k, v in mem.items() if v[j] is not None}) for j in range(n)]


def match(candidates: list[Candidate], datasets: list[Dataset]) -> list[str]:
    """Attach each candidate's sample (by file path, else by a unique id); returns the ids not found."""
    by_path: dict[str, tuple[Sample, Dataset]] = {}
    by_id: dict[str, list[tuple[Sample, Dataset]]] = {}
    for ds in datasets:
        for s in ds.samples:
            by_path[s.path] = (s, ds)
            by_id.setdefault(s.id, []).append((s, ds))
    missing = []
    for c in candidates:
        hit = by_path.get(os.path.abspath(c.file)) if c.file else None
        if hit is None:
            found = by_id.get(c.id, [])
            hit = found[0] if len(found) == 1 else None
        if hit is None:
            missing.append(c.id)
            c.problem = "not in the data"
            continue
        c.sample, c.dataset = hit
        if c.label is None and hit[0].label is not None:
            c.label = int(hit[0].label)
    return missing


def read_ids(path: str) -> list[str]:
    """IDs, one per line (or the first column of a CSV with an 'id' header); '#' starts a comment."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    ids = []
    with open_text(path) as fh:
        for k, line in enumerate(fh):
            entry = line.split("#", 1)[0].strip().split(",")[0].strip()
            if entry and not (k == 0 and entry.lower() == "id"):
                ids.append(entry)
    return ids


def member_spread(c: Candidate) -> float | None:
    """The ensemble's spread for ``c``: its ``member_std``, else the standard deviation of its member scores
    (as the predictions' writers compute ``member_std``), None for a single model's row."""
    if c.spread is not None:
        return c.spread
    if len(c.members) >= 2:
        import numpy as np

        return float(np.std(list(c.members.values())))
    return None


def select(candidates: list[Candidate], top: int = 0, bottom: int = 0, ids: list[str] | None = None,
           false_positives: int = 0, missed: int = 0, threshold: float = 0.5, uncertain: int = 0,
           disagree: int = 0) -> tuple[list[Candidate], list[str]]:
    """The candidates to show, in order (top, bottom, ids, false positives, missed, uncertain, disagree; each
    once), and the requested ids that are not in the predictions.

    ``uncertain``: the scores nearest ``threshold`` (equally near: the higher score first, then the rows'
    order); ``disagree``: the largest ensemble spreads (:func:`member_spread`; equally large: the rows' order),
    DataError when no row has one. Both are what is most informative to grade next.

    Labelled candidates are marked 'false-positive' (a non-lens scoring >= ``threshold``) or 'missed' (a lens
    scoring below it), whichever list picked them; ``--false-positives``/``--missed`` pick the highest-scoring
    non-lenses and the lowest-scoring lenses, which are only marked when on the wrong side of the threshold.
    """
    by_score = sorted(candidates, key=lambda c: -c.score)
    picked: dict[int, Candidate] = {}

    def add(group: str, items) -> None:
        for c in items:
            if group not in c.groups:
                c.groups.append(group)
            picked.setdefault(id(c), c)

    add("top", by_score[:max(0, top)])
    add("bottom", by_score[::-1][:max(0, bottom)])
    unknown = []
    if ids:
        index = {c.id: c for c in candidates}
        unknown = [i for i in ids if i not in index]
        add("ids", [index[i] for i in ids if i in index])
    if false_positives or missed:
        if not any(c.label is not None for c in candidates):
            raise DataError("--false-positives/--missed need labels (a 'label' column in the predictions, or "
                            "labelled data)")
    add("false-positive", [c for c in by_score if c.label == 0][:max(0, false_positives)])
    add("missed", [c for c in by_score[::-1] if c.label == 1][:max(0, missed)])
    if uncertain:
        add("uncertain", sorted(candidates, key=lambda c: (abs(c.score - threshold), -c.score))[:uncertain])
    if disagree:
        spreads = [(member_spread(c), c) for c in candidates]
        if all(s is None for s, _ in spreads):
            raise DataError("--disagree needs ensemble predictions (a member_std or score_<member> columns); these "
                            "have one score per row")
        ranked = sorted(((s, c) for s, c in spreads if s is not None), key=lambda sc: -sc[0])[:disagree]
        for s, c in ranked:
            c.spread = s
        add("disagree", [c for _, c in ranked])
    shown = list(picked.values())
    for c in shown:
        c.mark = ("false-positive" if c.label == 0 and c.score >= threshold else
                  "missed" if c.label == 1 and c.score < threshold else "")
    return shown, unknown


# ---------------------------------------------------------------------------------------------------------
# grades


def read_grades(path: str) -> dict[str, tuple[int, float | None]]:
    """``id -> (grade, score)`` from a grades CSV (``id,grade,score``, as the page exports it)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    out: dict[str, tuple[int, float | None]] = {}
    with open_text(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        if "id" not in cols or "grade" not in cols:
            raise DataError(f"{path}: not a grades CSV (needs 'id' and 'grade' columns; has {cols})")
        for lineno, row in enumerate(reader, start=2):
            where = f"{path}, line {lineno}"
            text = (row.get("grade") or "").strip()
            if text == "":
                continue
            try:
                grade = int(text)
            except ValueError:
                grade = -1
            if grade not in GRADES:
                raise DataError(f"{where}: grade {text!r} is not 0, 1, 2 or 3")
            score = (row.get("score") or "").strip()
            out[row["id"].strip()] = (grade, _float(score, where, "score") if score else None)
    return out


def purity_table(grades: dict[str, tuple[int, float | None]], bins=DEFAULT_BINS) -> list[dict]:
    """Per score bin: graded count, count per grade, purity (share graded 2 or 3) and with 'possible' (>= 1)."""
    edges = list(bins)
    rows = []
    for k, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        last = k == len(edges) - 2
        gs = [g for g, s in grades.values() if s is not None and lo <= s and (s < hi or (last and s <= hi))]
        n = len(gs)
        rows.append({"bin": f"[{lo:g}, {hi:g}{']' if last else ')'}", "n": n,
                     **{f"g{g}": gs.count(g) for g in GRADES},
                     "purity": sum(g >= 2 for g in gs) / n if n else math.nan,
                     "purity_incl_possible": sum(g >= 1 for g in gs) / n if n else math.nan})
    return rows


def graded_search(grades: dict[str, tuple[int, float | None]], at_n=None) -> dict | None:
    """purity@N, completeness@N and completeness at purity (``metrics.search_metrics``) of the graded candidates
    that have a score, ranked by it, a lens being a grade of 2 or 3; None when none has a score."""
    from ..metrics import DEFAULT_AT_N, search_metrics

    scored = [(g, s) for g, s in grades.values() if s is not None]
    if not scored:
        return None
    return search_metrics([int(g >= 2) for g, _ in scored], [s for _, s in scored], at_n or DEFAULT_AT_N, prior=None)


def format_purity(rows: list[dict], unscored: int = 0) -> str:
    head = ["score bin", "graded", "0", "1", "2", "3", "purity (2-3)", "incl. possible (1-3)"]
    body = [[r["bin"], str(r["n"]), *(str(r[f"g{g}"]) for g in GRADES),
             "n/a" if math.isnan(r["purity"]) else f"{r['purity']:.3f}",
             "n/a" if math.isnan(r["purity_incl_possible"]) else f"{r['purity_incl_possible']:.3f}"] for r in rows]
    total = sum(r["n"] for r in rows)
    good = sum(r["g2"] + r["g3"] for r in rows)
    body.append(["all", str(total), *(str(sum(r[f"g{g}"] for r in rows)) for g in GRADES),
                 f"{good / total:.3f}" if total else "n/a",
                 f"{sum(r['n'] - r['g0'] for r in rows) / total:.3f}" if total else "n/a"])
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + body]
    if unscored:
        lines.append(f"({unscored} graded candidate(s) without a score are not in any bin)")
    return "\n".join(lines)
