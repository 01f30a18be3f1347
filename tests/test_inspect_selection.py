"""``inspect --uncertain N`` / ``--disagree N`` (the most informative candidates to grade next) and
``inspect --summary``'s purity@N, completeness@N and completeness at purity of the graded set (issue 24)."""
from __future__ import annotations

import csv
import json
import os
import re

import pytest

from conftest import command_module, write_dataset
from dali_lens.data import discover
from dali_lens.metrics import format_search, search_metrics

cmd = command_module("inspect")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("sel") / "data"), "npy", n_per_class=4, size=16,
                         splits=("test",))


def _samples(root):
    return [s for ds in discover(root, val_fraction=0).values() for s in ds.samples]


def _write(path, root, scores, members=None, std=True):
    """A predictions CSV for the samples of ``root`` with the given scores (and member scores)."""
    header = ["file", "id", "label", "score"]
    if members:
        header += ["score_a", "score_b"] + (["member_std"] if std else [])
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for k, s in enumerate(_samples(root)):
            row = [s.path, s.id, s.label, scores[k]]
            if members:
                a, b = members[k]
                row += [a, b] + ([abs(a - b) / 2] if std else [])
            w.writerow(row)
    return path


def _page(out):
    text = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    return json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S).group(1))


SCORES = [0.95, 0.52, 0.10, 0.47, 0.70, 0.55, 0.30, 0.49]  # distance to 0.5: .45 .02 .4 .03 .2 .05 .2 .01


def test_uncertain_picks_the_scores_nearest_the_threshold(data, tmp_path):
    preds = _write(str(tmp_path / "p.csv"), data, SCORES)
    out = str(tmp_path / "look")
    assert cmd.main([preds, data, "--out", out, "--uncertain", "3"]) == 0
    page = _page(out)
    assert [c["score"] for c in page["candidates"]] == [0.49, 0.52, 0.47]
    assert all(c["groups"] == ["uncertain"] for c in page["candidates"]) and "uncertain" in page["title"]
    # another threshold; .70 and .30 are equally near .5 -> at --threshold 0.5 the higher first
    out2 = str(tmp_path / "look2")
    assert cmd.main([preds, data, "--out", out2, "--uncertain", "2", "--threshold", "0.9"]) == 0
    assert [c["score"] for c in _page(out2)["candidates"]] == [0.95, 0.70]
    out3 = str(tmp_path / "look3")
    assert cmd.main([preds, data, "--out", out3, "--uncertain", "6", "--top", "1"]) == 0
    shown = _page(out3)["candidates"]
    assert [c["score"] for c in shown] == [0.95, 0.49, 0.52, 0.47, 0.55, 0.70, 0.30][:len(shown)]
    assert shown[0]["groups"] == ["top"] and len(shown) == 7  # each candidate once, the top one first


def test_disagree_picks_the_largest_ensemble_spread(data, tmp_path, capsys):
    members = [(0.9, 1.0), (0.1, 0.94), (0.1, 0.1), (0.2, 0.74), (0.7, 0.7), (0.5, 0.6), (0.0, 0.6), (0.45, 0.53)]
    scores = [(a + b) / 2 for a, b in members]  # spreads |a-b|/2: .05 .42 0 .27 0 .05 .3 .04
    preds = _write(str(tmp_path / "p.csv"), data, scores, members)
    out = str(tmp_path / "look")
    assert cmd.main([preds, data, "--out", out, "--disagree", "3"]) == 0
    page = _page(out)
    assert [c["spread"] for c in page["candidates"]] == pytest.approx([0.42, 0.3, 0.27])
    assert all("disagree" in c["groups"] for c in page["candidates"])
    # without member_std the spread is the members' standard deviation (the same for two members)
    no_std = _write(str(tmp_path / "q.csv"), data, scores, members, std=False)
    out2 = str(tmp_path / "look2")
    assert cmd.main([no_std, data, "--out", out2, "--disagree", "3"]) == 0
    assert [c["spread"] for c in _page(out2)["candidates"]] == pytest.approx([0.42, 0.3, 0.27])
    # a single model's predictions: one error line naming the file, nothing written
    single = _write(str(tmp_path / "s.csv"), data, SCORES)
    capsys.readouterr()
    assert cmd.main([single, data, "--out", str(tmp_path / "look3"), "--disagree", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "s.csv" in err[0] and "--disagree needs" in err[0]
    assert not os.path.exists(tmp_path / "look3" / "index.html")


def test_summary_reports_purity_and_completeness_at_n_of_the_graded(tmp_path, capsys):
    grades = tmp_path / "grades.csv"
    # ranked by score: a(3) b(2) c(0) d(1) e(3) f(0) g(0); h has no score. Lenses (2-3): a, b, e
    grades.write_text("id,grade,score\na,3,0.99\nb,2,0.98\nc,0,0.97\nd,1,0.95\ne,3,0.9\nf,0,0.3\ng,0,0.2\nh,2,\n")
    assert cmd.main(["--grades", str(grades), "--summary", "--at-n", "2,4,10"]) == 0
    text = capsys.readouterr().out
    # top 2: a b -> purity 1, completeness 2/3; top 4: a b c d -> 2/4, 2/3; 10 capped at the 7 scored: 3/7, 1
    # purity >= 90 %: down to .98 (2 of 3 lenses); >= 50 %: down to .9 (3/5) -> completeness 1
    expected = ("graded: purity@2 1.000 @4 0.500 @10(7) 0.429  completeness@2 0.667 @4 0.667 @10(7) 1.000  "
                "completeness at purity 50% 1.000 90% 0.667")
    assert expected in text.splitlines()
    y, s = [1, 1, 0, 0, 1, 0, 0], [0.99, 0.98, 0.97, 0.95, 0.9, 0.3, 0.2]
    assert format_search(search_metrics(y, s, (2, 4, 10), prior=None), "graded") == expected  # the same functions
    assert "purity (2-3)" in text  # the table by score bin stays
