"""The rows of every predictions CSV: one header and one row writer for ``train`` (the run's predictions.csv),
``predict`` and ``evaluate`` alike, so that the columns and the number format are the same in all three.

A neutral module (it needs only ``data.io``): the trainers, the predict core and evaluate all import it, and
none of them imports another's package for it.
"""
from __future__ import annotations

from .data.io import to_cell

__all__ = ["prediction_header", "prediction_row"]


def prediction_header(names: list[str]) -> list[str]:
    """The columns of every predictions CSV (training, ``predict``, ``evaluate``): ``file,id,label,score`` and,
    with several members, ``score_<member>`` for each and ``member_std``."""
    head = ["file", "id", "label", "score"]
    if len(names) > 1:
        head += [f"score_{n}" for n in names] + ["member_std"]
    return head


def _fmt(v: float) -> str:
    return f"{float(v):.7g}"


def prediction_row(path: str, ident: str, label, score: float, members=(), spread=None) -> list[str]:
    """One row of a predictions CSV (``prediction_header``'s columns): ``label`` None or < 0 is unlabelled;
    ``members`` the member scores in header order and ``spread`` their std (several members only)."""
    row = [to_cell(path), to_cell(ident), "" if label is None or int(label) < 0 else str(int(label)), _fmt(score)]
    if len(members):
        row += [_fmt(v) for v in members] + [_fmt(spread)]
    return row
