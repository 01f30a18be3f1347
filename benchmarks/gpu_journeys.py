#!/usr/bin/env python
"""The user journeys on the DALI GPU backend: the README's main job, then every source kind and trainer.

Each journey runs the real commands (``python -m dali_lens.generate``, ``train``, ``predict``, ``evaluate``)
in subprocesses on small generated data, with ``--backend dali`` (the main job: no flags at all, so ``auto``
must pick the GPU by itself). The JSON (--out) is rewritten after every command, so a run cut by a time
limit keeps what finished. Each record holds the command, its exit status, wall time, the log's backend
line, the test AUC where there is one, and the end of stderr when it failed. Run directories and data go
to a temporary folder (they do not come back from the device machine; the JSON does).

  python -m benchmarks.gpu_journeys --out $OUT/journeys-gpu.json          # on the GPU machine
  python -m benchmarks.gpu_journeys --backend dali-cpu --quick --out /tmp/j.json   # rehearsal here
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from benchmarks.common import ROOT, command_line, machine_info, utc_timestamp, write_json_atomic

SHORT = ["--no-progress", "--no-gallery", "--batch-size", "64"]


def journeys(tmp: str, backend: str, quick: bool) -> list[tuple[str, list[list[str]]]]:
    """(name, commands) in order of importance (.npy first, then the README's main job); '{tmp}' is the scratch folder. Data counts are odd on purpose:
    no split is a multiple of the batch. Each journey generates the data it reads (``main`` skips a generate
    whose folder an earlier journey wrote), so that any subset runs alone (``--only``)."""
    n = 301 if quick else 1201
    b = ["--backend", backend]
    out = []
    main = ["train", "--no-progress", "--out", f"{tmp}/main"] + (["--epochs", "1"] if quick else [])
    if backend != "dali":
        main += b
    out.append(("main job (README, no flags)", [main]))
    for fmt in ("npy", "png", "jpeg", "fits"):
        d, r = f"{tmp}/{fmt}", f"{tmp}/run-{fmt}"
        out.append((f"{fmt}: generate, train single 2 epochs, predict, evaluate", [
            ["generate", d, "--n", str(n), "--format", fmt, "--quiet"],
            ["train", "--data-root", d, "--out", r, "--epochs", "2", *b, *SHORT],
            ["predict", "--checkpoint", f"{r}/best.pt", d, "--split", "test", "--out", f"{r}/pred.csv",
             "--no-progress", *b],
            ["evaluate", "--checkpoint", f"{r}/best.pt", "--out", f"{r}/eval", d, "--no-gallery", *b]]))
    out.insert(0, out.pop(1))  # the .npy journey before the main job: its cuFile fallback has never run on a GPU
    d = f"{tmp}/png"
    out.append(("png: multiscale 64,96,128, 2 epochs", [
        ["generate", d, "--n", str(n), "--format", "png", "--quiet"],
        ["train", "--data-root", d, "--out", f"{tmp}/run-ms", "--trainer", "multiscale", "--scales", "64,96,128",
         "--epochs", "2", *b, *SHORT]]))
    out.append(("npy: ensemble small_cnn:64, resnet18:96, 2 epochs", [
        ["generate", f"{tmp}/npy", "--n", str(n), "--format", "npy", "--quiet"],
        ["train", "--data-root", f"{tmp}/npy", "--out", f"{tmp}/run-ens", "--trainer", "ensemble",
         "--members", "small_cnn:64:0,resnet18:96:1", "--epochs", "2", *b, *SHORT]]))
    d = f"{tmp}/challenge"
    out.append(("challenge layout (one FITS per band): generate, train 2 epochs", [
        ["generate", d, "--layout", "challenge", "--n", str(n), "--quiet"],
        ["train", "--data-root", d, "--out", f"{tmp}/run-ch", "--epochs", "2", *b, *SHORT]]))
    d = f"{tmp}/shards"
    out.append(("packed shards from png: pack, train 2 epochs", [
        ["generate", f"{tmp}/png", "--n", str(n), "--format", "png", "--quiet"],
        ["pack", f"{tmp}/png", d, "--no-progress"],
        ["train", "--data-root", d, "--out", f"{tmp}/run-sh", "--epochs", "2", *b, *SHORT]]))
    return out


def summarise(cmd: list[str], proc: subprocess.CompletedProcess, wall: float, tmp: str) -> dict:
    text = proc.stdout + proc.stderr
    rec = {"command": "python -m dali_lens." + " ".join(cmd).replace(tmp, "$TMP"), "rc": proc.returncode,
           "wall_s": round(wall, 1)}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("backend "):
            rec["backend_line"] = s
        elif s.startswith("epoch "):
            rec.setdefault("epochs", []).append(s)
        elif s.startswith("test: purity@") or s.startswith("test: at prior"):  # the search metrics' lines
            rec.setdefault("search_lines", []).append(s)
        elif s.startswith("test:") or s.startswith("AUC") or "ROC AUC" in s:
            rec["result_line"] = s
        elif s.startswith("scored ") and "img/s" in s:  # predict's throughput line
            rec["scored_line"] = s
            m = re.search(r"\(([0-9.]+) img/s\)", s)
            rec["scored_images_per_s"] = float(m.group(1)) if m else None
        elif "reads .npy on the CPU" in s or "cuFile" in s or "cufile" in s:  # the .npy fallback's reason
            rec.setdefault("npy_reader_lines", []).append(s)
    if cmd[0] == "train" and proc.returncode == 0:
        run = cmd[cmd.index("--out") + 1]
        try:
            metrics = json.load(open(os.path.join(run, "metrics.json")))
            rec["test_auc"] = metrics.get("metrics", {}).get("roc_auc")
            rec["backend"] = metrics.get("backend")
        except (OSError, ValueError) as exc:
            rec["metrics_error"] = str(exc)
    if proc.returncode != 0:
        rec["stderr_tail"] = proc.stderr[-3000:].replace(tmp, "$TMP")
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="result JSON, rewritten after every command")
    ap.add_argument("--backend", choices=("dali", "dali-cpu", "torchvision"), default="dali")
    ap.add_argument("--quick", action="store_true", help="301 cutouts and 1 main-job epoch (rehearsal)")
    ap.add_argument("--only", help="comma-separated journey numbers (0 = .npy, 1 = the main job)")
    args = ap.parse_args(argv)
    doc = {"benchmark": "gpu-journeys", "backend": args.backend, "machine": machine_info(),
           "command": command_line(), "timestamp": utc_timestamp(), "journeys": [], "finished": False}
    write_json_atomic(args.out, doc)
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DALI_LENS_CACHE": os.path.join(tmp, "cache"), "PYTHONUNBUFFERED": "1"}
        plan = journeys(tmp, args.backend, args.quick)
        keep = {int(k) for k in args.only.split(",")} if args.only else set(range(len(plan)))
        for k, (name, cmds) in enumerate(plan):
            if k not in keep:
                continue
            entry = {"journey": name, "steps": [], "ok": True}
            doc["journeys"].append(entry)
            print(f"== journey {k}: {name}", flush=True)
            for cmd in cmds:
                if cmd[0] == "generate" and os.path.isdir(cmd[1]):
                    continue  # written by an earlier journey
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "dali_lens." + cmd[0], *cmd[1:]], cwd=ROOT, env=env,
                                      capture_output=True, text=True)
                rec = summarise(cmd, proc, time.perf_counter() - t0, tmp)
                entry["steps"].append(rec)
                print(f"   rc {rec['rc']}  {rec['wall_s']:6.1f} s  {rec['command'][:110]}", flush=True)
                for key in ("backend_line", "result_line", "scored_line"):
                    if key in rec:
                        print(f"      {rec[key]}", flush=True)
                if rec["rc"] != 0:
                    print(rec["stderr_tail"][-1500:], flush=True)
                    entry["ok"] = False
                write_json_atomic(args.out, doc)
                if rec["rc"] != 0:
                    failed += 1
                    break
    doc["finished"] = True
    write_json_atomic(args.out, doc)
    print(f"{sum(j['ok'] for j in doc['journeys'])}/{len(doc['journeys'])} journeys passed -> {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
