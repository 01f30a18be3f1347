"""``python -m dali_lens.inspect``: thumbnails from their own cutouts in every source kind, placeholders for
broken files, unknown ids by name, grades and purity, the train/evaluate galleries, and the grading page driven
with real keyboard events in a real headless browser (Debian's chromium; skipped, with the reason, without it).
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import write_dataset
from dali_lens import inspect as cmd
from dali_lens.data import discover
from dali_lens.data.readers import read_sample
from dali_lens.inspection import inspect_predictions
from dali_lens.inspection.composite import MASK_COLOUR, default_rgb_bands, thumbnail


# ---------------------------------------------------------------------------------------------------------
# helpers


def write_predictions(path, root, seed=0, labels=True, members=False, extra_rows=()):
    """A predictions CSV for every sample of ``root`` (as predict/evaluate write it), random scores."""
    rng = np.random.default_rng(seed)
    header = ["file", "id"] + (["label"] if labels else []) + ["score"]
    if members:
        header += ["score_a", "score_b", "member_std"]
    rows = []
    for ds in discover(root, val_fraction=0).values():
        for s in ds.samples:
            a, b = rng.uniform(size=2)
            row = [s.path, s.id] + (["" if s.label is None else s.label] if labels else []) + [f"{(a + b) / 2:.6f}"]
            if members:
                row += [f"{a:.6f}", f"{b:.6f}", f"{abs(a - b) / 2:.6f}"]
            rows.append(row)
    rows.extend(extra_rows)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def page_data(out):
    text = open(os.path.join(out, "index.html"), encoding="utf-8").read()
    m = re.search(r'<script id="data" type="application/json">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def pixels(uri):
    assert uri.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB"))


def expected_thumbnails(root, mask_value=None):
    """id-free map: sample path -> the thumbnail of that very cutout, read straight from the data."""
    out = {}
    for ds in discover(root, val_fraction=0).values():
        for s in ds.samples:
            out[s.path] = thumbnail(read_sample(s, ds, check=False), ds.pixel_kind, default_rgb_bands(ds), mask_value)
    return out


def shown_by_path(out, pred_csv):
    """sample path -> thumbnail pixels in the page (ids may repeat across splits; the page order is the
    selection order, which we map back through the predictions' score ranking)."""
    rows = list(csv.DictReader(open(pred_csv)))
    data = page_data(out)
    by_id_score = {(r["id"], f"{float(r['score']):.6f}"): r["file"] for r in rows}
    return {by_id_score[(c["id"], f"{c['score']:.6f}")]: pixels(c["img"]) for c in data["candidates"]}


@pytest.fixture
def npy_data(tmp_path):
    root = write_dataset(str(tmp_path / "npy"), "npy", n_per_class=5, size=24, bands=3, seed=1)
    return root, write_predictions(str(tmp_path / "preds.csv"), root, seed=2)


# ---------------------------------------------------------------------------------------------------------
# thumbnails come from their own cutouts


def test_planted_cutout_is_found_in_its_own_thumbnail_only(npy_data, tmp_path):
    root, preds = npy_data
    planted = os.path.join(root, "test", "nonlens", "nonlens003.npy")
    arr = np.zeros((3, 24, 24), np.float32)
    arr[0, 2:10, 2:10] = 1000.0  # band 0 -> blue (R,G,B = bands 2,1,0): a blue square top left, nothing else
    np.save(planted, arr)
    out = str(tmp_path / "look")
    res = inspect_predictions(preds, root, out, top=100)
    data = page_data(out)
    assert res["shown"] == len(data["candidates"]) == 20 and not res["problems"]
    scores = [c["score"] for c in data["candidates"]]
    assert scores == sorted(scores, reverse=True)
    rows = {r["file"]: r for r in csv.DictReader(open(preds))}
    mine = [c for c in data["candidates"] if c["score"] == pytest.approx(float(rows[planted]["score"]), abs=1e-6)
            and c["id"] == "nonlens003"]
    assert len(mine) == 1 and mine[0]["label"] == 0
    assert data["candidates"].index(mine[0]) not in (0, len(scores) - 1)  # not trivially first or last

    def is_planted(px):
        sq, rest = px[2:10, 2:10].astype(int), px.astype(int).copy()
        rest[2:10, 2:10] = 0
        return sq[..., 2].mean() > 150 and sq[..., :2].mean() < 40 and rest.max() < 30

    hits = [c["id"] for c in data["candidates"] if is_planted(pixels(c["img"]))]
    assert hits == ["nonlens003"]
    # and every other thumbnail is its own cutout's (ids repeat across train/test: matched by file path)
    expect = expected_thumbnails(root)
    for path, px in shown_by_path(out, preds).items():
        np.testing.assert_array_equal(px, expect[path], err_msg=path)
    assert Image.open(os.path.join(out, "gallery.png")).size[0] > 600


def _challenge(root):
    from dali_lens.data.synthetic import generate_dataset

    generate_dataset(root, n=12, layout="challenge", track="ground", seed=0)
    return root


def _shards(root, tmp_path):
    from dali_lens.pack import main as pack

    src = write_dataset(str(tmp_path / "src"), "npy", n_per_class=4, size=20, bands=3, seed=5)
    assert pack([src, root, "--val-fraction", "0"]) == 0
    return root


@pytest.mark.parametrize("kind", ["png", "jpeg", "npy", "fits-hdus", "fits-1band", "challenge", "shards"])
def test_every_source_kind(kind, tmp_path):
    root = str(tmp_path / kind)
    if kind in ("png", "jpeg", "npy"):
        write_dataset(root, kind, n_per_class=3, size=20, bands=3, seed=3)
    elif kind == "fits-hdus":
        write_dataset(root, "fits", n_per_class=3, size=20, bands=3, seed=3)
    elif kind == "fits-1band":
        write_dataset(root, "fits", n_per_class=3, size=20, bands=1, seed=3)
    elif kind == "challenge":
        _challenge(root)
    else:
        _shards(root, tmp_path)
    preds = write_predictions(str(tmp_path / "p.csv"), root, seed=4, members=True)
    out = str(tmp_path / "out")
    assert cmd.main([preds, root, "--out", out, "--top", "5", "--bottom", "5", "--false-positives", "2",
                     "--missed", "2"]) == 0
    data = page_data(out)
    assert 5 < len(data["candidates"]) <= 14 and not any(c["problem"] for c in data["candidates"])
    assert all(c["spread"] is not None and "±" in c["caption"][1] for c in data["candidates"])
    mask = 100.0 if kind == "challenge" else None
    expect = expected_thumbnails(root, mask)
    for path, px in shown_by_path(out, preds).items():
        np.testing.assert_array_equal(px, expect[path], err_msg=path)
        if kind in ("png", "jpeg"):  # PNG/JPEG cutouts are shown as they are
            np.testing.assert_array_equal(px, np.asarray(Image.open(path).convert("RGB")))
        if kind == "fits-1band":  # greyscale
            assert (px[..., 0] == px[..., 1]).all() and (px[..., 1] == px[..., 2]).all()
    assert os.path.getsize(os.path.join(out, "gallery.png")) > 0


def test_masked_pixels_are_flat_and_do_not_drive_the_stretch():
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 1, (4, 30, 30)).astype(np.float32)
    arr[:, 12:18, 12:18] += 50
    clean = thumbnail(arr, "fits-bands", (1, 0, 2), 100.0)
    masked = arr.copy()
    masked[2, 0:5, :] = 100.0
    masked[0, 25:, 25:] = np.nan
    shown = thumbnail(masked, "fits-bands", (1, 0, 2), 100.0)
    assert (shown[0:5] == MASK_COLOUR).all() and (shown[25:, 25:] == MASK_COLOUR).all()
    # the rest of the image is stretched as without the masked pixels (not crushed to black by 100s)
    assert np.abs(shown[8:24, :24].astype(int) - clean[8:24, :24].astype(int)).mean() < 3
    assert thumbnail(arr[:1], "npy").shape == (30, 30, 3)


# ---------------------------------------------------------------------------------------------------------
# bad input


def test_broken_file_gets_a_placeholder_and_the_rest_is_written(npy_data, tmp_path, capsys):
    root, preds = npy_data
    broken = os.path.join(root, "test", "lens", "lens002.npy")
    with open(broken, "wb") as fh:
        fh.write(b"\x93NUMPY garbage")
    out = str(tmp_path / "look")
    assert cmd.main([preds, root, "--out", out, "--top", "100"]) == 0
    err = capsys.readouterr().err
    assert "lens002" in err and broken in err and "placeholder" in err
    data = page_data(out)
    bad = [c for c in data["candidates"] if c["problem"]]
    assert len(bad) == 1 and bad[0]["id"] == "lens002" and broken in bad[0]["problem"]
    assert bad[0]["caption"][2].startswith("NOT SHOWN")
    px = pixels(bad[0]["img"])
    assert px.shape[0] >= 64 and (np.median(px.reshape(-1, 3), 0) == (70, 20, 20)).all()  # the placeholder
    assert len(data["candidates"]) == 20 and os.path.getsize(os.path.join(out, "gallery.png")) > 0


def test_unknown_ids_are_reported_by_name(npy_data, tmp_path, capsys):
    root, _ = npy_data
    preds = write_predictions(str(tmp_path / "p.csv"), root, seed=2,
                              extra_rows=[["/nowhere/ghost-42.npy", "ghost-42", "1", "0.999"]])
    ids = tmp_path / "ids.txt"
    ids.write_text("# follow-up\nghost-42\nnobody-7\n")
    out = str(tmp_path / "look")
    assert cmd.main([preds, root, "--out", out, "--ids", str(ids)]) == 0
    err = capsys.readouterr().err
    assert "ghost-42" in err and "not found in" in err
    assert "nobody-7" in err and "not in p.csv" in err
    data = page_data(out)
    assert [c["id"] for c in data["candidates"]] == ["ghost-42"]
    assert data["candidates"][0]["problem"] == "not in the data"


def test_bad_options_and_files_exit_2(npy_data, tmp_path, capsys):
    root, preds = npy_data
    unlabelled = write_predictions(str(tmp_path / "u.csv"), root, labels=False)
    for argv, text in [([str(tmp_path / "none.csv"), root], "none.csv: no such file"),
                       ([unlabelled, str(tmp_path / "nodata")], "no such file or directory"),
                       ([preds, root, "--rgb-bands", "0,1,7"], "--rgb-bands 0,1,7"),
                       (["--grades", str(tmp_path / "g.csv"), "--summary"], "g.csv: no such file")]:
        assert cmd.main(argv + ["--out", str(tmp_path / "o")]) == 2, argv
        assert text in capsys.readouterr().err
    # labels missing from the predictions come from the data; without labels anywhere --missed is refused
    assert cmd.main([unlabelled, root, "--out", str(tmp_path / "o2"), "--missed", "3"]) == 0
    assert [c["kind"] for c in page_data(str(tmp_path / "o2"))["candidates"]] == ["missed"] * 3
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in os.listdir(os.path.join(root, "test", "lens")):
        shutil.copy(os.path.join(root, "test", "lens", name), flat / name)
    loose = write_predictions(str(tmp_path / "l.csv"), str(flat), labels=False)
    assert cmd.main([loose, str(flat), "--out", str(tmp_path / "o4"), "--missed", "3"]) == 2
    assert "--false-positives/--missed need labels" in capsys.readouterr().err
    out = str(tmp_path / "o3")
    assert cmd.main([preds, root, "--out", out]) == 0
    assert cmd.main([preds, root, "--out", out]) == 2  # nothing a user wrote is overwritten
    assert "refusing to overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cmd.main([preds])


# ---------------------------------------------------------------------------------------------------------
# selection, marks, grades


def test_false_positives_and_missed_are_selected_and_marked(npy_data, tmp_path):
    root, preds = npy_data
    rows = list(csv.DictReader(open(preds)))
    out = str(tmp_path / "look")
    inspect_predictions(preds, root, out, false_positives=3, missed=2)
    data = page_data(out)
    non = sorted((float(r["score"]) for r in rows if r["label"] == "0"), reverse=True)[:3]
    lens = sorted(float(r["score"]) for r in rows if r["label"] == "1")[:2]
    fp = [c["score"] for c in data["candidates"] if c["kind"] == "false-positive"]
    mi = [c["score"] for c in data["candidates"] if c["kind"] == "missed"]
    assert fp == pytest.approx(non, abs=1e-6) and mi == pytest.approx(lens, abs=1e-6)
    assert all("FALSE POSITIVE" in c["caption"][2] for c in data["candidates"] if c["kind"] == "false-positive")


def test_grades_summary_and_import(npy_data, tmp_path, capsys):
    root, preds = npy_data
    grades = tmp_path / "grades.csv"
    grades.write_text("id,grade,score\n"
                      "a,3,0.99\nb,2,0.995\nc,0,0.991\nd,1,0.95\ne,3,0.96\nf,0,0.3\ng,0,0.2\nh,2,\n")
    assert cmd.main(["--grades", str(grades), "--summary"]) == 0
    text = capsys.readouterr().out
    lines = {ln.split()[0] + ln.split()[1]: ln.split() for ln in text.splitlines() if ln.startswith("[")}
    assert lines["[0.99,1]"][2:] == ["3", "1", "0", "1", "1", "0.667", "0.667"]
    assert lines["[0.95,0.99)"][2:] == ["2", "0", "1", "0", "1", "0.500", "1.000"]
    assert lines["[0,0.5)"][2:] == ["2", "2", "0", "0", "0", "0.000", "0.000"]
    assert "1 graded candidate(s) without a score" in text
    bad = tmp_path / "bad.csv"
    bad.write_text("id,grade,score\nx,7,0.5\n")
    assert cmd.main(["--grades", str(bad), "--summary"]) == 2
    assert "grade '7' is not 0, 1, 2 or 3" in capsys.readouterr().err
    # brought into a new page
    rows = list(csv.DictReader(open(preds)))
    first = max(rows, key=lambda r: float(r["score"]))
    grades.write_text(f"id,grade,score\n{first['id']},2,{first['score']}\nnot-shown,1,0.1\n")
    out = str(tmp_path / "look")
    assert cmd.main([preds, root, "--out", out, "--top", "1", "--grades", str(grades)]) == 0
    assert page_data(out)["grades"] == {first["id"]: 2}


# ---------------------------------------------------------------------------------------------------------
# train and evaluate write the galleries of their test split


def test_train_and_evaluate_write_galleries_unless_turned_off(tmp_path):
    from dali_lens import evaluate as E
    from dali_lens.data.synthetic import generate_dataset
    from dali_lens.trainers import TrainConfig, run

    data = str(tmp_path / "data")
    generate_dataset(data, n=120, size=24, seed=3)
    out = str(tmp_path / "run")
    cfg = dict(data_root=data, epochs=1, batch_size=32, img_size=24, progress=False, workers=1,
               backend="torchvision", patience=0)
    run(TrainConfig(out=out, **cfg), log=lambda *a, **k: None)
    data_g = page_data(os.path.join(out, "gallery"))
    rows = list(csv.DictReader(open(os.path.join(out, "predictions.csv"))))
    n_lens = sum(r["label"] == "1" for r in rows)
    assert len(data_g["candidates"]) == len(rows) and n_lens > 0  # < 50 of each: the whole test split
    # marked only on the wrong side of the threshold (0.5), whichever list picked them
    for c in data_g["candidates"]:
        wrong = {0: c["score"] >= 0.5, 1: c["score"] < 0.5}[c["label"]]
        assert c["kind"] == ({0: "false-positive", 1: "missed"}[c["label"]] if wrong else ""), c
    assert os.path.getsize(os.path.join(out, "gallery", "gallery.png")) > 0
    run(TrainConfig(out=str(tmp_path / "run2"), gallery=False, **cfg), log=lambda *a, **k: None)
    assert not os.path.exists(os.path.join(str(tmp_path / "run2"), "gallery"))
    ev = str(tmp_path / "eval")
    assert E.main(["-c", out, data, "--out", ev, "--n-boot", "0", "--no-progress", "--backend", "torchvision"]) == 0
    assert len(page_data(os.path.join(ev, "gallery"))["candidates"]) == len(rows)
    ev2 = str(tmp_path / "eval2")
    assert E.main(["-c", out, data, "--out", ev2, "--n-boot", "0", "--no-progress", "--backend", "torchvision",
                   "--no-gallery"]) == 0
    assert not os.path.exists(os.path.join(ev2, "gallery"))


# ---------------------------------------------------------------------------------------------------------
# the page in a real browser: keyboard grading, reload, export


from _browser import _browser, _chromium, _js, export_grades, press_key, reload, wait_cards  # noqa: E402


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run "
                                                "installs it): the grading page is not tested in a browser")
def test_grading_page_in_a_real_browser(npy_data, tmp_path):
    root, preds = npy_data
    out = str(tmp_path / "look")
    inspect_predictions(preds, root, out, top=6)
    cands = page_data(out)["candidates"]  # highest score first, as the page shows them by default
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    with _browser(tmp_path / "profile") as cdp:
        cdp.call("Browser.setDownloadBehavior", behavior="allow", downloadPath=str(downloads), eventsEnabled=True)
        url = "file://" + os.path.join(out, "index.html")
        target = cdp.call("Target.createTarget", url=url)["targetId"]
        sid = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

        def js(expr):
            return _js(cdp, sid, expr)

        wait_cards(cdp, sid, len(cands))
        cdp.call("Page.bringToFront", sid)
        # grade 3 the first, skip the second, 0 the third, step right and back, 1 the fourth
        for key in ["3", "s", "0", "ArrowRight", "ArrowLeft", "1"]:
            press_key(cdp, sid, key)
        assert js("document.querySelector('.card.cur').dataset.id") == cands[4]["id"]
        assert js("document.getElementById('count').textContent") == "graded 3 / 6 (shown 6)"  # and stored:
        stored = json.loads(js(f"localStorage.getItem('dali-lens-grades:' + {json.dumps(page_data(out)['key'])})"))
        assert stored == {cands[0]["key"]: 3, cands[2]["key"]: 0, cands[3]["key"]: 1}
        reload(cdp, sid)
        wait_cards(cdp, sid, len(cands))
        assert js("document.getElementById('count').textContent").startswith("graded 3 / 6")  # kept in the browser
        # the filter by label and the sort by score
        def choose(select, value):
            return js(f"(() => {{ const s = document.getElementById('{select}'); s.value = '{value}';"
                      "s.dispatchEvent(new Event('change'));"
                      "return Array.from(document.querySelectorAll('#grid .card')).map(d => d.dataset.i).join(','); })()")

        non = [str(i) for i, c in enumerate(cands) if c["label"] == 0]
        assert choose("filter", "nonlens") == ",".join(non) and 0 < len(non) < len(cands)
        assert choose("filter", "graded") == "0,2,3"
        assert choose("filter", "all") == "0,1,2,3,4,5"
        assert choose("sort", "asc") == "5,4,3,2,1,0"
        target_csv = export_grades(cdp, sid, downloads)
        rows = list(csv.reader(open(target_csv)))
    assert rows[0] == ["id", "grade", "score"]
    want = [(cands[0], "3"), (cands[2], "0"), (cands[3], "1")]
    assert [(r[0], r[1]) for r in rows[1:]] == [(c["key"], g) for c, g in want]
    assert [float(r[2]) for r in rows[1:]] == pytest.approx([c["score"] for c, _ in want])
    # and the exported file is what --summary and --grades read
    from dali_lens.inspection import read_grades

    assert read_grades(str(target_csv)) == {c["key"]: (int(g), pytest.approx(c["score"])) for c, g in want}


def test_benchmark_script_runs_quick(tmp_path):
    """`python -m benchmarks.bench_inspect --quick` runs and writes its JSON (a smoke test, not a speed test)."""
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "inspect.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_inspect", "--quick",
                           "--out", str(out)], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.load(open(out))
    assert doc["thumbnails"] == 30 and doc["runs"][0]["problems"] == 0 and doc["machine"]["usable_cores"] >= 1
    assert doc["best_seconds"] > 0 and doc["meets_target"] is None  # a quick run measures nothing


def test_marks_follow_the_threshold_not_the_list_that_picked():
    """--missed picks the lowest-scoring lenses; one scoring 0.998 is not 'MISSED' (nor a non-lens at 0.1 a false
    positive): the mark means on the wrong side of --threshold."""
    from dali_lens.inspection.candidates import Candidate, select

    cands = [Candidate(id="a", score=0.999, label=1), Candidate(id="b", score=0.998, label=1),
             Candidate(id="c", score=0.1, label=0), Candidate(id="d", score=0.7, label=0),
             Candidate(id="e", score=0.3, label=1)]
    shown, _ = select(cands, missed=2, false_positives=2, threshold=0.5)
    kinds = {c.id: c.kind for c in shown}
    assert kinds == {"e": "missed", "b": "", "d": "false-positive", "c": ""}
    assert "missed" in next(c for c in shown if c.id == "b").groups  # still picked by --missed


HOSTILE_IDS = ("</script>", "<!--<script>", "</SCRIPT >", "<img src=x onerror=alert(1)>")
# set before the page's own scripts run: any alert (the <img onerror=alert(1)> an id would plant) is recorded
ALERT_HOOK = "window.__ran = []; window.alert = function(m){ window.__ran.push(String(m)); };"


def _hostile_pages(tmp_path):
    """The grading page (inspect) and a split gallery's index.html (train/evaluate) whose ids are markup."""
    root = write_dataset(str(tmp_path / "data"), "npy", n_per_class=3, size=24, bands=3, seed=1)
    ids = [HOSTILE_IDS[i % 4] + ("" if i < 4 else f" {i}") for i in range(12)]
    rows = list(csv.reader(open(write_predictions(str(tmp_path / "plain.csv"), root, seed=2))))
    preds = str(tmp_path / "preds.csv")
    with open(preds, "w", newline="") as fh:
        csv.writer(fh).writerows([rows[0]] + [[r[0], i] + r[2:] for r, i in zip(rows[1:], ids)])
    look = str(tmp_path / "look")
    inspect_predictions(preds, root, look, top=len(ids))
    from dali_lens.data.dataset import Dataset, Sample
    from dali_lens.inspection import split_gallery

    test = discover(root, val_fraction=0)["test"]
    test = Dataset([Sample(s.path, s.label, i) for s, i in zip(test.samples, ids)], test.bands, test.kind,
                   test.root, "test", test.hdus, test.shape)
    gallery = str(tmp_path / "gallery")
    split_gallery(gallery, test, np.linspace(0.1, 0.9, len(test)), test.labels, n=len(test))
    return {look: ids, gallery: ids[:len(test)]}


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run "
                                                "installs it): the grading page is not tested in a browser")
def test_ids_that_are_markup_show_as_text_and_run_nothing(tmp_path):
    """Issue 22: an id holding <!--<script> left the data <script> unparseable (0 of 18 tiles shown): every <, >
    and & in the embedded data is a JSON escape now, on the inspect page and the galleries' index.html alike."""
    pages = _hostile_pages(tmp_path)
    for out, ids in pages.items():
        text = open(os.path.join(out, "index.html"), encoding="utf-8").read()
        assert text.count("<script") == 2 and text.count("</script>") == 2, out
        assert sorted(c["id"] for c in page_data(out)["candidates"]) == sorted(ids)
    with _browser(tmp_path / "profile") as cdp:
        for out, ids in pages.items():
            target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
            sid = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            cdp.call("Page.enable", sid)
            cdp.call("Page.addScriptToEvaluateOnNewDocument", sid, source=ALERT_HOOK)
            cdp.call("Page.navigate", sid, url="file://" + os.path.join(out, "index.html"))
            deadline = time.time() + 30
            while _js(cdp, sid, "document.readyState") != "complete" or \
                    not _js(cdp, sid, "document.querySelectorAll('#grid .card').length"):
                assert time.time() < deadline, f"{out}: no tile shown"
                time.sleep(0.1)
            time.sleep(0.3)  # (an onerror would fire once its image failed to load)
            assert _js(cdp, sid, "document.querySelectorAll('#grid .card').length") == len(ids), out
            shown = _js(cdp, sid, "Array.from(document.querySelectorAll('#grid .card')).map(d => d.dataset.id)")
            assert sorted(shown) == sorted(ids), out  # every tile, each id as its own text
            assert _js(cdp, sid, "JSON.stringify(window.__ran)") == "[]", out
            assert _js(cdp, sid, "document.querySelectorAll('[onerror], img[src=\"x\"]').length") == 0, out
            assert _js(cdp, sid, "document.scripts.length") == 2, out


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run "
                                                "installs it): the grading page is not tested in a browser")
def test_grading_page_says_so_when_the_browser_will_not_keep_grades(npy_data, tmp_path):
    """A browser that refuses localStorage (a locked-down profile, a privacy mode): grading still works and the
    count says the grades are not kept, so the user exports them before closing (it was silent)."""
    root, preds = npy_data
    out = str(tmp_path / "look")
    inspect_predictions(preds, root, out, top=6)
    with _browser(tmp_path / "profile") as cdp:
        target = cdp.call("Target.createTarget", url="about:blank")["targetId"]
        sid = cdp.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        cdp.call("Page.enable", sid)
        cdp.call("Page.addScriptToEvaluateOnNewDocument", sid, source=(
            "Object.defineProperty(window, 'localStorage', {get() { throw new DOMException('denied', "
            "'SecurityError'); }});"))
        cdp.call("Page.navigate", sid, url="file://" + os.path.join(out, "index.html"))
        wait_cards(cdp, sid, 6)
        cdp.call("Page.bringToFront", sid)
        press_key(cdp, sid, "3")
        count = _js(cdp, sid, "document.getElementById('count').textContent")
        assert count.startswith("graded 1 / 6") and "not kept" in count and "export grades.csv" in count
        assert _js(cdp, sid, "window.gradesCsv()").count("\n") == 2  # the header and the grade: export still works
