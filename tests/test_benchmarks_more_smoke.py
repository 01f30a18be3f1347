"""Smoke tests of the other benchmark scripts with --quick: they run and write well-formed JSON with the
machine, the command and their targets (keys present, positive numbers). Not speed tests."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script: str, *args: str, timeout: float = 300) -> str:
    """``python -m benchmarks.<script>`` from the repository root (``script`` named by its file)."""
    module = "benchmarks." + script.removesuffix(".py")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{script}:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return proc.stdout


def load(path) -> dict:
    with open(path) as fh:
        doc = json.load(fh)
    m = doc["machine"]
    assert m["versions"]["torch"] and m["usable_cores"] >= 1 and "gpu" in m
    assert "--quick" in doc["command"] and doc["timestamp"]
    return doc


def test_generate_quick(tmp_path):
    out = tmp_path / "gen.json"
    run("bench_generate.py", "--quick", "--out", str(out))
    doc = load(out)
    assert doc["mode"] == "quick"
    for key in ("simulate_1_thread", "simulate_default_threads", "write_png", "write_npy"):
        assert doc["results"][key]["cutouts_per_s"] > 0, key
    assert doc["results"]["write_png"]["files"] > 0
    assert [t["name"] for t in doc["targets"]] == ["simulate >= 1000 cutouts/s (64 px, 3 bands)"]
    assert (tmp_path / "gen.png").stat().st_size > 0


def test_shards_quick_and_one_section_rerun(tmp_path):
    pytest.importorskip("nvidia.dali", reason="the read and predict sections use the DALI CPU backend")
    out = tmp_path / "shards.json"
    common = ["--quick", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--cold", "fadvise",
              "--backend", "dali-cpu"]  # the GPU plan passes --backend dali: the same code path
    run("bench_shards.py", *common, "--png-shards")
    doc = load(out)
    assert doc["pack"]["cutouts_per_s_best"] > 0
    assert doc["read"]["loose"]["warm"]["ok"] and doc["read"]["shards"]["warm"]["ok"]
    assert doc["read"]["shards-png"]["warm"]["ok"] and doc["read"]["shards-png"]["warm"]["backend"] == "dali-cpu"
    assert doc["predict"] and doc["predict"][0]["rows"] == doc["predict"][0]["n"]
    assert doc["predict"][0]["scored_images_per_s"] > 0, "predict's 'scored ... img/s' line is kept"
    names = [t["name"] for t in doc["targets"]]
    assert names[0].startswith("pack") and any(n.startswith("read 64 px .npy, warm") for n in names)
    goal = {t["name"]: t for t in doc["targets"]}
    for name in ("shards", "shards-png"):  # the >= 100k cutouts/s goal, with its measured value and verdict
        t = goal[f"read {name} (64 px, dali-cpu): >= 100k cutouts/s (best steady-state epoch)"]
        assert t["value"] == doc["read"][name]["warm"]["later_epochs"]["images_per_s_best"] > 0
        assert t["met"] is (t["value"] >= 100_000)
    first_pack = doc["pack"]
    # rerun only the predict section, with both models at the GPU plan's batch: the others are kept
    run("bench_shards.py", *common, "--sections", "predict", "--predict-models", "small_cnn,resnet18",
        "--predict-batch", "1024", "--predict-n", "300")
    again = load(out)
    assert again["pack"] == first_pack and again["read"] == doc["read"]
    assert again["section_runs"]["predict"]["timestamp"] >= again["section_runs"]["pack"]["timestamp"]
    assert "--sections predict" in again["section_runs"]["predict"]["command"]
    assert sorted(r["arch"] for r in again["predict"]) == ["resnet18", "small_cnn"]
    assert all(r["batch"] == 1024 and r["rows"] == 300 and r["scored_images_per_s"] > 0 for r in again["predict"])
    per_gpu = [t for t in again["targets"] if t["name"].startswith("predict from packed shards")]
    assert len(per_gpu) == 2 and all(t["value"] > 0 for t in per_gpu)


def test_challenge_fits_quick(tmp_path):
    pytest.importorskip("nvidia.dali", reason="compares the DALI CPU backend with torchvision")
    out = tmp_path / "fits.json"
    run("bench_challenge_fits.py", "--quick", "--out", str(out))
    doc = load(out)
    runs = doc["runs"]
    assert {r["backend"] for r in runs} >= {"dali-cpu", "torchvision"}
    assert all(r["images_per_s"] > 0 for r in runs)


def test_gpu_check_without_a_gpu_records_nothing(tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: benchmarks/gpu_check.py runs the real GPU cases there")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path / "g.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
    assert not (tmp_path / "g.json").exists()


def test_gpu_journeys_rehearsal_runs_a_journey_alone(tmp_path):
    """The GPU session's journeys, rehearsed on the DALI CPU backend: one journey picked with --only runs alone
    (it generates the data it needs; before, the shard journey failed without the PNG journey before it), and
    the JSON records each command's exit status and the backend line."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "journeys.json"
    run("gpu_journeys.py", "--backend", "dali-cpu", "--quick", "--only", "8", "--out", str(out), timeout=600)
    doc = load(out)
    assert doc["finished"] and [j["ok"] for j in doc["journeys"]] == [True], doc["journeys"]
    steps = doc["journeys"][0]["steps"]
    assert [s["command"].split()[2] for s in steps] == ["dali_lens.generate", "dali_lens.pack", "dali_lens.train"]
    assert all(s["rc"] == 0 for s in steps) and steps[-1]["backend_line"].startswith("backend dali-cpu")
    assert 0 <= steps[-1]["test_auc"] <= 1


def test_gpu_journeys_npy_first_and_predict_throughput_kept(tmp_path):
    """Journey 0 is the .npy one (its cuFile fallback has never run on a GPU, so it goes first), and the JSON
    keeps predict's 'scored N cutouts in S s (R img/s)' line and its rate (the first GPU session dropped it)."""
    pytest.importorskip("nvidia.dali")
    out = tmp_path / "journeys.json"
    run("gpu_journeys.py", "--backend", "dali-cpu", "--quick", "--only", "0", "--out", str(out), timeout=600)
    doc = load(out)
    assert doc["journeys"][0]["journey"].startswith("npy") and doc["journeys"][0]["ok"], doc["journeys"]
    steps = {s["command"].split()[2]: s for s in doc["journeys"][0]["steps"]}
    predict = steps["dali_lens.predict"]
    assert predict["scored_line"].startswith("scored ") and predict["scored_images_per_s"] > 0
