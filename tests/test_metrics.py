"""Tests for dali_lens.metrics: expected values are computed by hand in the comments."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

from dali_lens import metrics as M

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A small tied case used by several tests:
#   lenses     scores 0.8, 0.5
#   non-lenses scores 0.5, 0.2
TIE_Y = [1, 1, 0, 0]
TIE_S = [0.8, 0.5, 0.5, 0.2]


def brute_force_auc(y, s):
    y = np.asarray(y)
    s = np.asarray(s, dtype=float)
    pos, neg = s[y == 1], s[y == 0]
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0) + 0.5 * (diff == 0)).mean())


# ------------------------------------------------------------------------------------------ ROC / AUC


def test_roc_curve_ties_one_threshold_per_distinct_score():
    fpr, tpr, thr = M.roc_curve(TIE_Y, TIE_S)
    # thresholds: inf (nothing admitted), then distinct scores 0.8, 0.5, 0.2 (0.5 appears twice, once here)
    # admitted >= 0.8: tp=1 fp=0 ; >= 0.5: tp=2 fp=1 ; >= 0.2: tp=2 fp=2   (2 lenses, 2 non-lenses)
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.5, 0.2])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 1.0])


def test_roc_auc_ties_hand_case():
    # pairs (lens, non-lens): (0.8,0.5)=1 (0.8,0.2)=1 (0.5,0.5)=1/2 (0.5,0.2)=1 -> 3.5 / 4 = 0.875
    assert M.roc_auc(TIE_Y, TIE_S) == pytest.approx(0.875)
    # the trapezoidal area under the tie-collapsed ROC curve is the same number
    fpr, tpr, _ = M.roc_curve(TIE_Y, TIE_S)
    assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(0.875)


def test_roc_auc_all_tied_is_half():
    # every pair tied -> each counts 1/2
    assert M.roc_auc([0, 1, 0, 1, 1], [0.3] * 5) == pytest.approx(0.5)


def test_roc_auc_matches_brute_force_mann_whitney():
    rng = np.random.default_rng(123)
    for n, decimals in [(50, 1), (300, 2), (301, 6)]:
        y = rng.integers(0, 2, n)
        s = np.round(rng.normal(y * 0.7, 1.0), decimals)  # rounding creates many ties
        assert M.roc_auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)
        fpr, tpr, _ = M.roc_curve(y, s)
        assert float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2)) == pytest.approx(
            brute_force_auc(y, s), abs=1e-12
        )


def test_perfect_and_inverted_ranking():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert M.roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


# ------------------------------------------------------------------------------------------ PR AUC, ECE


def test_average_precision_hand_case():
    # thresholds 0.8: P=1/1 R=1/2 ; 0.5: P=2/3 R=2/2 ; 0.2: P=2/4 R=1 (recall step 0)
    # AP = (1/2 - 0) * 1 + (1 - 1/2) * 2/3 + 0 = 0.5 + 1/3
    assert M.average_precision(TIE_Y, TIE_S) == pytest.approx(0.5 + 1 / 3)


def test_average_precision_step_wise_not_interpolated():
    # ranking: lens(0.9), non(0.8), lens(0.7): P at the two recall steps = 1, 2/3 -> AP = .5*1 + .5*2/3
    assert M.average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx(0.5 + 1 / 3)


def test_ece_hand_case():
    # 15 bins of width 1/15.  0.1 -> bin 1 ([0.0667, 0.1333)), 0.9 -> bin 13 ([0.8667, 0.9333))
    # bin 1: scores 0.1, 0.1, labels 0, 1 -> |0.5 - 0.1| = 0.4, weight 2/4 -> 0.2
    # bin 13: scores 0.9, 0.9, labels 1, 1 -> |1.0 - 0.9| = 0.1, weight 2/4 -> 0.05
    assert M.expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9]) == pytest.approx(0.25)
    # perfectly calibrated hard predictions
    assert M.expected_calibration_error([0, 1], [0.0, 1.0]) == pytest.approx(0.0)


def test_ece_rejects_non_probabilities():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        M.expected_calibration_error([0, 1], [-0.5, 2.0])


# ------------------------------------------------------------------------------------------ TPR0 / TPR10


def test_tpr0_distinct_scores():
    # lenses 0.9 0.8 0.7 0.6, non-lenses 0.75 0.5.
    # zero FP: threshold above 0.75 -> lenses 0.9, 0.8 -> 2/4
    # one FP allowed: threshold just above 0.5 admits 0.75 (1 FP) and all 4 lenses -> 4/4
    y = [1, 1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.75, 0.5]
    assert M.tpr0(y, s) == pytest.approx(0.5)
    assert M.tpr_at_fp(y, s, 1) == pytest.approx(1.0)
    assert M.tpr10(y, s) == pytest.approx(1.0)


def test_tpr0_ties_with_highest_negative_do_not_count():
    # lenses 0.9 0.8 0.8, non-lenses 0.8 0.1: no threshold separates the lenses at 0.8 from the
    # non-lens at 0.8, so with zero FP only the lens at 0.9 is found -> 1/3
    y = [1, 1, 1, 0, 0]
    s = [0.9, 0.8, 0.8, 0.8, 0.1]
    assert M.tpr0(y, s) == pytest.approx(1 / 3)
    # one FP allowed: threshold at 0.8 -> 1 FP, 3 lenses -> 1.0
    assert M.tpr_at_fp(y, s, 1) == pytest.approx(1.0)
    # everything tied at the top: nothing can be admitted without a false positive
    assert M.tpr0([1, 1, 0], [0.8, 0.8, 0.8]) == 0.0


def test_tpr10_counts_false_positives():
    # 9 non-lenses at 0.51..0.59 (distinct) + 1 at 0.40; lenses 0.95 0.55 0.45 0.30
    # TPR0: above 0.59 -> only 0.95 -> 1/4
    # TPR10 (<= 9 FP): threshold just above 0.40 admits the 9 non-lenses and lenses 0.95 0.55 0.45 -> 3/4
    neg = [0.51, 0.52, 0.53, 0.54, 0.55, 0.56, 0.57, 0.58, 0.59, 0.40]
    pos = [0.95, 0.55, 0.45, 0.30]
    y = [1] * 4 + [0] * 10
    s = pos + neg
    assert M.tpr0(y, s) == pytest.approx(0.25)
    assert M.tpr10(y, s) == pytest.approx(0.75)
    assert M.tpr_at_fp(y, s, 10) == pytest.approx(1.0)  # 10 FP allowed: all four lenses


def test_tpr10_tied_group_exceeding_limit():
    # 10 non-lenses tied at 0.5 (+5 at 0.1); lenses 0.9 0.6 0.5 0.3.
    # Admitting the 0.5 group costs 10 FP > 9, so TPR10 = TPR0 = lenses {0.9, 0.6} = 2/4;
    # the lens tied at 0.5 does not count.
    y = [1, 1, 1, 1] + [0] * 15
    s = [0.9, 0.6, 0.5, 0.3] + [0.5] * 10 + [0.1] * 5
    assert M.tpr0(y, s) == pytest.approx(0.5)
    assert M.tpr10(y, s) == pytest.approx(0.5)


def test_tpr_degenerate_and_validation():
    assert M.tpr0([1, 1, 1], [0.1, 0.5, 0.9]) == 1.0  # no negatives: all lenses found, no FP
    assert M.tpr10([1, 1], [0.1, 0.2]) == 1.0
    assert math.isnan(M.tpr0([0, 0], [0.1, 0.2]))  # no lenses
    with pytest.raises(ValueError):
        M.tpr_at_fp([0, 1], [0.1, 0.2], -1)
    with pytest.raises(ValueError):
        M.tpr_at_fp([0, 1], [0.1, 0.2], 1.5)


def test_tpr_at_fp_matches_brute_force():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(y, 1.0), 1)
    n_pos = y.sum()
    for k in (0, 3, 9):
        best = 0.0
        for t in np.r_[np.inf, np.unique(s)]:
            pred = s >= t
            if np.sum(pred & (y == 0)) <= k:
                best = max(best, np.sum(pred & (y == 1)) / n_pos)
        assert M.tpr_at_fp(y, s, k) == pytest.approx(best)


# ------------------------------------------------------------------------------------------ summary dict


def test_classification_metrics_hand_case():
    m = M.classification_metrics(TIE_Y, TIE_S, threshold=0.5)
    # predicted lens (score >= 0.5): 0.8 (lens), 0.5 (lens), 0.5 (non-lens); 0.2 (non-lens) rejected
    # tp=2 fp=1 fn=0 tn=1
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (2, 1, 0, 1)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(1.0)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 0))  # 0.8
    assert m["roc_auc"] == pytest.approx(0.875)
    assert m["pr_auc"] == pytest.approx(0.5 + 1 / 3)
    assert m["tpr0"] == pytest.approx(0.5)  # only the 0.8 lens sits above the top non-lens (0.5)
    assert m["tpr10"] == pytest.approx(1.0)
    # ECE: bins 12 (0.8), 7 (0.5 x2), 3 (0.2): |1-.8|*1 + |.5-.5|*2 + |0-.2|*1 = 0.4, / 4 = 0.1
    assert m["ece"] == pytest.approx(0.1)
    assert (m["n"], m["n_pos"], m["n_neg"], m["threshold"]) == (4, 2, 2, 0.5)
    expected = {"accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc", "ece", "tpr0", "tpr10",
                "n", "n_pos", "n_neg", "threshold"}
    assert expected <= set(m)


def test_no_positives_is_nan_and_jsonable():
    m = M.classification_metrics([0, 0, 0], np.array([0.1, 0.2, 0.3]))
    assert math.isnan(m["roc_auc"]) and math.isnan(m["pr_auc"]) and math.isnan(m["tpr0"])
    assert math.isnan(m["recall"]) and math.isnan(m["precision"])  # nothing predicted, no lenses
    assert m["accuracy"] == 1.0 and m["n_pos"] == 0
    j = M.to_jsonable(m)
    assert j["roc_auc"] is None and j["tpr10"] is None
    json.dumps(j, allow_nan=False)  # strict JSON


def test_all_positives():
    m = M.classification_metrics([1, 1], [0.3, 0.9])
    assert math.isnan(m["roc_auc"])
    assert m["tpr0"] == 1.0 and m["tpr10"] == 1.0 and m["pr_auc"] == 1.0
    assert m["recall"] == pytest.approx(0.5) and m["precision"] == 1.0
    json.dumps(M.to_jsonable(m), allow_nan=False)


def test_to_jsonable_numpy_and_inf():
    obj = {"a": np.float32(1.5), "b": np.int64(3), "c": np.array([1.0, np.nan]), "d": (np.inf, -np.inf),
           "e": [{"f": np.bool_(True)}], 4: None}
    assert M.to_jsonable(obj) == {"a": 1.5, "b": 3, "c": [1.0, None], "d": [None, None],
                                  "e": [{"f": True}], "4": None}


def test_input_validation():
    with pytest.raises(ValueError, match="length"):
        M.roc_auc([0, 1], [0.5])
    with pytest.raises(ValueError, match="0 .non-lens. or 1"):
        M.roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="non-finite"):
        M.roc_auc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="empty"):
        M.classification_metrics([], [])
    assert M.roc_auc(np.array([False, True]), [0.1, 0.9]) == 1.0  # bool labels accepted


# ------------------------------------------------------------------------------------------ bootstrap


def _random_set(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(int)
    s = 1 / (1 + np.exp(-rng.normal(1.5 * (2 * y - 1), 1.5)))
    return y, np.round(s, 3)


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    y, s = _random_set()
    auc = M.roc_auc(y, s)
    lo, hi = M.bootstrap_ci(y, s, M.roc_auc, n_boot=300, seed=1)
    assert lo < auc < hi and 0 < hi - lo < 0.2
    assert M.bootstrap_ci(y, s, M.roc_auc, n_boot=300, seed=1) == (lo, hi)
    assert M.bootstrap_ci(y, s, M.roc_auc, n_boot=300, seed=2) != (lo, hi)
    # narrower at a lower confidence level
    lo80, hi80 = M.bootstrap_ci(y, s, M.roc_auc, n_boot=300, seed=1, alpha=0.2)
    assert lo <= lo80 <= hi80 <= hi


def test_bootstrap_fast_auc_path_equals_generic_loop():
    y, s = _random_set(n=150, seed=3)
    fast = M.bootstrap_ci(y, s, M.roc_auc, n_boot=200, seed=7)
    slow = M.bootstrap_ci(y, s, lambda a, b: M.roc_auc(a, b), n_boot=200, seed=7)
    assert fast == pytest.approx(slow, abs=1e-12)


def test_bootstrap_is_stratified_and_handles_degenerate():
    y, s = _random_set(n=100, seed=4)
    n_pos = int(np.sum(y))
    seen = []

    def count_pos(a, b):
        seen.append(int(np.sum(a)))
        return M.tpr10(a, b)

    lo, hi = M.bootstrap_ci(y, s, count_pos, n_boot=50)
    assert set(seen) == {n_pos} and lo <= M.tpr10(y, s) <= hi
    assert all(math.isnan(v) for v in M.bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], M.roc_auc, n_boot=20))


# ------------------------------------------------------------------------------------------ diagnostics


def test_completeness_by_bin_quantiles_and_edges():
    # lenses with values 1..10, found (score >= 0.5) when value > 5; non-lenses carry values but are ignored
    v_l = np.arange(1, 11, dtype=float)
    y = [1] * 10 + [0] * 3
    s = list(np.where(v_l > 5, 0.9, 0.1)) + [0.9, 0.9, 0.9]
    v = list(v_l) + [100.0, 200.0, np.nan]
    # 2 quantile bins among lenses: edges [1, 5.5, 10]; [1, 5.5) holds 1..5 (0 found), [5.5, 10] 6..10 (5 found)
    rows = M.completeness_by_bin(y, s, v, threshold=0.5, bins=2)
    assert [(r["lo"], r["hi"], r["n_lenses"], r["n_found"]) for r in rows] == [(1, 5.5, 5, 0), (5.5, 10, 5, 5)]
    assert [r["completeness"] for r in rows] == [0.0, 1.0]
    # explicit edges [0, 3, 20]: [0, 3) holds 1, 2 (0 found); [3, 20] holds 3..10 (5 of 8 found)
    rows = M.completeness_by_bin(y, s, v, threshold=0.5, bins=[0, 3, 20])
    assert [(r["n_lenses"], r["n_found"]) for r in rows] == [(2, 0), (8, 5)]
    assert rows[1]["completeness"] == pytest.approx(5 / 8)
    # 5 bins of 2 lenses each; counts add up
    rows = M.completeness_by_bin(y, s, v, threshold=0.5)
    assert [r["n_lenses"] for r in rows] == [2, 2, 2, 2, 2]
    json.dumps(M.to_jsonable(rows), allow_nan=False)


def test_completeness_by_bin_ties_and_no_lenses():
    rows = M.completeness_by_bin([1, 1, 1], [0.9, 0.1, 0.9], [2.0, 2.0, 2.0], 0.5, bins=4)
    assert len(rows) == 1 and rows[0]["n_lenses"] == 3 and rows[0]["n_found"] == 2
    assert M.completeness_by_bin([0, 0], [0.9, 0.1], [1.0, 2.0], 0.5) == []


def test_expected_contamination_hand_case():
    # 4 lenses, 2 above threshold -> TPR = 0.5 ; 10 non-lenses, 1 above -> FPR = 0.1 ; prior 0.01
    # FP/TP = 0.1 * 0.99 / (0.5 * 0.01) = 19.8 ; purity = 1 / 20.8
    y = [1] * 4 + [0] * 10
    s = [0.9, 0.8, 0.2, 0.1] + [0.7] + [0.1] * 9
    c = M.expected_contamination(y, s, threshold=0.5, prior=0.01)
    assert c["tpr"] == pytest.approx(0.5) and c["fpr"] == pytest.approx(0.1)
    assert c["fp_per_tp"] == pytest.approx(19.8)
    assert c["purity"] == pytest.approx(1 / 20.8)
    # no false positive on the set: estimate 0, purity 1, upper bound 1 - 0.05**(1/10)
    c0 = M.expected_contamination(y, s, threshold=0.75)
    assert c0["fp_per_tp"] == 0.0 and c0["purity"] == 1.0
    assert c0["fpr_upper95"] == pytest.approx(1 - 0.05 ** 0.1)
    # nothing found but false positives made: infinite contamination, JSON -> None
    cinf = M.expected_contamination([1, 0], [0.1, 0.9], threshold=0.5)
    assert math.isinf(cinf["fp_per_tp"]) and cinf["purity"] == 0.0
    assert M.to_jsonable(cinf)["fp_per_tp"] is None


# ------------------------------------------------------------------------------------------ temperature


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(0)
    z_true = rng.normal(0.0, 3.0, 20000)
    y = (rng.random(z_true.size) < 1 / (1 + np.exp(-z_true))).astype(int)
    logits = 2.0 * z_true  # overconfident by a factor 2 -> T = 2 calibrates
    t = M.fit_temperature(logits, y)
    assert t == pytest.approx(2.0, rel=0.06)
    # already calibrated -> T ~ 1; accepts (N, 1) arrays
    assert M.fit_temperature(z_true[:, None], y) == pytest.approx(1.0, rel=0.06)


def test_fit_temperature_separable_hits_lower_bound():
    t = M.fit_temperature([-3.0, -1.0, 1.0, 3.0], [0, 0, 1, 1])
    assert t == pytest.approx(1e-2, rel=1e-3)
    assert M.fit_temperature([0.0, 0.0], [0, 1]) == 1.0


# ------------------------------------------------------------------------------------------ plots


def test_plots_write_valid_png_atomically(tmp_path):
    y, s = _random_set(n=200)
    out = tmp_path / "sub" / "roc.png"
    assert M.plot_roc(y, s, out, title="test", extra_curves={"other": (y, s[::-1])}) == str(out)
    assert out.read_bytes()[:8] == PNG_MAGIC
    # degenerate curve (one class only) still writes a figure
    M.plot_roc([1, 1], [0.2, 0.4], tmp_path / "roc1.png")
    assert (tmp_path / "roc1.png").read_bytes()[:8] == PNG_MAGIC
    v = np.random.default_rng(1).random(y.size)
    rows = M.completeness_by_bin(y, s, v, threshold=0.5)
    cpath = tmp_path / "completeness.png"
    M.plot_completeness(rows, cpath, "einstein_area")
    assert cpath.read_bytes()[:8] == PNG_MAGIC
    # rows round-tripped through JSON (None completeness) are accepted too
    M.plot_completeness(M.to_jsonable(rows + [{"lo": 1, "hi": 2, "n_lenses": 0, "n_found": 0,
                                                "completeness": float("nan")}]), cpath, "x")
    assert sorted(os.listdir(tmp_path)) == ["completeness.png", "roc1.png", "sub"]
    assert os.listdir(tmp_path / "sub") == ["roc.png"]  # no temp files left behind
    if "matplotlib.pyplot" in sys.modules:  # no pyplot figures leaked
        assert sys.modules["matplotlib.pyplot"].get_fignums() == []
