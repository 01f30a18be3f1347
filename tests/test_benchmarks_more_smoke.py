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
    # the write figures time the command users run, not the library call in the benchmark's own process
    assert doc["results"]["write_png"]["command"].startswith("-m dali_lens.generate ")
    assert [t["name"] for t in doc["targets"]] == ["simulate >= 1000 cutouts/s (64 px, 3 bands)"]
    assert (tmp_path / "gen.png").stat().st_size > 0


def test_inject_core_quick(tmp_path):
    """issue 25: the injector's core alone (wt-injcore)."""
    out = tmp_path / "inject-core.json"
    run("bench_inject_core.py", "--quick", "--out", str(out))
    doc = load(out)
    assert doc["mode"] == "quick" and doc["runs"]
    for r in doc["runs"]:
        assert r["arcs_per_s"] > 0 and r["samples_per_cpu_s"] > 0 and r["batch"] == 256
    assert all(0 < c["estimated_throughput_fraction"] < 1 for c in doc["estimate_vs_loader"]["cases"])


def test_transfer_quick_both_targets(tmp_path):
    """issue 24: pretrain, then fine-tune through --weights RUN against random init, on either small set."""
    for target in ("space", "ground"):
        out = tmp_path / f"transfer-{target}.json"
        run("bench_transfer.py", "--quick", "--target", target, "--seeds", "0,1", "--work", str(tmp_path / target),
            "--out", str(out))
        doc = load(out)
        assert doc["mode"] == "quick" and doc["settings"]["small_set"]["target"] == target
        assert [len(doc["runs"][k]) for k in ("random_init", "pretrained")] == [2, 2]
        assert all(0 <= r["test_auc"] <= 1 for k in doc["runs"] for r in doc["runs"][k])


def test_imbalance_quick(tmp_path):
    """issue 24: the four imbalance runs, their TPR10 and purity@N (metrics.at_n) in the JSON."""
    out = tmp_path / "imbalance.json"
    run("bench_imbalance.py", "--quick", "--serial", "--work", str(tmp_path / "work"), "--out", str(out))
    doc = load(out)
    assert set(doc["results"]) == {"plain", "pos-weight-auto", "sampler-balanced", "both"}
    for r in doc["results"].values():
        assert r["purity_at"] and all(0 <= v <= 1 for v in r["purity_at"].values())


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


def test_gpu_plan_fits_the_device_limits():
    """The plan's arithmetic, at every step's LIMIT (worst case): each call <= 540 s and <= 7 files back from
    $OUT, the whole plan <= 13 min with the machine's start, the uploads, the gaps and the give-back; each
    command fits the tool (<= 2000 characters, <= 8 carried paths); every file a step says it writes is named
    in its command, and the calls that write results carry the commit file."""
    from benchmarks import gpu_plan

    s = gpu_plan.plan_summary()
    assert s["problems"] == [] and s["total_s"] <= 13 * 60
    assert all(c["call_s"] <= 540 and c["files"] <= 7 for c in s["calls"])
    assert s["total_s"] == pytest.approx(gpu_plan.START_S + sum(c["call_s"] for c in s["calls"])
                                         + gpu_plan.GAP_S * (len(s["calls"]) - 1) + gpu_plan.GIVE_BACK_S)
    for call in gpu_plan.calls():
        assert len(gpu_plan.command(call)) <= 2000 and len(call.carry) <= 8
        if call.session in ("bg", "A", "B"):
            assert ".gpu-meta" in call.carry, call.name
        for step in call.steps:
            for f in step.files:
                assert f == step.log or any(a.endswith("/" + f) for a in step.argv), (step.name, f)
    # the most important checks first: the tests and journeys in A before the loader grid, the bg session first
    assert [c.session for c in gpu_plan.calls()] == ["bg", None, None, None, "A", "B"]
    # a plan that breaks a limit is refused
    fat = gpu_plan.sessions()
    fat["B"][0].limit_s = 400
    orig = gpu_plan.sessions
    try:
        gpu_plan.sessions = lambda: fat
        broken = gpu_plan.plan_summary()
    finally:
        gpu_plan.sessions = orig
    assert any("> 780 s" in p for p in broken["problems"]) and any("> 540 s" in p for p in broken["problems"])


def test_gpu_plan_runner_stops_a_step_at_its_limit_and_goes_on(tmp_path, monkeypatch):
    """gpu_plan run: each step under its limit, a step beside the next one runs at the same time, a step cut
    at its limit is stopped and the session goes on; the log and the step's own log land in the session's OUT."""
    from benchmarks import gpu_plan

    py = [sys.executable, "-c"]
    steps = [gpu_plan.Step("slow", 2, 2, py + ["import time; print('slow started', flush=True); time.sleep(60)"], [],
                           beside_next=True),
             gpu_plan.Step("beside", 5, 1, py + ["print('beside ran')"], [], files=("beside.log",), log="beside.log"),
             gpu_plan.Step("after", 5, 1, py + ["open('{OUT}/after.txt', 'w').write('ok')"], [], files=("after.txt",))]
    monkeypatch.setattr(gpu_plan, "sessions", lambda: {"T": steps})
    t = __import__("time").perf_counter()
    assert gpu_plan.run_session("T", str(tmp_path), rehearse=False) == 0
    assert __import__("time").perf_counter() - t < 30, "the 60 s step was not stopped at its 2 s limit"
    log = (tmp_path / "session-T.log").read_text()
    assert "slow started" in log and "stopped at its limit, 2 s" in log and "exit 0: after" in log
    assert (tmp_path / "beside.log").read_text().strip() == "beside ran"
    assert (tmp_path / "after.txt").read_text() == "ok"


def test_git_commit_from_the_carried_file_when_git_is_missing(tmp_path, monkeypatch):
    """On the device .git does not travel: the commit comes from .gpu-meta/COMMIT (written by gpu_prepare.sh);
    anything that is not a 40-hex commit there is ignored."""
    from benchmarks import common

    monkeypatch.setattr(common, "ROOT", str(tmp_path))  # not a git checkout
    meta = tmp_path / "COMMIT"
    monkeypatch.setattr(common, "COMMIT_FILE", str(meta))
    assert common.git_commit() is None
    meta.write_text("0123456789abcdef0123456789abcdef01234567-dirty\n")
    assert common.git_commit() == "0123456789abcdef0123456789abcdef01234567-dirty"
    meta.write_text("$(rm -rf /)\n")
    assert common.git_commit() is None


def test_benchmarks_readme_timed_plan_is_the_plans_table():
    """One set of figures: benchmarks/README.md's timed plan is `python -m benchmarks.gpu_plan show`, verbatim
    (the first session's README gave three different totals: its table, gpu_session.sh and gpu_prepare.sh)."""
    from benchmarks import gpu_plan

    with open(os.path.join(ROOT, "benchmarks", "README.md"), encoding="utf-8") as fh:
        text = fh.read()
    table = gpu_plan.show(gpu_plan.PARTS)
    assert table in text, "benchmarks/README.md's timed plan differs from gpu_plan.py: paste `gpu_plan show`"
    for script in ("gpu_session.sh", "gpu_prepare.sh"):
        with open(os.path.join(ROOT, "benchmarks", script), encoding="utf-8") as fh:
            assert "min" not in "".join(ln for ln in fh if "total" in ln.lower()), f"{script} states its own total"


def test_predict_parquet_quick_parquet_only(tmp_path):
    """issue 26: `bench_predict_parquet --quick --formats parquet` runs only Parquet, and its memory target is
    computed from those runs (the throughput ratio needs CSV, so it is absent)."""
    pytest.importorskip("nvidia.dali", reason="the benchmark scores with the DALI CPU backend")
    out = tmp_path / "pq.json"
    run("bench_predict_parquet.py", "--quick", "--formats", "parquet", "--out", str(out), timeout=600)
    doc = load(out)
    assert doc["settings"]["formats"] == ["parquet"] and {r["format"] for r in doc["runs"]} == {"parquet"}
    assert all(r["ok"] and r["rows_read_back"] == r["n"] for r in doc["runs"])
    assert [t["name"] for t in doc["targets"]] == ["parquet peak RSS at 6000 within 10 % of 2000"]
