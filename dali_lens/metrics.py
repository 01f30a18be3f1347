"""Classification and lens-finding-challenge metrics, calibration and plots.

ROC, ROC AUC and average precision are scikit-learn's; the challenge metrics (TPR0, TPR10), the bootstrap
intervals, completeness, contamination, ECE and temperature fitting are plain numpy here (matplotlib only for
the two plot helpers). Everything accepts numpy arrays, lists or 1-element-per-sample tensors converted with
``np.asarray``.

Conventions
-----------
* ``labels``: 0 = non-lens, 1 = lens (bools accepted).  ``scores``: the lens probability (any real score
  works for the ranking metrics; ECE needs probabilities in [0, 1]).
* A sample is *predicted a lens* at ``threshold`` when ``score >= threshold``.
* Undefined quantities are ``NaN`` (e.g. ROC AUC without positives or without negatives, precision when
  nothing is predicted a lens).  ``to_jsonable`` turns ``NaN``/``inf`` into ``None`` for JSON files.
* Ties: tied scores form ONE threshold.  A threshold can only be placed between distinct scores, so when
  counting what a threshold admits, a whole group of tied scores is admitted or rejected together.

Lens-finding-challenge metrics (Metcalf et al. 2019)
---------------------------------------------------
``tpr_at_fp(labels, scores, max_fp)`` is the highest true-positive rate over the thresholds that admit at
most ``max_fp`` false positives (counts on the evaluated set, not rates).  ``tpr0`` uses ``max_fp = 0``
(no false positive at all) and ``tpr10`` uses ``max_fp = 9`` ("fewer than ten false positives").

What searches report (``search_metrics``)
-----------------------------------------
Rank the candidates by score, highest first. ``purity@N`` is the share of lenses among the top ``N``;
``completeness@N`` the share of all lenses that the top ``N`` hold. ``completeness at purity p`` is the largest
completeness over the thresholds whose purity (precision) is at least ``p`` (scikit-learn's
``precision_recall_curve``). Each is also given *at a survey prior* ``pi``: the evaluated set is reweighted so
that lenses make up a fraction ``pi`` of it, every lens counting 1 and every non-lens
``w = ((1 - pi) / pi) * n_lens / n_nonlens`` (``nonlens_weight``; the same reweighting as
``expected_contamination``), so that the purity of a threshold is ``TP / (TP + w FP)``. At the prior, ``N``
counts objects of that reweighted population: a survey of ``n_lens / pi`` objects holding the evaluated lenses,
in which each evaluated non-lens stands for ``w`` survey objects. ``N`` is capped at the population's size
(the split's size on the evaluated set, ``n_lens / pi`` at the prior): ``n_used`` records the ``N`` counted.
Ties at the ``N``-th place: a group of tied scores that straddles it enters pro rata, each member with the
share of its weight that fits, so the group's lenses count by the group's lens fraction; this is the mean over
every order of the tied scores, and does not depend on the order of the rows.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = [
    "classification_metrics",
    "roc_curve",
    "roc_auc",
    "average_precision",
    "expected_calibration_error",
    "tpr_at_fp",
    "tpr0",
    "tpr10",
    "bootstrap_ci",
    "completeness_by_bin",
    "expected_contamination",
    "DEFAULT_AT_N",
    "PURITY_TARGETS",
    "nonlens_weight",
    "purity_completeness_curve",
    "completeness_at_purity",
    "at_n",
    "search_metrics",
    "format_search",
    "fit_temperature",
    "to_jsonable",
    "plot_roc",
    "plot_completeness",
]

ECE_BINS = 15


# --------------------------------------------------------------------------------------------------------
# input handling


def _as_labels_scores(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validate and flatten ``labels`` (0/1 -> int64) and ``scores`` (float64)."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = y.ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.size} vs {s.size}")
    if y.size == 0:
        raise ValueError("empty labels/scores: nothing to evaluate")
    if y.dtype == bool:
        y = y.astype(np.int64)
    else:
        yf = y.astype(np.float64)
        if not np.all((yf == 0) | (yf == 1)):
            bad = np.unique(y[~((yf == 0) | (yf == 1))])[:5]
            raise ValueError(f"labels must be 0 (non-lens) or 1 (lens); found {bad.tolist()}")
        y = yf.astype(np.int64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} non-finite values (NaN/inf)")
    return y, s


def _counts_at_thresholds(y: np.ndarray, s: np.ndarray):
    """Cumulative (tp, fp) when admitting every distinct score, highest first.

    Returns ``(tps, fps, thresholds)``: entry ``i`` counts the samples with ``score >= thresholds[i]``.
    Tied scores give one entry.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    last_of_group = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last_of_group]
    fps = (last_of_group + 1) - tps
    return tps.astype(np.int64), fps.astype(np.int64), s_sorted[last_of_group]


# --------------------------------------------------------------------------------------------------------
# ranking metrics


def _sklearn_metrics():
    """scikit-learn's metrics module, imported on first use (it takes a while; most commands never score)."""
    import sklearn.metrics

    return sklearn.metrics


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)``, one point per distinct score plus the origin (scikit-learn's
    ``roc_curve`` with every point kept).

    ``thresholds[0] = inf`` (nothing admitted: the point (0, 0)); ``thresholds[i]`` for ``i >= 1`` are the
    distinct scores in decreasing order and the point counts the samples with ``score >= thresholds[i]``.
    ``fpr`` is all-NaN without negatives, ``tpr`` all-NaN without positives.
    """
    import warnings

    from sklearn.exceptions import UndefinedMetricWarning

    y, s = _as_labels_scores(labels, scores)
    with warnings.catch_warnings():  # one class only: the undefined rate is NaN, as documented above
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        fpr, tpr, thresholds = _sklearn_metrics().roc_curve(y, s, pos_label=1, drop_intermediate=False)
    return fpr, tpr, thresholds


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (scikit-learn's ``roc_auc_score``) = Mann-Whitney U / (n_pos * n_neg).

    Equals the probability that a random lens scores above a random non-lens, ties counted 1/2 (the same
    as the trapezoidal area under ``roc_curve``).  NaN without positives or without negatives.
    """
    y, s = _as_labels_scores(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        return float("nan")
    return float(_sklearn_metrics().roc_auc_score(y, s))


def average_precision(labels, scores) -> float:
    """Average precision (step-wise area under the precision-recall curve, scikit-learn's
    ``average_precision_score``): ``AP = sum_k (R_k - R_{k-1}) * P_k`` over the distinct thresholds
    (highest first, ``R_0 = 0``).  NaN without positives; 1.0 without negatives.
    """
    y, s = _as_labels_scores(labels, scores)
    if int(y.sum()) == 0:
        return float("nan")
    return float(_sklearn_metrics().average_precision_score(y, s, pos_label=1))


def expected_calibration_error(labels, scores, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the lens probability, ``n_bins`` equal-width bins on [0, 1].

    ``ECE = sum_b (n_b / n) * |mean(label in b) - mean(score in b)|``, bin ``b`` covering
    ``[b/n_bins, (b+1)/n_bins)`` (the last bin also holds 1.0); empty bins contribute nothing.  This is the
    reliability of the positive-class probability (not the top-label confidence).
    """
    y, s = _as_labels_scores(labels, scores)
    if np.any((s < 0) | (s > 1)):
        raise ValueError("ECE needs probabilities in [0, 1]; got scores outside that range")
    idx = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    n_b = np.bincount(idx, minlength=n_bins).astype(np.float64)
    sum_y = np.bincount(idx, weights=y.astype(np.float64), minlength=n_bins)
    sum_s = np.bincount(idx, weights=s, minlength=n_bins)
    # |mean_y - mean_s| * n_b = |sum_y - sum_s|
    return float(np.sum(np.abs(sum_y - sum_s)) / y.size)


def tpr_at_fp(labels, scores, max_fp: int) -> float:
    """Highest TPR over the thresholds admitting at most ``max_fp`` false positives (a count).

    Thresholds sit between distinct scores: lenses tied with the first non-lens that would exceed the
    allowance are NOT counted.  Without negatives every lens is found: 1.0.  Without positives: NaN.
    """
    if isinstance(max_fp, bool) or int(max_fp) != max_fp or max_fp < 0:
        raise ValueError(f"max_fp must be a non-negative integer count, got {max_fp!r}")
    y, s = _as_labels_scores(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    tps, fps, _ = _counts_at_thresholds(y, s)
    ok = fps <= max_fp  # cumulative counts are monotone: ``ok`` is a prefix
    best_tp = int(tps[ok].max()) if np.any(ok) else 0
    return best_tp / n_pos


def tpr0(labels, scores) -> float:
    """TPR0 of the lens-finding challenge: highest TPR with zero false positives."""
    return tpr_at_fp(labels, scores, 0)


def tpr10(labels, scores) -> float:
    """TPR10 of the lens-finding challenge: highest TPR with fewer than ten (<= 9) false positives."""
    return tpr_at_fp(labels, scores, 9)


# --------------------------------------------------------------------------------------------------------
# summary


def _safe_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def classification_metrics(labels, scores, threshold: float = 0.5) -> dict[str, Any]:
    """All headline metrics in one dict.

    Keys: ``accuracy, precision, recall, f1`` (at ``score >= threshold``; precision NaN when nothing is
    predicted a lens, recall NaN without lenses, ``f1 = 2TP / (2TP + FP + FN)``), ``roc_auc``, ``pr_auc``
    (average precision), ``ece`` (15 bins), ``tpr0``, ``tpr10``, counts ``n, n_pos, n_neg, tp, fp, tn,
    fn`` and ``threshold``.  Pass through ``to_jsonable`` before writing JSON.
    """
    y, s = _as_labels_scores(labels, scores)
    pred = s >= threshold
    tp = int(np.sum(pred & (y == 1)))
    fp = int(np.sum(pred & (y == 0)))
    fn = int(np.sum(~pred & (y == 1)))
    tn = int(np.sum(~pred & (y == 0)))
    n_pos = tp + fn
    n_neg = fp + tn
    in_unit = bool(np.all((s >= 0) & (s <= 1)))
    return {
        "accuracy": (tp + tn) / y.size,
        "precision": _safe_div(tp, tp + fp),
        "recall": _safe_div(tp, n_pos),
        "f1": _safe_div(2 * tp, 2 * tp + fp + fn),
        "roc_auc": roc_auc(y, s),
        "pr_auc": average_precision(y, s),
        "ece": expected_calibration_error(y, s) if in_unit else float("nan"),
        "tpr0": tpr0(y, s),
        "tpr10": tpr10(y, s),
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "threshold": float(threshold),
    }


def to_jsonable(obj: Any) -> Any:
    """Recursively convert numpy types/arrays to Python ones and NaN/inf to ``None`` (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


# --------------------------------------------------------------------------------------------------------
# bootstrap


def _chunks(n_boot: int, per_boot: int, budget: int = 4_000_000) -> list[int]:
    size = max(1, min(n_boot, budget // max(per_boot, 1)))
    return [min(size, n_boot - i) for i in range(0, n_boot, size)]


def bootstrap_ci(
    labels,
    scores,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` for ``metric_fn(labels, scores)`` at level ``1 - alpha``.

    Stratified: lenses and non-lenses are resampled separately (with replacement, keeping their counts),
    so every replicate has the same class balance.  Deterministic for a ``seed``.  Replicates whose metric
    is NaN are ignored; ``(nan, nan)`` when none is finite.  ``metric_fn is roc_auc`` uses a vectorised
    path (same resamples, same numbers as the generic per-replicate loop).
    """
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    y, s = _as_labels_scores(labels, scores)
    pos = s[y == 1]
    neg = s[y == 0]
    n_pos, n_neg = pos.size, neg.size
    rng = np.random.default_rng(seed)
    fast_auc = metric_fn is roc_auc and n_pos > 0 and n_neg > 0
    if fast_auc:
        neg_order = np.argsort(neg, kind="mergesort")
        neg_rank = np.empty(n_neg, dtype=np.int64)
        neg_rank[neg_order] = np.arange(n_neg)
        neg_sorted = neg[neg_order]
        lo = np.searchsorted(neg_sorted, pos, side="left")
        hi = np.searchsorted(neg_sorted, pos, side="right")
    y_boot = np.r_[np.ones(n_pos, dtype=np.int64), np.zeros(n_neg, dtype=np.int64)]
    values = np.empty(n_boot, dtype=np.float64)
    done = 0
    for c in _chunks(n_boot, n_pos + n_neg + 1):
        ip = rng.integers(0, n_pos, size=(c, n_pos)) if n_pos else np.empty((c, 0), np.int64)
        ineg = rng.integers(0, n_neg, size=(c, n_neg)) if n_neg else np.empty((c, 0), np.int64)
        if fast_auc:
            # negatives resampled -> counts per sorted position -> cumulative counts C (c, n_neg + 1);
            # for a positive p: #neg < p = C[lo(p)], #neg == p = C[hi(p)] - C[lo(p)]
            flat = (np.arange(c)[:, None] * n_neg + neg_rank[ineg]).ravel()
            counts = np.bincount(flat, minlength=c * n_neg).reshape(c, n_neg)
            cum = np.zeros((c, n_neg + 1), dtype=np.float64)
            np.cumsum(counts, axis=1, out=cum[:, 1:])
            below = np.take_along_axis(cum, lo[ip], axis=1)
            upto = np.take_along_axis(cum, hi[ip], axis=1)
            values[done : done + c] = (below + 0.5 * (upto - below)).sum(axis=1) / (n_pos * n_neg)
        else:
            for b in range(c):
                s_b = np.r_[pos[ip[b]], neg[ineg[b]]]
                values[done + b] = float(metric_fn(y_boot, s_b))
        done += c
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(low), float(high)


# --------------------------------------------------------------------------------------------------------
# lens-finding diagnostics


def completeness_by_bin(
    labels, scores, values, threshold: float, bins: int | Sequence[float] = 5
) -> list[dict[str, Any]]:
    """Completeness (fraction of lenses found, ``score >= threshold``) in bins of a lens property.

    ``values``: one number per sample (e.g. Einstein area, lensed pixels, lensed flux); only lenses with a
    finite value are used.  ``bins``: an int -> edges at quantiles of ``values`` among those lenses (duplicate
    edges from ties merged, so there may be fewer bins), or explicit increasing edges.  Bins are
    ``[lo, hi)``, the last one closed; lenses outside explicit edges are left out.  Rows:
    ``{"lo", "hi", "n_lenses", "n_found", "completeness"}`` (completeness NaN for an empty bin).
    """
    y, s = _as_labels_scores(labels, scores)
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.shape != y.shape:
        raise ValueError(f"values differ in length from labels: {v.size} vs {y.size}")
    keep = (y == 1) & np.isfinite(v)
    v_l = v[keep]
    found = s[keep] >= threshold
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise ValueError("bins must be >= 1")
        if v_l.size == 0:
            return []
        edges = np.unique(np.quantile(v_l, np.linspace(0.0, 1.0, int(bins) + 1)))
        if edges.size == 1:  # all values equal: one bin holding all of them
            edges = np.r_[edges, edges]
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.ndim != 1 or edges.size < 2 or np.any(np.diff(edges) < 0):
            raise ValueError("bins must be an int or at least two increasing edges")
    n_bins = edges.size - 1
    idx = np.searchsorted(edges, v_l, side="right") - 1
    idx[v_l == edges[-1]] = n_bins - 1  # last bin closed
    inside = (idx >= 0) & (idx < n_bins)
    n_l = np.bincount(idx[inside], minlength=n_bins)
    n_f = np.bincount(idx[inside], weights=found[inside].astype(np.float64), minlength=n_bins)
    return [
        {
            "lo": float(edges[i]),
            "hi": float(edges[i + 1]),
            "n_lenses": int(n_l[i]),
            "n_found": int(n_f[i]),
            "completeness": _safe_div(n_f[i], n_l[i]),
        }
        for i in range(n_bins)
    ]


def expected_contamination(labels, scores, threshold: float, prior: float = 1e-3) -> dict[str, Any]:
    """False positives per true lens expected in a survey, from the TPR/FPR measured at ``threshold``.

    In a survey of ``N`` objects of which a fraction ``prior`` are lenses, the finder returns
    ``TP = TPR * prior * N`` lenses and ``FP = FPR * (1 - prior) * N`` impostors, so

        fp_per_tp = FP / TP = FPR * (1 - prior) / (TPR * prior)
        purity    = TP / (TP + FP) = 1 / (1 + fp_per_tp)

    ``fp_per_tp`` is ``inf`` (purity 0) when ``TPR = 0`` and ``FPR > 0``; NaN when both are 0 or a class is
    missing.  With ``FP = 0`` on the evaluated set the estimate is 0 but only bounded by the set size
    (roughly ``FPR < 3 / n_neg`` at 95%), reported as ``fpr_upper95``.
    """
    if not 0 < prior < 1:
        raise ValueError("prior must be in (0, 1)")
    y, s = _as_labels_scores(labels, scores)
    pred = s >= threshold
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    tpr = _safe_div(np.sum(pred & (y == 1)), n_pos)
    fpr = _safe_div(np.sum(pred & (y == 0)), n_neg)
    if math.isnan(tpr) or math.isnan(fpr) or (tpr == 0 and fpr == 0):
        ratio = float("nan")
    elif tpr == 0:
        ratio = float("inf")
    else:
        ratio = fpr * (1 - prior) / (tpr * prior)
    purity = float("nan") if math.isnan(ratio) else (0.0 if math.isinf(ratio) else 1.0 / (1.0 + ratio))
    # exact one-sided 95% upper bound for a binomial rate with zero events: 1 - 0.05**(1/n)
    fpr_upper = (1.0 - 0.05 ** (1.0 / n_neg)) if (n_neg and fpr == 0) else float("nan")
    return {
        "threshold": float(threshold),
        "prior": float(prior),
        "tpr": tpr,
        "fpr": fpr,
        "fp_per_tp": ratio,
        "purity": purity,
        "fpr_upper95": fpr_upper,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


# --------------------------------------------------------------------------------------------------------
# what searches report: purity and completeness at N, completeness at purity, at a survey prior

DEFAULT_AT_N = (10, 100, 1000)
PURITY_TARGETS = (0.5, 0.9)


def nonlens_weight(labels, prior: float) -> float:
    """The weight of one non-lens, relative to a lens, that gives the evaluated set the survey's lens fraction
    ``prior``: ``((1 - prior) / prior) * n_lens / n_nonlens``. NaN when a class is missing."""
    if not 0 < prior < 1:
        raise ValueError("prior must be in (0, 1)")
    y = np.asarray(labels).ravel()
    n_pos = int(np.sum(y == 1))
    n_neg = int(y.size - n_pos)
    return (1 - prior) / prior * n_pos / n_neg if n_pos and n_neg else float("nan")


def purity_completeness_curve(labels, scores, prior: float | None = None
                              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(purity, completeness, thresholds)``: scikit-learn's ``precision_recall_curve`` (thresholds increasing,
    one per distinct score; the last point, purity 1 and completeness 0, has none), on the evaluated set or, with
    ``prior``, with every non-lens weighted by ``nonlens_weight`` (purity ``TP / (TP + w FP)``). Completeness is
    NaN without lenses; at a prior, everything is NaN when a class is missing."""
    y, s = _as_labels_scores(labels, scores)
    weight = None
    if prior is not None:
        w = nonlens_weight(y, prior)
        if math.isnan(w):
            nan = np.full(2, np.nan)
            return nan, nan, np.full(1, np.nan)
        weight = np.where(y == 1, 1.0, w)
    if not y.any():
        purity = np.r_[np.zeros(np.unique(s).size), 1.0]
        return purity, np.full(purity.size, np.nan), np.unique(s)
    p, r, thr = _sklearn_metrics().precision_recall_curve(y, s, pos_label=1, sample_weight=weight)
    return p, r, thr


def completeness_at_purity(labels, scores, purity: float, prior: float | None = None) -> tuple[float, float]:
    """``(completeness, threshold)``: the largest completeness over the thresholds (``score >= threshold``) whose
    purity is at least ``purity`` (at ``prior`` if given), and the highest threshold reaching it. ``(0.0, NaN)``
    when no threshold is that pure (only admitting nothing is); NaN without lenses (or, at a prior, without a
    class)."""
    if not 0 < purity <= 1:
        raise ValueError("purity must be in (0, 1]")
    p, r, thr = purity_completeness_curve(labels, scores, prior)
    if np.isnan(r).all():
        return float("nan"), float("nan")
    ok = p[:-1] >= purity - 1e-12  # (rounding of the weighted sums)
    if not ok.any():
        return 0.0, float("nan")
    best = float(r[:-1][ok].max())
    return best, float(thr[ok & (r[:-1] == best)].max())  # (thr has one entry per point but the last)


def at_n(labels, scores, ns=DEFAULT_AT_N, prior: float | None = None) -> list[dict[str, Any]]:
    """``purity@N`` and ``completeness@N`` for each ``N`` of ``ns``: rows ``{"n", "n_used", "lenses", "purity",
    "completeness"}``, ``lenses`` the (weighted, possibly fractional) lenses among the top ``n_used`` (``N`` capped
    at the population's size). With ``prior``, ``N`` counts objects of the reweighted population (see the module's
    docstring); NaN there when a class is missing. Completeness is NaN without lenses. A tied group at the
    ``N``-th place enters pro rata (by weight)."""
    ns = [int(n) for n in ns]
    if any(n < 1 for n in ns):
        raise ValueError("N must be >= 1")
    y, s = _as_labels_scores(labels, scores)
    n_pos = int(y.sum())
    w = 1.0 if prior is None else nonlens_weight(y, prior)
    if math.isnan(w):
        return [{"n": n, "n_used": float("nan"), "lenses": float("nan"), "purity": float("nan"),
                 "completeness": float("nan")} for n in ns]
    tps, fps, _ = _counts_at_thresholds(y, s)  # cumulative, one entry per distinct score, highest first
    cum = tps + w * fps  # weight admitted down to each group
    rows = []
    for n in ns:
        n_used = min(float(n), float(cum[-1]))
        k = int(np.searchsorted(cum, n_used - 1e-9 * max(1.0, n_used), side="left"))
        k = min(k, cum.size - 1)
        prev_w, prev_tp = (float(cum[k - 1]), float(tps[k - 1])) if k else (0.0, 0.0)
        group_w, group_tp = float(cum[k]) - prev_w, float(tps[k]) - prev_tp
        lenses = prev_tp + (n_used - prev_w) * group_tp / group_w if group_w > 0 else prev_tp
        lenses = min(max(lenses, prev_tp), float(tps[k]))
        rows.append({"n": n, "n_used": int(n_used) if prior is None else n_used, "lenses": lenses,
                     "purity": lenses / n_used, "completeness": _safe_div(lenses, n_pos)})
    return rows


def _search_block(y, s, ns, purities, prior) -> dict[str, Any]:
    rows = at_n(y, s, ns, prior)
    at_p = {f"{p:g}": completeness_at_purity(y, s, p, prior) for p in purities}
    return {"n_used": {str(r["n"]): r["n_used"] for r in rows},
            "purity_at_n": {str(r["n"]): r["purity"] for r in rows},
            "completeness_at_n": {str(r["n"]): r["completeness"] for r in rows},
            "completeness_at_purity": {k: v[0] for k, v in at_p.items()},
            "threshold_at_purity": {k: v[1] for k, v in at_p.items()}}


def search_metrics(labels, scores, ns=DEFAULT_AT_N, prior: float | None = 1e-3,
                   purities=PURITY_TARGETS) -> dict[str, Any]:
    """What lens searches report, on the evaluated set and (``prior`` not None) at the survey prior:
    ``{"at_n": [N...], "n_used", "purity_at_n", "completeness_at_n" ({str(N): value}), "completeness_at_purity",
    "threshold_at_purity" ({f"{p:g}": value}), "prior": {"prior", "nonlens_weight", "population", and the same
    keys at the prior}}``. Pass through ``to_jsonable`` before writing JSON."""
    y, s = _as_labels_scores(labels, scores)
    out: dict[str, Any] = {"at_n": [int(n) for n in ns], "purity_targets": [float(p) for p in purities],
                           **_search_block(y, s, ns, purities, None)}
    if prior is not None:
        w = nonlens_weight(y, prior)
        out["prior"] = {"prior": float(prior), "nonlens_weight": w,
                        "population": float(y.sum()) / prior if not math.isnan(w) else float("nan"),
                        **_search_block(y, s, ns, purities, prior)}
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}"


def _search_text(block: dict, ns) -> str:
    def at(key):
        parts = []
        for k, n in enumerate(ns):
            used = block["n_used"].get(str(n))
            capped = used is not None and not (isinstance(used, float) and math.isnan(used)) and used < n
            parts.append(("" if k else f"{key}") + f"@{n}" + (f"({used:g})" if capped else "") + " "
                         + _fmt(block[f"{key}_at_n"].get(str(n))))
        return " ".join(parts)

    at_p = " ".join(f"{100 * float(p):g}% {_fmt(v)}" for p, v in block["completeness_at_purity"].items())
    return f"{at('purity')}  {at('completeness')}  completeness at purity {at_p}"


def format_search(search: Mapping[str, Any], split: str = "") -> str:
    """``search_metrics``'s result as the log's lines (``split:`` first): purity@N, completeness@N, completeness
    at purity, and the same at the prior; a capped ``N`` shows the ``N`` counted in brackets."""
    ns = search["at_n"]
    head = f"{split}: " if split else ""
    lines = [head + _search_text(search, ns)]
    pr = search.get("prior")
    if pr:
        pop = pr.get("population")
        size = "n/a" if pop is None or (isinstance(pop, float) and math.isnan(pop)) else f"{pop:,.0f}"
        lines.append(f"{head}at prior {pr['prior']:g} (a survey of {size}): " + _search_text(pr, ns))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# calibration


def _binary_nll(z: np.ndarray, y: np.ndarray) -> float:
    # -[y log sigmoid(z) + (1-y) log(1 - sigmoid(z))] = softplus(z) - y z, computed stably
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def fit_temperature(logits, labels, t_min: float = 1e-2, t_max: float = 1e2, tol: float = 1e-6) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``sigmoid(logits / T)`` (binary temperature scaling).

    Golden-section search on ``log T`` in ``[t_min, t_max]``; the NLL is convex in ``1/T`` hence unimodal
    in ``log T``.  Separable or single-class data push ``T`` to a bound (``t_min``).  Calibrated
    probabilities are then ``sigmoid(logits / T)``.
    """
    z = np.asarray(logits, dtype=np.float64).ravel()
    y, z = _as_labels_scores(labels, z)  # also rejects non-finite logits
    if not 0 < t_min < t_max:
        raise ValueError("need 0 < t_min < t_max")
    if np.all(z == 0):
        return 1.0  # every temperature gives the same NLL
    yf = y.astype(np.float64)

    def f(u: float) -> float:
        return _binary_nll(z * math.exp(-u), yf)

    a, b = math.log(t_min), math.log(t_max)
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    u = (a + b) / 2.0
    # the optimum may sit on a bound; golden section converges towards it, compare explicitly
    best = min((f(u), u), (f(math.log(t_min)), math.log(t_min)), (f(math.log(t_max)), math.log(t_max)))
    return float(math.exp(best[1]))


# --------------------------------------------------------------------------------------------------------
# plots (object-oriented matplotlib on the Agg canvas: no pyplot, no global backend/state changes)


def _new_figure(figsize=(5.0, 4.5)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _atomic_savefig(fig, path: str | os.PathLike) -> str:
    from .data.io import atomic_open

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "wb") as fh:
        fig.savefig(fh, format="png")
    return path


def plot_roc(
    labels,
    scores,
    path: str | os.PathLike,
    title: str | None = None,
    extra_curves: dict[str, tuple[Any, Any]] | None = None,
    label: str = "model",
) -> str:
    """Write a ROC-curve PNG to ``path`` (atomically); returns the path.

    ``extra_curves``: ``{name: (labels, scores)}`` drawn on the same axes (e.g. ensemble members).  Each
    legend entry shows AUC and TPR0.  Curves that are undefined (one class only) are listed as such.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    curves = {label: (labels, scores)}
    curves.update(extra_curves or {})
    for name, (yl, sc) in curves.items():
        fpr, tpr, _ = roc_curve(yl, sc)
        if np.isnan(fpr).any() or np.isnan(tpr).any():
            ax.plot([], [], label=f"{name} (undefined: one class only)")
            continue
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC={roc_auc(yl, sc):.3f}, TPR0={tpr0(yl, sc):.2f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    if title:
        ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return _atomic_savefig(fig, path)


def plot_completeness(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, column_name: str) -> str:
    """Write a completeness-vs-property PNG from ``completeness_by_bin`` rows; returns the path.

    Horizontal bars span each bin, with binomial error bars ``sqrt(c (1 - c) / n)`` and the lens count.
    """
    fig = _new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        n = int(r["n_lenses"])
        c = r["completeness"]
        if c is None or n == 0 or (isinstance(c, float) and math.isnan(c)):
            continue
        lo, hi = float(r["lo"]), float(r["hi"])
        mid = 0.5 * (lo + hi)
        err = math.sqrt(max(c * (1 - c), 0.0) / n)
        ax.errorbar([mid], [c], xerr=[[mid - lo], [hi - mid]], yerr=[[err], [err]], fmt="o", color="C0")
        ax.annotate(f"n={n}", (mid, c), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_xlabel(column_name)
    ax.set_ylabel("completeness")
    ax.set_title(f"completeness by {column_name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _atomic_savefig(fig, path)
