"""What searches report (issue 24, item 5): purity@N, completeness@N, completeness at purity, at a survey prior.

Every expected value is worked out by hand in the comments, on ten scores (no ties) and on small tied cases.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from dali_lens import metrics as M

# ten scores, highest first, no ties:  L L N L N N L N N N   (4 lenses, 6 non-lenses)
Y10 = [1, 1, 0, 1, 0, 0, 1, 0, 0, 0]
S10 = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]


def rows(y, s, ns, prior=None):
    return {r["n"]: r for r in M.at_n(y, s, ns, prior)}


def test_purity_and_completeness_at_n_by_hand():
    r = rows(Y10, S10, (1, 2, 3, 5, 7, 20))
    # top 1: L -> 1/1; top 2: LL -> 2/2; top 3: LLN -> 2/3; top 5: LLNLN -> 3/5; top 7: + N L -> 4/7
    assert [r[n]["purity"] for n in (1, 2, 3, 5, 7)] == pytest.approx([1, 1, 2 / 3, 3 / 5, 4 / 7])
    # completeness: the share of the 4 lenses in the top N
    assert [r[n]["completeness"] for n in (1, 2, 3, 5, 7)] == pytest.approx([1 / 4, 2 / 4, 2 / 4, 3 / 4, 1])
    # N = 20 is capped at the split's 10: every sample, purity 4/10, completeness 1
    assert r[20]["n_used"] == 10 and r[20]["purity"] == pytest.approx(0.4) and r[20]["completeness"] == 1.0


def test_completeness_at_purity_by_hand():
    # thresholds (score >= t): .9 P=1 R=.25 | .8 P=1 R=.5 | .7 P=2/3 | .6 P=3/4 R=.75 | .5 P=3/5 | .4 P=1/2 R=.75
    #                          .3 P=4/7 R=1 | .2 P=4/8=.5 R=1 | .1 P=4/9 | .05 P=.4
    assert M.completeness_at_purity(Y10, S10, 0.9) == (0.5, 0.8)
    assert M.completeness_at_purity(Y10, S10, 0.75) == (0.75, 0.6)
    # purity >= 50 %: completeness 1 is reached at .3 (4/7) and at .2 (exactly 1/2): the highest threshold is given
    assert M.completeness_at_purity(Y10, S10, 0.5) == (1.0, 0.3)
    # nothing but "admit nothing" is that pure: 0, no threshold
    c, t = M.completeness_at_purity([0, 1], [0.9, 0.1], 0.9)
    assert c == 0.0 and math.isnan(t)


def test_the_purity_curve_is_scikit_learns_precision_recall_curve():
    from sklearn.metrics import precision_recall_curve

    p, r, t = M.purity_completeness_curve(Y10, S10)
    p2, r2, t2 = precision_recall_curve(Y10, S10)
    np.testing.assert_array_equal(p, p2)
    np.testing.assert_array_equal(r, r2)
    np.testing.assert_array_equal(t, t2)


def test_at_the_prior_by_hand():
    # prior 0.1: a non-lens weighs w = (0.9 / 0.1) * 4 / 6 = 6; the population is 4 + 6*6 = 40 = 4 / 0.1
    assert M.nonlens_weight(Y10, 0.1) == pytest.approx(6.0)
    r = rows(Y10, S10, (1, 2, 5, 20, 50), prior=0.1)
    # cumulative weight down the ranking: L1 L2 N8 L9 N15 N21 L22 N28 N34 N40
    # top 5: L L and 3 of the first non-lens's 6 -> 2 lenses, purity 2/5
    assert r[5]["lenses"] == pytest.approx(2) and r[5]["purity"] == pytest.approx(0.4)
    assert r[5]["completeness"] == pytest.approx(0.5)
    # top 20: down to the 2nd non-lens (15), then 5 of the 3rd non-lens's 6 -> 3 lenses, purity 3/20
    assert r[20]["purity"] == pytest.approx(0.15) and r[20]["completeness"] == pytest.approx(0.75)
    # N = 50 is capped at the population, 40: its purity is the prior itself
    assert r[50]["n_used"] == pytest.approx(40) and r[50]["purity"] == pytest.approx(0.1)
    # purity at the prior: .8 -> 2/2 | .7 -> 2/(2+6) | .6 -> 3/9 | .3 -> 4/(4+18): only .8 reaches 50 %
    assert M.completeness_at_purity(Y10, S10, 0.5, prior=0.1) == (0.5, 0.8)
    # the same reweighting as expected_contamination: the curve's purity at each threshold is its purity
    p, _, t = M.purity_completeness_curve(Y10, S10, prior=0.1)
    for pk, tk in zip(p[:-1], t):
        assert pk == pytest.approx(M.expected_contamination(Y10, S10, tk, prior=0.1)["purity"])


def test_ties_enter_pro_rata_and_do_not_depend_on_row_order():
    # scores .5 .5 .5 .1 with labels L N L N: the tied group of three holds 2 lenses
    y, s = [1, 0, 1, 0], [0.5, 0.5, 0.5, 0.1]
    r = rows(y, s, (1, 2, 3, 4))
    assert [r[n]["lenses"] for n in (1, 2, 3, 4)] == pytest.approx([2 / 3, 4 / 3, 2, 2])
    assert [r[n]["purity"] for n in (1, 2, 3, 4)] == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 2])
    assert r[1]["completeness"] == pytest.approx(1 / 3)
    # ... the mean over every order of the tied rows, and the same whatever order the rows come in
    for n in (1, 2):
        means = [sum(y[i] for i in order[:n]) / n for order in itertools.permutations(range(3))]
        assert r[n]["purity"] == pytest.approx(np.mean(means))
    for perm in itertools.permutations(range(4)):
        rp = rows([y[i] for i in perm], [s[i] for i in perm], (1, 2, 3, 4))
        assert [rp[n]["purity"] for n in (1, 2, 3, 4)] == pytest.approx([r[n]["purity"] for n in (1, 2, 3, 4)])
    # at a prior a tied group enters by weight: prior .25 -> w = 3 * 2/2 = 3; group (.5: L + N) weighs 1 + 3
    r = rows([1, 0, 1, 0], [0.5, 0.5, 0.1, 0.1], (2,), prior=0.25)
    assert r[2]["lenses"] == pytest.approx(0.5) and r[2]["purity"] == pytest.approx(0.25)
    # a tied threshold admits the whole group (TIE case: L .8, L .5, N .5, N .2)
    assert M.completeness_at_purity([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2], 0.9) == (0.5, 0.8)
    assert M.completeness_at_purity([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2], 0.6) == (1.0, 0.5)


def test_distinct_scores_match_counting_the_sorted_list():
    rng = np.random.default_rng(0)
    y = (rng.uniform(size=300) < 0.2).astype(int)
    s = rng.permutation(300) / 300.0
    ranked = y[np.argsort(-s)]
    r = rows(y, s, (1, 7, 50, 299, 300, 1000))
    for n, row in r.items():
        k = min(n, 300)
        assert row["n_used"] == k
        assert row["purity"] == pytest.approx(ranked[:k].sum() / k)
        assert row["completeness"] == pytest.approx(ranked[:k].sum() / y.sum())


def test_degenerate_sets_and_bad_values():
    # no lenses: purity@N is 0, completeness and completeness at purity undefined; at a prior everything is
    r = M.search_metrics([0, 0, 0], [0.3, 0.2, 0.1], (2,), prior=0.01)
    assert r["purity_at_n"]["2"] == 0.0 and math.isnan(r["completeness_at_n"]["2"])
    assert math.isnan(r["completeness_at_purity"]["0.9"]) and math.isnan(r["prior"]["purity_at_n"]["2"])
    # only lenses: pure everywhere
    r = M.search_metrics([1, 1], [0.3, 0.2], (1, 5), prior=0.01)
    assert r["purity_at_n"] == {"1": 1.0, "5": 1.0} and r["n_used"]["5"] == 2
    assert r["completeness_at_purity"]["0.9"] == 1.0 and math.isnan(r["prior"]["completeness_at_purity"]["0.9"])
    assert M.to_jsonable(r)["prior"]["purity_at_n"]["1"] is None
    with pytest.raises(ValueError, match="N must be >= 1"):
        M.at_n(Y10, S10, (0,))
    with pytest.raises(ValueError, match="prior"):
        M.search_metrics(Y10, S10, prior=1.0)
    with pytest.raises(ValueError, match="purity"):
        M.completeness_at_purity(Y10, S10, 0.0)


def test_search_metrics_keys_and_the_log_line():
    r = M.search_metrics(Y10, S10, (2, 5, 20), prior=0.1)
    assert r["at_n"] == [2, 5, 20] and r["purity_targets"] == [0.5, 0.9]
    assert r["purity_at_n"] == pytest.approx({"2": 1.0, "5": 0.6, "20": 0.4})
    assert r["completeness_at_purity"] == {"0.5": 1.0, "0.9": 0.5}
    assert r["threshold_at_purity"] == {"0.5": 0.3, "0.9": 0.8}
    assert r["prior"]["population"] == pytest.approx(40) and r["prior"]["purity_at_n"]["5"] == pytest.approx(0.4)
    text = M.format_search(M.to_jsonable(r), "test")
    first, second = text.splitlines()
    assert first == ("test: purity@2 1.000 @5 0.600 @20(10) 0.400  completeness@2 0.500 @5 0.750 @20(10) 1.000  "
                     "completeness at purity 50% 1.000 90% 0.500")
    assert second.startswith("test: at prior 0.1 (a survey of 40): purity@2 1.000 @5 0.400 @20 0.150")
