"""Smoke test of benchmarks/bench_multiscale_memory.py and bench_train.py --quick: they run and write
well-formed JSON (keys present, positive numbers). Not a speed test."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("nvidia.dali", reason="the scripts measure the DALI CPU backend")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both scripts with --quick, side by side (two subprocesses at once keep the test short)."""
    tmp = tmp_path_factory.mktemp("bench-train")
    procs = {}
    for name in ("bench_multiscale_memory", "bench_train"):
        out = tmp / name
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out),
               "--data-dir", str(tmp / f"data-{name}")]
        procs[name] = (out, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True))
    docs = {}
    for name, (out, proc) in procs.items():
        try:
            text, _ = proc.communicate(timeout=600)  # a hang guard, not a speed test: ~80 s quiet, 170+ loaded
        except subprocess.TimeoutExpired:
            proc.kill()
            text, _ = proc.communicate()
            pytest.fail(f"{name} --quick timed out:\n{text[-3000:]}")
        assert proc.returncode == 0, f"{name}:\n{text[-3000:]}"
        files = sorted(os.listdir(out))
        jsons = [f for f in files if f.endswith(".json")]
        assert len(jsons) == 1, files
        with open(out / jsons[0]) as fh:
            doc = json.load(fh)
        assert os.path.splitext(jsons[0])[0] + ".png" in files, files
        docs[name] = (doc, jsons[0])
    return docs


def _check_common(doc: dict) -> None:
    for key in ("benchmark", "machine", "command", "timestamp", "mode", "loadavg", "library", "settings", "runs",
                "total_s"):
        assert key in doc, key
    assert len(doc["library"]["tree_sha256"]) == 16 and isinstance(doc["library"]["changed_during_run"], bool)
    m = doc["machine"]
    for key in ("cpu_model", "logical_cores", "usable_cores", "ram_gb", "gpu", "versions", "hostname"):
        assert key in m, key
    assert m["logical_cores"] >= 1 and m["ram_gb"] > 0
    assert m["versions"]["torch"] and m["versions"]["dali"]
    assert "--quick" in doc["command"] and doc["mode"] == "quick"
    assert len(doc["loadavg"]) == 3 and all(v >= 0 for v in doc["loadavg"])
    assert doc["runs"], "no runs"
    for r in doc["runs"]:
        assert r["ok"], r
        for key in ("peak_host_mb", "peak_rss_sum_mb", "subprocess_s", "foreign_cpu_frac"):
            assert key in r, key
        assert r["peak_host_mb"] > 0 and r["peak_rss_sum_mb"] > 0 and r["subprocess_s"] > 0


def test_multiscale_memory_quick(results):
    doc, name = results["bench_multiscale_memory"]
    assert name.startswith("multiscale-memory-")
    _check_common(doc)
    assert doc["settings"]["scales"] == [64, 112, 224]
    kinds = {(r["kind"], r["backend"]) for r in doc["runs"]}
    assert {("train", "dali-cpu"), ("train", "baseline"), ("loader-only", "dali-cpu"),
            ("loader-only", "baseline")} <= kinds
    for r in doc["runs"]:
        assert r["main_maxrss_mb"] > 0 and r["batch"] > 0
        assert r.get("peak_gpu_mb") is None or r["peak_gpu_mb"] > 0
        if r["kind"] in ("train", "model-only"):
            assert r["steps"] >= 1 and r["images_per_s"] > 0 and 0 <= r["data_wait_fraction"] <= 1
        else:
            assert r["images_per_epoch"] > 0
    assert doc["targets"], "no target entry"
    for t in doc["targets"]:
        for key in ("batch", "backend", "ours_peak_host_mb", "baseline_peak_host_mb", "host_reduction_pct",
                    "ours_peak_data_mb", "baseline_peak_data_mb", "host_met", "met", "loader_only_reduction_pct"):
            assert key in t, key
        assert t["ours_peak_host_mb"] > 0 and t["baseline_peak_host_mb"] > 0
        assert t["ours_peak_data_mb"] > 0 and t["baseline_peak_data_mb"] > 0
        assert isinstance(t["met"], bool)
        assert t["name"].startswith("multi-scale training") and t["value"]["host_reduction_pct"] == t["host_reduction_pct"]
    assert any(v["variant"] == "as-shipped" for v in doc["variant_effects"])
    assert {(s["kind"], s["backend"]) for s in doc["summary"]} == kinds


def test_train_quick(results):
    doc, name = results["bench_train"]
    assert name.startswith("train-")
    _check_common(doc)
    backends = {r["backend"] for r in doc["runs"]}
    assert {"dali-cpu", "torchvision"} <= backends
    for r in doc["runs"]:
        for key in ("arch", "size", "batch", "samples_per_s", "data_wait_fraction", "timed_s", "epochs_timed",
                    "warmup_epoch_s", "steps_per_epoch"):
            assert key in r, key
        assert r["arch"] == "small_cnn" and r["size"] == 64
        assert r["samples_per_s"] > 0 and r["timed_s"] > 0 and r["epochs_timed"] >= 1 and r["steps_per_epoch"] >= 1
        assert 0 <= r["data_wait_fraction"] <= 1
    assert len(doc["summary"]) == len([r for r in doc["runs"] if r["backend"] != "model-only"])
    for s in doc["summary"]:
        assert s["samples_per_s"] > 0 and 0 <= s["data_wait_pct"] <= 100
    # the data-stall goal per row: --quick has no model-only ceiling, so each is recorded and not judged
    assert len(doc["targets"]) == len(doc["summary"])
    for t, s in zip(doc["targets"], doc["summary"]):
        assert t["name"].startswith("data stall") and t["value"]["samples_per_s"] == s["samples_per_s"]
        assert t["met"] is None and t["value"]["model_only_samples_per_s"] is None
