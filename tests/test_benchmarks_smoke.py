"""Smoke test of `python -m benchmarks.bench_loaders --quick`: it runs and writes well-formed JSON (not a speed test)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "loaders-smoke.json"
    # baseline-tensor-decode is left out to keep the test short; --quick runs dali-cpu where DALI is present
    backends = ["torchvision", "torchvision-strong", "baseline"]
    try:
        import nvidia.dali  # noqa: F401

        backends.insert(0, "dali-cpu")
    except ImportError:
        pass
    cmd = [sys.executable, "-m", "benchmarks.bench_loaders", "--quick", "--out", str(out), "--data-dir", str(tmp / "data"),
           "--backends", ",".join(backends)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as fh:
        doc = json.load(fh)
    return doc, out, backends


def test_quick_json_is_well_formed(quick_result):
    doc, out, backends = quick_result
    for key in ("benchmark", "machine", "command", "timestamp", "mode", "settings", "runs", "targets"):
        assert key in doc, key
    m = doc["machine"]
    for key in ("cpu_model", "logical_cores", "ram_gb", "gpu", "versions"):
        assert key in m, key
    assert m["logical_cores"] >= 1 and m["ram_gb"] > 0
    for key in ("python", "torch", "torchvision", "dali", "numpy", "cuda"):
        assert key in m["versions"]
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", m["git_commit"]), m["git_commit"]
    assert "--quick" in doc["command"]
    assert doc["mode"] == "quick"
    assert {r["backend"] for r in doc["runs"]} == set(backends)
    for r in doc["runs"]:
        assert r["ok"], r
        for key in ("backend", "format", "size", "scales", "batch", "images_per_s", "epochs_timed",
                    "peak_host_mb", "peak_gpu_mb", "cpu_ms_per_image"):
            assert key in r, key
        assert r["images_per_s"] > 0 and r["epochs_timed"] >= 1 and r["peak_host_mb"] > 0
        assert r["cpu_ms_per_image"] > 0
        assert r["peak_gpu_mb"] is None or r["peak_gpu_mb"] > 0
        assert r["scales"] == [64, 112, 224]
    assert os.path.exists(os.path.splitext(str(out))[0] + ".png")


def test_goals_are_against_the_strongest_baseline(quick_result):
    """The targets block holds each goal as {name, value, met}: the fastest dali_lens backend against the
    fastest of the baselines measured in the same configuration (the strong torchvision DataLoader among them)."""
    doc, out, backends = quick_result
    if "dali-cpu" not in backends:
        pytest.skip("no DALI: no dali_lens backend to compare")
    runs = {r["backend"]: r for r in doc["runs"]}
    strongest = max((b for b in runs if b != "dali-cpu"), key=lambda b: runs[b]["images_per_s"])
    goals = [t for t in doc["targets"] if "config" not in t]
    assert len(goals) == 1, doc["targets"]
    v = goals[0]["value"]
    assert v["strongest_baseline_backend"] == strongest and v["strongest_baseline"] == runs[strongest]["images_per_s"]
    assert v["ratio"] == round(runs["dali-cpu"]["images_per_s"] / runs[strongest]["images_per_s"], 2)
    assert goals[0]["met"] is (v["ratio"] >= 2.0)
    from benchmarks import render_table

    row = next(ln for ln in render_table.render(doc).splitlines() if ln.startswith("| png |"))
    assert row.endswith(f"dali-cpu **{v['ratio']:.2f}x** {strongest} |"), row


def test_keep_from_reuses_the_runs_of_an_earlier_call(quick_result, tmp_path):
    """The GPU plan measures the baselines in call 1's background session and the DALI rows later: the loader
    step keeps the earlier file's runs (same grid key) instead of measuring them again."""
    doc, out, backends = quick_result
    merged = tmp_path / "merged.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_loaders", "--quick", "--out", str(merged), "--data-dir",
           str(out.parent / "data"), "--backends", "torchvision-strong,baseline", "--keep-from", str(out), "--no-plot"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    new = json.loads(merged.read_text())
    old = {r["backend"]: r for r in doc["runs"]}
    assert [r["backend"] for r in new["runs"]] == ["torchvision-strong", "baseline"]
    for r in new["runs"]:
        assert r["kept_from"] == out.name and r["images_per_s"] == old[r["backend"]]["images_per_s"]


def test_gpu_grid_keeps_every_worker_busy():
    """bench_loaders --gpu: >= 16k images, batch 64 and 256, every backend on
    64 px PNG -> 3 scales at batch 256, DALI GPU at 16 and 8 CPU threads there."""
    import argparse

    from benchmarks import bench_loaders

    args = argparse.Namespace(gpu=True, quick=False, full=False, backends=None, formats=None, sizes=None,
                              scales=None, batches=None, n=None)
    grid = bench_loaders.build_grid(args, have_cuda=True)
    assert bench_loaders.n_images(args, 64) >= 16384
    head = [(g["backend"], g.get("threads")) for g in grid if (g["format"], g["scale_mode"], g["batch"]) == ("png", "multi", 256)]
    assert set(head) == {("dali", 16), ("dali", 8), ("dali-cpu", None), ("torchvision", None),
                         ("torchvision-strong", None), ("baseline", None)}
    assert grid[0]["backend"] == "dali" and {g["batch"] for g in grid} == {64, 256}
    assert {(g["format"], g["scale_mode"]) for g in grid} >= {("png", "single"), ("jpeg", "multi")}
    assert len({bench_loaders.run_key(g) for g in grid}) == len(grid)


def test_render_table_reads_the_result(quick_result):
    doc, out, backends = quick_result
    from benchmarks import render_table

    md = render_table.render(doc)
    assert "| format | size | scales | batch |" in md
    for b in backends:
        assert b in md
    text = "intro\n<!-- bench:loaders:start -->\nold\n<!-- bench:loaders:end -->\noutro\n"
    new = render_table.replace_between_markers(text, md)
    assert md in new and "old" not in new and new.endswith("<!-- bench:loaders:end -->\noutro\n")
    assert render_table.replace_between_markers("no markers", md) is None


def test_a_benchmark_stopped_by_a_time_limit_keeps_its_finished_runs(tmp_path):
    """What `timeout` does to a benchmark step of the GPU session: SIGTERM once the first run is measured. The
    JSON must then hold that run (``"finished": false``); before, each benchmark wrote only at its end and the
    first H200 session kept nothing of three of them."""
    import signal
    import time

    out = tmp_path / "loaders-cut.json"
    cmd = [sys.executable, "-m", "benchmarks.bench_loaders", "--quick", "--out", str(out), "--data-dir",
           str(tmp_path / "data"), "--backends", "torchvision,baseline", "--no-plot"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    doc, deadline = None, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            seen = json.loads(out.read_text()) if out.exists() else {}
            if seen.get("finished") is False and seen.get("runs"):  # a run written while the benchmark goes on
                doc = seen
                break
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        text = proc.communicate(timeout=60)[0]
    assert doc is not None and doc.get("runs"), text[-3000:]
    doc = json.loads(out.read_text())  # what is left after the kill
    assert doc["benchmark"] == "loaders" and doc["machine"]["logical_cores"] >= 1
    if doc.get("finished") is False:  # cut: the runs measured so far
        assert 1 <= len(doc["runs"]) < 2 and doc["runs"][0]["backend"] == "torchvision"
    assert doc["runs"][0]["ok"] and doc["runs"][0]["images_per_s"] > 0
