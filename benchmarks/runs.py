"""The measured-run harness of the training benchmarks (bench_multiscale_memory.py, bench_train.py).

Which library was measured (git HEAD, uncommitted files, a hash of dali_lens/*.py, checked again at the
end); the data sets and GPU description prepared in a subprocess; one configuration launched in a fresh
``python -m <benchmark> --_child CFG`` while :class:`DataMemorySampler` samples its process tree; the shared
options and the hidden subprocess modes; where results go. Like the parents that use it, this module never
imports torch (see :func:`prepare`).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

from benchmarks import common


def _library_files() -> dict[str, str]:
    """sha256 (16 hex digits) of every dali_lens/*.py file as it is on disk now."""
    import glob
    import hashlib

    pkg = os.path.join(common.ROOT, "dali_lens")
    out = {}
    for path in sorted(glob.glob(os.path.join(pkg, "**", "*.py"), recursive=True)):
        with open(path, "rb") as fh:
            out[os.path.relpath(path, pkg)] = hashlib.sha256(fh.read()).hexdigest()[:16]
    return out


def library_tree_sha(files: dict[str, str] | None = None) -> str:
    """One hash of the dali_lens/*.py files (the library under test may change while a benchmark runs)."""
    import hashlib

    files = _library_files() if files is None else files
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()[:16]


def library_state() -> dict:
    """Which library was measured: git HEAD, the dali_lens files that differ from it, and the tree hash."""
    def git(*a):
        try:
            out = subprocess.run(["git", "-C", common.ROOT, *a], capture_output=True, text=True, timeout=30)
            return out.stdout.strip("\n") if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    files = _library_files()
    status = git("status", "--porcelain", "--", "dali_lens")
    return {"git_head": git("rev-parse", "HEAD"), "uncommitted": status.splitlines() if status else [],
            "tree_sha256": library_tree_sha(files), "_files": files}


def check_library(state: dict, records: list[dict]) -> dict:
    """Add the end-of-run tree hash, whether the library changed while the benchmark ran, and which files."""
    state = dict(state)
    start = state.pop("_files", {})
    end = _library_files()
    seen = {r.get("library_sha") for r in records if r.get("library_sha")}
    state["tree_sha256_end"] = library_tree_sha(end)
    state["changed_during_run"] = (state["tree_sha256_end"] != state["tree_sha256"]
                                   or bool(seen - {state["tree_sha256"]}))
    state["changed_files"] = sorted(k for k in set(start) | set(end) if start.get(k) != end.get(k))
    state["tree_sha256_per_run"] = sorted(seen)
    return state


class DataMemorySampler(common.TreeMemorySampler):
    """common.TreeMemorySampler that also keeps the peak of the tree's *data* memory: Pss_Anon + Pss_Shmem.

    PSS splits a file-backed page (torch's, DALI's shared libraries) among every process on the machine
    that maps it, so on a machine where other jobs run the same venv the PSS of a run drifts with how many
    of them are alive. Anonymous and shared-memory pages are only shared inside the measured tree (fork
    copy-on-write, DataLoader batches in shared memory), so their PSS sum (peak_data_mb) is what the run's
    data really costs, independent of other processes. Same schedule as the base class: one smaps_rollup
    read per process when the PSS is due.
    """

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.peak_data = 0

    @staticmethod
    def _rollup(pid: int) -> tuple[int, int] | None:
        pss = data = None
        try:
            with open(f"/proc/{pid}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss = int(line.split()[1]) * 1024
                    elif line.startswith(("Pss_Anon:", "Pss_Shmem:")):
                        data = (data or 0) + int(line.split()[1]) * 1024
        except OSError:
            return None
        return (pss, data) if pss is not None and data is not None else None

    def _read_pss(self, rss_by: dict[int, int]) -> None:
        pss = data = 0
        for p, r in rss_by.items():
            v = self._rollup(p) if self._pss_ok else None
            pss += v[0] if v else r
            data += v[1] if v else 0
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_data = max(self.peak_data, data)

    def stop(self) -> dict:
        out = super().stop()
        out["peak_data_mb"] = round(self.peak_data / common.MB, 1) if self._pss_ok else None
        return out


def add_run_args(p: argparse.ArgumentParser, timeout: float, data_help: str) -> None:
    """The options bench_multiscale_memory.py and bench_train.py share, and their hidden subprocess modes."""
    p.add_argument("--timeout", type=float, default=timeout,
                   help=f"seconds before one run is killed (default {timeout:g})")
    p.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dali-lens-bench"),
                   help=f"{data_help} (default ~/.cache/dali-lens-bench)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_prepare", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)


def internal_entry(args, run_child) -> int | None:
    """Serve the hidden modes: ``--_prepare`` (data sets, GPU description) and ``--_child`` (one measured
    run, tagged with the library files as this process imports them). None when neither was asked for."""
    if args._prepare:
        common.write_json_atomic(args._result, prepare_child(json.loads(args._prepare)))
        return 0
    if args._child:
        return common.child_main(run_child, args._child, args._result, library_sha=library_tree_sha())
    return None


def prepare(module: str, data: list[dict], seed: int, data_dir: str, log) -> dict:
    """GPU description and data sets, in a subprocess: this parent process never imports torch.

    That matters for the memory figures: PSS splits a shared page between every process that maps it, so
    torch's ~0.4 GB of libraries mapped by the parent as well would be charged half to a measured run.
    ``data``: [{"format", "size", "n"}]; returns {"gpu": ..., "roots": {"fmt-size": root}, "generator": name}.
    """
    fd, result_path = tempfile.mkstemp(prefix="bench-prepare-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", module, "--_prepare", json.dumps({"data": data, "seed": seed, "data_dir": data_dir}),
           "--_result", result_path]
    try:
        proc = subprocess.run(cmd, cwd=common.ROOT, env=common.child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=1800)
        for line in proc.stdout.splitlines():
            log(line)
        if proc.returncode != 0:
            raise SystemExit(f"preparing the data failed (exit status {proc.returncode})")
        with open(result_path) as fh:
            return json.load(fh)
    finally:
        try:
            os.unlink(result_path)
        except OSError:
            pass


def prepare_child(spec: dict) -> dict:
    from benchmarks import bench_loaders as bl  # imports torch: this runs in the preparing subprocess

    roots, gens = {}, set()
    for d in spec["data"]:
        root, gen = bl.prepare_dataset(spec["data_dir"], d["format"], d["size"], d["n"], spec["seed"],
                                       lambda m: print(m, flush=True))
        roots[f"{d['format']}-{d['size']}"] = root
        gens.add(gen)
    return {"gpu": common.gpu_info(), "roots": roots, "generator": ",".join(sorted(gens))}


def launch(cfg: dict, timeout: float, log, module: str,
           keys=("kind", "backend", "variant", "batch")) -> dict:
    """Run one configuration in a fresh subprocess while sampling the memory of its process tree."""
    env = common.child_env()
    for part in (cfg.get("variant") or "").split("+"):
        if part.startswith("arenas="):  # glibc reads it at start-up: it cannot be set from inside the child
            env["MALLOC_ARENA_MAX"] = part.split("=", 1)[1]
    rec = {k: cfg.get(k) for k in keys}
    rec["n"] = cfg["n"] if cfg.get("kind") != "model-only" else None
    return common.run_measured(module, cfg, timeout, log, rec, env=env, sampler=DataMemorySampler)


def host_tag() -> str:
    return common.device_tag({"hostname": socket.gethostname()})


def out_path(arg: str | None, prefix: str) -> str:
    """``--out``: a .json file path, or a folder (default benchmarks/results) receiving <prefix>-<host>.json."""
    if arg and arg.endswith(".json"):
        return os.path.abspath(arg)
    return os.path.join(os.path.abspath(arg or common.RESULTS), f"{prefix}-{host_tag()}.json")
