"""Training at a survey-like class ratio (issue 24): TPR10 and purity@N of the small CNN trained at 1:100, with
and without ``--pos-weight auto`` and ``--sampler balanced``.

One simulated set (``generate_dataset``, ``lens_fraction`` 0.01, 32 px PNG) is split 40/7/53 into train, val
and test, so that all three hold the survey's ratio (the test split the largest: its lenses are what the
figures count); the four runs (plain, pos-weight auto, sampler balanced,
both) train on the same files with the same seed and are scored on the same test split:

* ``tpr10``: the share of the test lenses scored above the tenth-highest non-lens (``metrics.tpr10``);
* ``purity@N``: the share of lenses among the N highest-scoring test cutouts (N = 10, the number of test
  lenses, 100); ``roc_auc`` and ``pr_auc`` from the run's metrics.json.

    python -m benchmarks.bench_imbalance                       # 3,000 cutouts, 3 epochs, the 4 runs side by side
    python -m benchmarks.bench_imbalance --quick               # a smoke test (400 cutouts, 1 epoch)
Writes benchmarks/results/imbalance-<gpu-or-host>.json (the machine, the git commit, the command).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common

CONFIGS = {"plain": {}, "pos-weight-auto": {"pos_weight": "auto"}, "sampler-balanced": {"sampler": "balanced"},
           "both": {"pos_weight": "auto", "sampler": "balanced"}}


def purity_at(labels: list[int], scores: list[float], n: int) -> float:
    """The share of lenses among the ``n`` highest scores: ``metrics.at_n``'s purity (ties pro rata)."""
    from dali_lens.metrics import at_n

    return float(at_n(labels, scores, [n])[0]["purity"])


def _scores(out: str) -> tuple[list[int], list[float]]:
    labels, scores = [], []
    with open(os.path.join(out, "predictions.csv"), newline="") as fh:
        for row in csv.DictReader(fh):
            labels.append(int(float(row["label"])))
            scores.append(float(row["score"]))
    return labels, scores


def measure(name: str, data: str, work: str, args) -> dict:
    """One configuration's run on ``data`` and its figures."""
    from dali_lens.trainers import TrainConfig, run

    extra = CONFIGS[name]
    run_dir = os.path.join(work, f"run-{name}")
    t0 = time.perf_counter()
    metrics = run(TrainConfig(data_root=data, out=run_dir, backend=args.backend, arch="small_cnn",
                              img_size=args.size, epochs=args.epochs, batch_size=args.batch_size, patience=0,
                              seed=args.seed, progress=False, gallery=False, workers=1, **extra),
                  log=lambda *a, **k: None)["metrics"]
    labels, scores = _scores(run_dir)
    n_lens = sum(v == 1 for v in labels)
    return {"options": extra, "tpr10": metrics.get("tpr10"), "tpr0": metrics.get("tpr0"),
            "roc_auc": metrics.get("roc_auc"), "pr_auc": metrics.get("pr_auc"),
            "purity_at": {str(n): round(purity_at(labels, scores, n), 4) for n in sorted({10, n_lens, 100})},
            "seconds": round(time.perf_counter() - t0, 1)}


def _passed(args) -> list[str]:
    return ["--n", str(args.n), "--lens-fraction", str(args.lens_fraction), "--size", str(args.size),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--backend", args.backend,
            "--seed", str(args.seed), "--splits", args.splits]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=3000, help="cutouts generated (default 3000: 30 lenses)")
    p.add_argument("--lens-fraction", type=float, default=0.01, help="lenses among them (default 0.01: 1:99)")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--splits", default="0.4,0.07,0.53", help="train,val,test fractions (default 0.4,0.07,0.53)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backend", default="dali-cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=list(CONFIGS), default=None, help="one configuration (the parent runs each so)")
    p.add_argument("--serial", action="store_true", help="the configurations one after the other, in this process")
    p.add_argument("--quick", action="store_true", help="400 cutouts at 1:9, 1 epoch: a smoke test")
    p.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON output (default: benchmarks/results/imbalance-<host>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.lens_fraction, args.epochs = 400, 0.1, 1
    from dali_lens.data.synthetic import generate_dataset

    machine = common.machine_info(with_gpu=False)
    load_before = round(os.getloadavg()[0], 2)
    out = common.result_path(args.out, "imbalance", machine)
    work = args.work or tempfile.mkdtemp(prefix="bench-imbalance-")
    data = os.path.join(work, "data")
    splits = tuple(float(v) for v in args.splits.split(","))
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(data, "train.csv")):
        generate_dataset(data, n=args.n, size=args.size, fmt="png", seed=args.seed, lens_fraction=args.lens_fraction,
                         splits=splits)
    generate_seconds = time.perf_counter() - t0
    names = [args.only] if args.only else list(CONFIGS)
    if args.only or args.serial:
        results = {name: measure(name, data, work, args) for name in names}
    else:  # the four runs side by side, one process each (a shared machine: each gets its share of the cores)
        procs = {name: subprocess.Popen([sys.executable, "-m", "benchmarks.bench_imbalance", "--only", name,
                                         "--work", work, "--out", os.path.join(work, f"{name}.json"),
                                         *_passed(args)], env=common.child_env()) for name in names}
        results = {}
        for name, proc in procs.items():
            if proc.wait() != 0:
                raise SystemExit(f"{name}: the child run failed (exit {proc.returncode})")
            with open(os.path.join(work, f"{name}.json")) as fh:
                results[name] = json.load(fh)["results"][name]
    for name, r in results.items():
        print(f"{name:17s} TPR10 {r['tpr10']:.3f}  AUC {r['roc_auc']:.3f}  purity@N "
              + "  ".join(f"{k}: {v:.2f}" for k, v in r["purity_at"].items()), flush=True)
    test_labels = _scores(os.path.join(work, f"run-{names[0]}"))[0]
    doc = {"benchmark": "imbalance", "mode": "quick" if args.quick else "full", "command": common.command_line(),
           "timestamp": common.utc_timestamp(), "machine": machine,
           "settings": {"n": args.n, "lens_fraction": args.lens_fraction, "size": args.size, "epochs": args.epochs,
                        "batch_size": args.batch_size, "backend": args.backend, "seed": args.seed,
                        "splits": list(splits), "arch": "small_cnn",
                        "test": {"n": len(test_labels), "lenses": sum(v == 1 for v in test_labels)}},
           "generate_seconds": round(generate_seconds, 1),
           "load_average_1min": {"before": load_before, "after": round(os.getloadavg()[0], 2)},
           "purity_note": "purity@N from dali_lens.metrics.at_n (tied scores at the N-th place count pro rata)",
           "results": results}
    common.save_result(doc, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
