#!/usr/bin/env python
"""The GPU session's plan, as data: every device call, what it carries, what it runs, each step's time limit
and expected time, and the files it brings back from $OUT. One home for the plan: ``gpu_session.sh`` runs a
session's steps from here, ``gpu_prepare.sh`` prints the calls from here, ``gpu_rehearse.sh`` rehearses them,
benchmarks/README.md's timed plan is ``show``'s table, and the smoke tests check the arithmetic.

The device limits (/work/.library/device/README.md) and the margins this plan keeps:
  every call <= 540 s (the tool allows 600), <= 7 files back from $OUT (it allows 8), the whole plan <= 13 min
  of device time (15 allowed) counting the machine's start, the uploads, the gaps between calls and the
  give-back. The plan's total is the sum of the step LIMITS (worst case), not of the expected times.

The calls (the DALI wheel packs to 5 parts of at most 52 MiB; the machine goes back after 30 s idle, so the
calls follow each other at once):
  1      part 0 + .gpu-meta (the commit); starts, in its own process session (setsid: it outlives the call),
         the ``bg`` session from a copy of the tree: data generation (no DALI needed), then the loader
         baselines that need no DALI (torchvision-strong, the project's torchvision fallback, the legacy
         loader) on the same data, while the other parts upload
  2-4    parts 1-3, one each
  5      the last part + .whl + .gpu-meta: install, unpack DALI, session ``A``: environment, wait for ``bg``,
         the GPU loader tests beside the journeys (.npy first), the loader grid (DALI rows; the baselines
         kept from ``bg``)
  6      .gpu-meta: session ``B``: shards and predict on --backend dali, ResNet-18 data stall against the
         model-only ceiling, the multi-scale memory benchmark with its loader-only rows

  python -m benchmarks.gpu_plan show            # the timed plan (expected and worst-case device seconds)
  python -m benchmarks.gpu_plan check           # exit 1 when a call or the total breaks a limit
  python -m benchmarks.gpu_plan commands        # the run tool's calls: carry + command
  python -m benchmarks.gpu_plan run A           # on the device (gpu_session.sh): session A's steps
  python -m benchmarks.gpu_plan run A --rehearse --out /tmp/o   # here: the same steps on dali-cpu, quick sizes
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from benchmarks.common import ROOT

# ------------------------------------------------------------------------------------------- device limits
CALL_LIMIT_S = 540        # each call (the tool: 600)
FILES_LIMIT = 7           # files back from $OUT per call (the tool: 8)
TOTAL_LIMIT_S = 13 * 60   # the whole plan (the session: 15 min)
# ------------------------------------------------------------------------------------------- overheads
START_S = 90              # a fresh machine: "a minute or more" (device README); the first session's call 1 held 27.6 s
UPLOAD_S_PER_MIB = 0.2    # ~10 s for a 52 MiB part (the first session: calls 2-4 held about 16 s each)
TREE_MIB = 3              # the tracked tree travels with every call
GAP_S = 5                 # between calls (the tool's reply, the next request)
GIVE_BACK_S = 5
PART_MIB, PARTS, WHEELS_MIB = 52, 5, 14  # gpu_prepare.sh: DALI's 244 MiB of xz in parts of <= 52 MiB; the wheels
INSTALL_S = 50            # wheels into /tmp/site + unpacking DALI (rehearsed: 49-67 s on a loaded 2-core VM)
# ------------------------------------------------------------------------------------------- places
# (GPU_PLAN_DATA / GPU_PLAN_BG move them for a rehearsal or a test)
DATA = os.environ.get("GPU_PLAN_DATA", "/tmp/gpu-data")  # made by the bg session, read by A and B (kept while warm)
BG = os.environ.get("GPU_PLAN_BG", "/tmp/gpu-bg")        # the bg session's OUT: its log, the baselines' JSON, DONE
TREE = "/tmp/gpu-tree"    # the bg session's copy of the tree (later calls re-copy the working tree)
GPU_N = 16384             # loader images (bench_loaders.GPU_N)
READ_N = 32768            # bench_shards --read-n on the GPU
PREDICT_N = 32768         # bench_shards --predict-n on the GPU


@dataclass
class Step:
    name: str
    limit_s: int                 # the timeout it runs under; the plan's arithmetic uses it
    expected_s: int              # what it should take (the first session's figures scaled; see benchmarks/README.md)
    argv: list[str]              # on the GPU ({OUT}, {DATA}, {BG} filled in); python3 -m benchmarks.<...>
    quick: list[str]             # the rehearsal's argv here (dali-cpu, quick sizes)
    files: tuple[str, ...] = ()  # what it writes under $OUT
    log: str | None = None       # its output to this $OUT file instead of the session log
    beside_next: bool = False    # runs at the same time as the next step (correctness checks only, not timings)


@dataclass
class Call:
    name: str
    carry: list[str]
    carry_mib: float
    prefix: str                  # shell before the session (copy a part, install)
    session: str | None = None   # the gpu_plan session it runs ('bg' is started in the background)
    setup_s: float = 2           # the prefix's own time
    steps: list[Step] = field(default_factory=list)


PY = ["python3", "-m"]


def sessions() -> dict[str, list[Step]]:
    """Every session's steps, most important first."""
    # no second measurement of disturbed runs (--retry-budget 0): the limits hold; foreign_cpu_frac is recorded
    loaders = ["benchmarks.bench_loaders", "--gpu", "--retry-budget", "0", "--data-dir", "{DATA}", "--no-plot"]
    return {
        "bg": [
            Step("data: 64 px PNG/JPEG x 16384, shard sets (no DALI)", 60, 30, PY + ["benchmarks.gpu_plan", "data"],
                 PY + ["benchmarks.gpu_plan", "data", "--quick"]),
            Step("loader baselines: torchvision-strong, torchvision, legacy", 240, 160,
                 PY + loaders + ["--backends", "torchvision-strong,torchvision,baseline", "--out",
                                 "{OUT}/loaders-baselines.json"],
                 PY + ["benchmarks.bench_loaders", "--quick", "--data-dir", "{DATA}", "--no-plot", "--backends",
                       "torchvision-strong,baseline", "--out", "{OUT}/loaders-baselines.json"],
                 files=("loaders-baselines.json",)),
        ],
        "A": [
            # the imports of torch, DALI, astropy cold: 10-16 s in the rehearsal on the loaded 2-core VM, which
            # cut a 10 s limit; the first session's env step (10 s) lost its output for another reason
            Step("environment: GPU, versions, module origins, cuFile", 20, 8, PY + ["benchmarks.gpu_plan", "env"],
                 PY + ["benchmarks.gpu_plan", "env"]),
            Step("wait for the bg session (data, baselines)", 30, 25, PY + ["benchmarks.gpu_plan", "wait", "{BG}", "27"],
                 PY + ["benchmarks.gpu_plan", "wait", "{BG}", "27"]),
            Step("GPU loader tests (.fits.fz, .npy with/without cuFile first)", 130, 100,
                 PY + ["benchmarks.gpu_check", "--out", "{OUT}/gpu-tests.json", "--log", "{OUT}/gpu-check.log"],
                 PY + ["benchmarks.gpu_check", "--backend", "dali-cpu", "--first", "3", "--out", "{OUT}/gpu-tests.json",
                       "--log", "{OUT}/gpu-check.log"],
                 files=("gpu-tests.json", "gpu-check.log"), beside_next=True),
            Step("journeys on --backend dali (.npy first), beside the tests", 130, 130,
                 PY + ["benchmarks.gpu_journeys", "--quick", "--out", "{OUT}/journeys-gpu.json"],
                 PY + ["benchmarks.gpu_journeys", "--backend", "dali-cpu", "--quick", "--only", "0",
                       "--out", "{OUT}/journeys-gpu.json"],
                 files=("journeys-gpu.json", "journeys.log"), log="journeys.log"),
            Step("loader grid: DALI GPU (16/8 threads), DALI CPU; baselines kept from bg", 110, 90,
                 PY + loaders + ["--keep-from", "{BG}/loaders-baselines.json", "--out", "{OUT}/loaders-gpu.json"],
                 PY + ["benchmarks.bench_loaders", "--quick", "--data-dir", "{DATA}", "--no-plot", "--backends",
                       "dali-cpu,torchvision-strong,baseline", "--keep-from", "{BG}/loaders-baselines.json",
                       "--out", "{OUT}/loaders-gpu.json"],
                 files=("loaders-gpu.json",)),
        ],
        "B": [
            Step("shards on --backend dali (.npy and PNG), predict at batch 1024 (small CNN, ResNet-18)", 90, 70,
                 PY + ["benchmarks.bench_shards", "--sections", "read,predict", "--backend", "dali", "--png-shards",
                       "--cold", "none", "--read-n", str(READ_N), "--read-min-time", "3", "--predict-n",
                       str(PREDICT_N), "--predict-models", "small_cnn,resnet18", "--predict-batch", "1024",
                       "--data-dir", "{DATA}/shards", "--out", "{OUT}/shards-gpu.json"],
                 PY + ["benchmarks.bench_shards", "--quick", "--sections", "read,predict", "--backend", "dali-cpu",
                       "--cold", "none", "--predict-n", "300", "--predict-batch", "1024", "--data-dir",
                       "{DATA}/shards", "--out", "{OUT}/shards-gpu.json"],
                 files=("shards-gpu.json",)),
            Step("ResNet-18 data stall at 64 and 224 px, DALI and torchvision, model-only ceiling", 75, 65,
                 PY + ["benchmarks.bench_train", "--models", "resnet18", "--sizes", "64,224", "--backends",
                       "dali,torchvision", "--data-dir", "{DATA}/train", "--no-plot", "--out", "{OUT}/train-gpu.json"],
                 PY + ["benchmarks.bench_train", "--quick", "--backends", "dali-cpu", "--data-dir", "{DATA}/train",
                       "--no-plot", "--out", "{OUT}/train-gpu.json"],
                 files=("train-gpu.json",)),
            Step("multi-scale training memory vs the legacy mode, loader-only rows included", 80, 70,
                 PY + ["benchmarks.bench_multiscale_memory", "--backends", "dali", "--batches", "128", "--repeats", "1",
                       "--variants", "as-shipped", "--data-dir", "{DATA}/memory", "--no-plot",
                       "--out", "{OUT}/multiscale-memory-gpu.json"],
                 PY + ["benchmarks.bench_multiscale_memory", "--quick", "--data-dir", "{DATA}/memory", "--no-plot",
                       "--out", "{OUT}/multiscale-memory-gpu.json"],
                 files=("multiscale-memory-gpu.json",)),
        ],
    }


def calls(parts: int = PARTS) -> list[Call]:
    s = sessions()
    last = f"p{parts - 1:02d}"
    bg_start = (f"rm -rf {TREE} && mkdir -p {TREE} {BG} && tar --exclude=./.dali-parts --exclude=./.whl -cf - . | "
                f"tar -xf - -C {TREE} && (cd {TREE} && OUT={BG} setsid nohup bash benchmarks/gpu_session.sh bg "
                f"> {BG}/bg.log 2>&1 < /dev/null &); sleep 3; nvidia-smi -L; tail -2 {BG}/bg.log")
    out = [Call("1: part p00, start the bg session (data, baselines)", [".dali-parts/p00", ".gpu-meta"], PART_MIB,
                f"mkdir -p /tmp/dali && cp .dali-parts/p00/* /tmp/dali/ && {bg_start}", "bg", 5, s["bg"])]
    for i in range(1, parts - 1):
        out.append(Call(f"{i + 1}: part p{i:02d}", [f".dali-parts/p{i:02d}"], PART_MIB,
                        f"cp .dali-parts/p{i:02d}/* /tmp/dali/ && ls /tmp/dali | wc -l && tail -2 {BG}/session-bg.log"))
    install = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "
               f".whl/*.whl && cp .dali-parts/{last}/* /tmp/dali/ && source /tmp/dali/dali-install-remote.sh")
    out.append(Call(f"{parts}: part {last} + wheels, install, session A", [f".dali-parts/{last}", ".whl", ".gpu-meta"],
                    244 - PART_MIB * (parts - 1) + WHEELS_MIB, install, "A", INSTALL_S, s["A"]))
    out.append(Call(f"{parts + 1}: session B", [".gpu-meta"], 0,
                    "source /tmp/dali/dali-install-remote.sh", "B", 3, s["B"]))
    return out


def command(call: Call) -> str:
    if call.session is None:
        return call.prefix
    if call.session == "bg":
        return call.prefix  # the bg session is started inside the prefix
    return f"{call.prefix} && bash benchmarks/gpu_session.sh {call.session}"


def step_seconds(steps: list[Step], key: str) -> float:
    """Wall seconds of a session: a step run beside the next one costs the longer of the two."""
    total, i = 0.0, 0
    while i < len(steps):
        if steps[i].beside_next and i + 1 < len(steps):
            total += max(getattr(steps[i], key), getattr(steps[i + 1], key))
            i += 2
        else:
            total += getattr(steps[i], key)
            i += 1
    return total


def call_seconds(call: Call, key: str = "limit_s") -> dict:
    """Device seconds of one call: upload + its prefix + its session's steps (the bg session runs in the
    background, so it costs call 1 nothing; the first session step of A waits for it instead)."""
    upload = UPLOAD_S_PER_MIB * (call.carry_mib + TREE_MIB)
    steps = 0.0 if call.session in (None, "bg") else step_seconds(call.steps, key)
    files = (1 + sum(len(s.files) for s in call.steps)) if call.session not in (None, "bg") else 0  # + session log
    return {"upload_s": round(upload, 1), "setup_s": call.setup_s, "steps_s": steps,
            "call_s": round(upload + call.setup_s + steps, 1), "files": files}


def plan_summary(parts: int = PARTS, key: str = "limit_s") -> dict:
    cs = calls(parts)
    rows = [dict(name=c.name, carry=c.carry, **call_seconds(c, key)) for c in cs]
    total = START_S + sum(r["call_s"] for r in rows) + GAP_S * (len(cs) - 1) + GIVE_BACK_S
    problems = [f"call {r['name']}: {r['call_s']} s > {CALL_LIMIT_S} s" for r in rows if r["call_s"] > CALL_LIMIT_S]
    problems += [f"call {r['name']}: {r['files']} files > {FILES_LIMIT}" for r in rows if r["files"] > FILES_LIMIT]
    problems += [f"call {c.name}: command of {len(command(c))} characters > 2000" for c in cs if len(command(c)) > 2000]
    problems += [f"call {c.name}: {len(c.carry)} carried paths > 8" for c in cs if len(c.carry) > 8]
    if total > TOTAL_LIMIT_S:
        problems.append(f"the plan: {total:.0f} s > {TOTAL_LIMIT_S} s")
    bg = sum(s.__dict__[key] for s in sessions()["bg"])
    return {"basis": key, "start_s": START_S, "gap_s": GAP_S, "give_back_s": GIVE_BACK_S, "calls": rows,
            "total_s": round(total, 1), "total_min": round(total / 60, 2), "bg_session_s": bg, "problems": problems}


def show(parts: int) -> str:
    lim, exp = plan_summary(parts, "limit_s"), plan_summary(parts, "expected_s")
    lines = ["| # | call | carries | files back | expected s | limit s |", "| --- | --- | --- | ---: | ---: | ---: |",
             f"| 0 | machine start | | | {START_S} | {START_S} |"]
    for k, (a, b) in enumerate(zip(exp["calls"], lim["calls"]), 1):
        lines.append(f"| {k} | {a['name'].split(': ', 1)[1]} | {', '.join(f'`{c}`' for c in a['carry'])} | "
                     f"{a['files']} | {a['call_s']:.0f} | {b['call_s']:.0f} |")
        call = calls(parts)[k - 1]
        for s in call.steps:
            tag = " (background: costs no call time)" if call.session == "bg" else " (beside the next step)" if s.beside_next else ""
            lines.append(f"| | {s.name}{tag} | | {len(s.files)} | {s.expected_s} | {s.limit_s} |")
    lines.append(f"| | gaps between calls ({len(lim['calls']) - 1} x {GAP_S} s) and give-back ({GIVE_BACK_S} s) | | | "
                 f"{GAP_S * (len(lim['calls']) - 1) + GIVE_BACK_S} | {GAP_S * (len(lim['calls']) - 1) + GIVE_BACK_S} |")
    lines.append(f"| | **total device time** | | | **{exp['total_s']:.0f} s = {exp['total_min']:.1f} min** | "
                 f"**{lim['total_s']:.0f} s = {lim['total_min']:.1f} min** |")
    lines.append("")
    lines.append(f"Limits kept: every call <= {CALL_LIMIT_S} s, <= {FILES_LIMIT} files back, the total <= "
                 f"{TOTAL_LIMIT_S // 60} min (worst case: every step at its limit). The bg session takes "
                 f"{exp['bg_session_s']} s expected ({lim['bg_session_s']} s at most) from call 1 on, while calls "
                 f"2-{parts} upload and install; session A's second step waits for it.")
    if lim["problems"]:
        lines.append("PROBLEMS: " + "; ".join(lim["problems"]))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- on the device

def fill(argv: list[str], out: str) -> list[str]:
    return [a.replace("{OUT}", out).replace("{DATA}", DATA).replace("{BG}", BG) for a in argv]


def run_session(name: str, out: str, rehearse: bool) -> int:
    """Run session ``name``'s steps, each under its limit, the output in ``out``/session-<name>.log (and the
    step's own log where it names one); a step cut by its limit keeps what it wrote (every benchmark rewrites
    its JSON after each run). ``rehearse``: the quick argv on dali-cpu instead."""
    steps = sessions()[name]
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, f"session-{name}.log")
    t0 = time.perf_counter()
    with open(log_path, "a", buffering=1) as log:
        def say(msg: str) -> None:
            line = f"== [{time.perf_counter() - t0:5.0f} s] {msg}"
            print(line, flush=True)
            log.write(line + "\n")

        def start(step: Step):
            argv = fill(step.quick if rehearse else step.argv, out)
            if argv[0] == "python3":  # this python (a rehearsal names its stand-in for the device's python3)
                argv[0] = os.environ.get("GPU_PLAN_PYTHON") or sys.executable
            sink = open(os.path.join(out, step.log), "w", buffering=1) if step.log else log
            say(f"{step.name} (limit {step.limit_s} s): {shlex.join(argv)}")
            return subprocess.Popen(argv, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True), sink

        def finish(step: Step, proc, sink, started: float) -> None:
            left = step.limit_s - (time.perf_counter() - started)
            try:
                rc = proc.wait(max(1.0, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 15)
                try:
                    rc = proc.wait(5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, 9)
                    rc = proc.wait()
                rc = f"{rc} (stopped at its limit, {step.limit_s} s)"
            if sink is not log:
                sink.close()
            say(f"exit {rc}: {step.name}")

        i = 0
        while i < len(steps):
            group = steps[i:i + 2] if steps[i].beside_next else steps[i:i + 1]
            started = time.perf_counter()
            running = [(s, *start(s)) for s in group]
            for s, proc, sink in running:
                finish(s, proc, sink, started)
            i += len(group)
        files = sorted(f for f in os.listdir(out) if os.path.isfile(os.path.join(out, f)))
        say(f"session {name} done; {len(files)} files in {out}: {', '.join(files)}")
    if name == "bg":
        open(os.path.join(out, "DONE"), "w").close()
    return 0


def make_data(quick: bool) -> int:
    """The bg session's first step: every data set the later steps read, generated once (no DALI needed)."""
    from benchmarks import bench_loaders, bench_shards

    def log(msg: str) -> None:
        print(msg, flush=True)

    n, read_n, pool = (128, 600, 300) if quick else (GPU_N, READ_N, 4096)
    for fmt in ("png", "jpeg"):
        bench_loaders.prepare_dataset(DATA, fmt, 64, n, 0, log)
    shards = os.path.join(DATA, "shards")
    os.makedirs(shards, exist_ok=True)
    bench_shards.generated(shards, "npy", read_n, 0, log)
    bench_shards.generated(shards, "png", read_n, 0, log)
    bench_shards.generated(shards, "png", pool, 1, log)
    return 0


ENV_PROBE = """
import importlib
for name in ("numpy", "torch", "torchvision", "yaml", "astropy", "webdataset", "nvidia.dali", "dali_lens"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} from {m.__file__}")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: IMPORT FAILED: {exc}")
from dali_lens.data.kinds.npy import load_cufile
print("libcufile.so.0:", load_cufile() or "not found: .npy read on the CPU, then .gpu()")
from benchmarks.common import git_commit
print("commit:", git_commit())
"""


def env_report() -> int:
    try:
        subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"], timeout=5)
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"nvidia-smi: {exc}")
    return subprocess.run([sys.executable, "-c", ENV_PROBE], cwd=ROOT).returncode


def wait_for(folder: str, seconds: float) -> int:
    t = time.perf_counter()
    while not os.path.exists(os.path.join(folder, "DONE")) and time.perf_counter() - t < seconds:
        time.sleep(1)
    done = os.path.exists(os.path.join(folder, "DONE"))
    for f in ("session-bg.log",):
        p = os.path.join(folder, f)
        if os.path.exists(p):
            print(f"--- {p} (the bg session)\n" + open(p).read()[-4000:])
    print("bg session done" if done else f"bg session NOT done after {seconds:.0f} s: later steps use what it wrote")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("show", "check", "commands", "json"):
        q = sub.add_parser(name)
        q.add_argument("--parts", type=int, help="DALI parts (default: .dali-parts/COUNT, else 5)")
    r = sub.add_parser("run")
    r.add_argument("session", choices=tuple(sessions()))
    r.add_argument("--out", help="where the session's files go (default $OUT)")
    r.add_argument("--rehearse", action="store_true", help="the quick steps on dali-cpu (no GPU)")
    d = sub.add_parser("data")
    d.add_argument("--quick", action="store_true")
    sub.add_parser("env")
    w = sub.add_parser("wait")
    w.add_argument("folder")
    w.add_argument("seconds", type=float)
    args = p.parse_args(argv)
    if args.cmd in ("show", "check", "commands", "json"):
        parts = args.parts
        if parts is None:
            try:
                parts = int(open(os.path.join(ROOT, ".dali-parts", "COUNT")).read())
            except (OSError, ValueError):
                parts = PARTS
        if not 2 <= parts <= 12:
            p.error(f"--parts: between 2 and 12 (got {parts})")
        if args.cmd == "show":
            print(show(parts))
        elif args.cmd == "json":
            print(json.dumps({"limit": plan_summary(parts), "expected": plan_summary(parts, "expected_s")}, indent=1))
        elif args.cmd == "commands":
            for c in calls(parts):
                print(f"# call {c.name}\ncarry {json.dumps(c.carry)}\n{command(c)}\n")
        s = plan_summary(parts)
        if s["problems"]:
            print("error: the GPU plan breaks a device limit: " + "; ".join(s["problems"]), file=sys.stderr)
            return 1
        return 0
    if args.cmd == "run":
        out = args.out or os.environ.get("OUT")
        if not out:
            p.error("run: give --out or set OUT")
        return run_session(args.session, out, args.rehearse)
    if args.cmd == "data":
        return make_data(args.quick)
    if args.cmd == "env":
        return env_report()
    return wait_for(args.folder, args.seconds)


if __name__ == "__main__":
    sys.exit(main())
