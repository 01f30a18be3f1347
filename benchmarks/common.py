"""Helpers shared by the benchmark scripts: machine description, a process-tree memory sampler, atomic JSON.

Nothing here imports torch or DALI at module import time, so the orchestrating process stays light (the
atomic writes are ``dali_lens.data.io``'s, which import neither); the versions are read from the installed
distributions' metadata.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import socket
import sys
import tempfile
import threading
import time
from importlib import metadata

from dali_lens.data.io import atomic_open, atomic_write_text

MB = 1024.0 * 1024.0
#: the repository root (the benchmarks run as ``python -m benchmarks.<script>`` from there) and the folder of
#: the committed results
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MEAN, STD = 0.5, 0.25  # the same per-band normalisation for every loader a benchmark compares (images: after /255)


# --------------------------------------------------------------------------------------------- machine info

def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _torch_cuda_version() -> str | None:
    """The CUDA version torch was built with, read from its ``version.py`` without importing torch."""
    try:
        files = metadata.files("torch") or []
    except metadata.PackageNotFoundError:
        return None
    path = next((f for f in files if str(f).replace(os.sep, "/") == "torch/version.py"), None)
    try:
        text = path.read_text() if path is not None else ""
    except OSError:
        return None
    m = re.search(r"^cuda\s*(?::\s*\S+)?\s*=\s*['\"]([^'\"]+)['\"]", text, re.M)
    return m.group(1) if m else None


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_ram_gb() -> float | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 2)
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """CPUs this process may run on (affinity mask), the number DataLoader workers should match."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


_GPU_PROBE = (
    "import json, torch\n"
    "p = torch.cuda.get_device_properties(0)\n"
    "print(json.dumps({'name': p.name, 'memory_gb': round(p.total_memory / 1024 ** 3, 2),"
    " 'count': torch.cuda.device_count(), 'cuda': torch.version.cuda}))\n"
)


def gpu_info() -> dict | None:
    """Name and memory of CUDA device 0, or None without CUDA.

    The properties are read in a short-lived subprocess so that this (orchestrating) process never creates a
    CUDA context: it would hold device memory during every measured run.
    """
    try:
        import subprocess

        import torch

        if not torch.cuda.is_available():
            return None
        out = subprocess.run([sys.executable, "-c", _GPU_PROBE], capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    except Exception:  # noqa: BLE001 - a broken driver must not stop a CPU benchmark
        return None


#: the commit file the GPU kit writes before a device call (``.git`` does not travel to the device machine):
#: benchmarks/gpu_prepare.sh writes it, every device call of the plan names ``.gpu-meta`` in ``carry``
COMMIT_FILE = os.path.join(ROOT, ".gpu-meta", "COMMIT")


def git_commit() -> str | None:
    """The checkout's commit: ``git rev-parse HEAD`` (with ``-dirty`` when tracked files changed), else the first
    line of :data:`COMMIT_FILE` (a 40-hex commit, optionally ``-dirty``), else None."""
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if head.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip()):
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=10)
            return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open(COMMIT_FILE) as fh:
            line = fh.readline().strip()
    except OSError:
        return None
    return line if re.fullmatch(r"[0-9a-f]{40}(-dirty)?", line) else None


def machine_info(with_gpu: bool = True) -> dict:
    """Everything needed to read a result file later: host, CPU, RAM, GPU (name, memory, CUDA version), software
    versions and the git commit of the code measured."""
    return {
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gb": total_ram_gb(),
        "gpu": gpu_info() if with_gpu else None,
        "platform": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": _dist_version("torch"),
            "torchvision": _dist_version("torchvision"),
            "dali": _dist_version("nvidia-dali-cuda120", "nvidia-dali-cuda110", "nvidia-dali-cuda130",
                                  "nvidia-dali"),
            "numpy": _dist_version("numpy"),
            "pillow": _dist_version("pillow", "Pillow"),
            "astropy": _dist_version("astropy"),
            "dali_lens": _dist_version("dali-lens"),
            "cuda": _torch_cuda_version(),
        },
    }


def machine_line(info: dict) -> str:
    """One human line describing the machine, for tables and plot titles."""
    gpu = info.get("gpu")
    gpu_txt = f"{gpu['name']}" if gpu else "no GPU"
    v = info.get("versions", {})
    ram = info.get("ram_gb")
    return (f"{info.get('cpu_model', '?')}, {info.get('usable_cores') or info.get('logical_cores')} cores, "
            f"{ram:.0f} GiB RAM, {gpu_txt}; torch {v.get('torch')}, torchvision {v.get('torchvision')}, "
            f"DALI {v.get('dali')}, Python {v.get('python')}" if ram else
            f"{info.get('cpu_model', '?')}, {gpu_txt}")


def result_path(out: str | None, name: str, info: dict) -> str:
    """``out``, else the committed results' place for benchmark ``name`` on this machine:
    ``benchmarks/results/<name>-<gpu or host>.json``."""
    return out or os.path.join(RESULTS, f"{name}-{device_tag(info)}.json")


def child_env() -> dict:
    """This process's environment with the repository root first on PYTHONPATH, for measured subprocesses
    (``python -m benchmarks.<name>`` children import ``benchmarks`` and ``dali_lens`` from the checkout)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def device_tag(info: dict) -> str:
    """A file-name-safe tag for a results file: the GPU name when there is one, else the host name."""
    gpu = info.get("gpu")
    raw = gpu["name"] if gpu else info.get("hostname") or "host"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", raw).strip("-").lower() or "host"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable)] + sys.argv)


def utc_timestamp() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# --------------------------------------------------------------------------------------------- loader runs

#: the baselines a dali_lens loader is compared with (bench_loaders' backends); the "strongest baseline" of a
#: configuration is the fastest of these measured there
BASELINES = ("torchvision", "torchvision-strong", "baseline", "baseline-tensor-decode")


def strongest_baselines(runs: list[dict]) -> dict:
    """(format, size, scale_mode, batch) -> the fastest successful baseline run of that configuration in
    ``runs`` (bench_loaders records): what every dali_lens figure is quoted against."""
    best: dict = {}
    for r in runs:
        if r.get("ok") and r["backend"] in BASELINES:
            k = (r["format"], r["size"], r["scale_mode"], r["batch"])
            if k not in best or r["images_per_s"] > best[k]["images_per_s"]:
                best[k] = r
    return best


# --------------------------------------------------------------------------------------------- atomic JSON

def write_json_atomic(path: str, obj, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``dali_lens.data.io.atomic_open``), creating its folder;
    NaN/inf are refused (strict JSON)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_open(path, "w") as fh:
        json.dump(obj, fh, indent=indent, sort_keys=False, allow_nan=False)
        fh.write("\n")


def save_partial(out: str, benchmark: str, info: dict, records: list[dict]) -> None:
    """The runs so far as ``out``, rewritten after every run (``"finished": false``), so that a benchmark
    stopped by a time limit keeps what it measured; the complete JSON written at the end replaces it. (The first
    GPU session lost three benchmarks' figures so: each was cut before its only write.)"""
    write_json_atomic(out, {"benchmark": benchmark, "machine": info, "command": command_line(),
                            "timestamp": utc_timestamp(), "finished": False, "runs": records})


def save_result(doc: dict, out: str, plot=None) -> None:
    """A benchmark's JSON at ``out`` and, unless ``plot`` is None, its figure next to it (same name, .png)."""
    write_json_atomic(out, doc)
    if plot is not None:
        plot(doc, os.path.splitext(out)[0] + ".png")


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Write a matplotlib figure as PNG to ``path`` atomically (temporary file in the same folder, renamed
    when complete) and close it."""
    import matplotlib.pyplot as plt

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_open(path, "wb") as fh:
            fig.savefig(fh, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def child_main(run, cfg_json: str, result_path: str, **extra) -> int:
    """The measured subprocess's side: ``run(cfg)`` -> dict (plus ``extra``) written to ``result_path``.

    An exception is printed with its traceback and recorded as ``{"error": ...}`` for the parent, which keeps
    the failure in its results; the exit status is then 1.
    """
    try:
        res = run(json.loads(cfg_json))
        res.update(extra)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which records the failure
        import traceback

        traceback.print_exc()
        res = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
    write_json_atomic(result_path, res)
    return 0 if "error" not in res else 1


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` atomically, keeping the replaced file's permissions."""
    mode = os.stat(path).st_mode & 0o7777 if os.path.exists(path) else None
    atomic_write_text(path, text)
    if mode is not None:
        os.chmod(path, mode)


# --------------------------------------------------------------------------------------------- memory

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces: split after the last ')'
    rest = data[data.rfind(b")") + 2:].split()
    return int(rest[1]) if len(rest) > 1 else None


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from /proc/<pid>/stat; works without CONFIG_PROC_CHILDREN)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        pp = _ppid(pid)
        if pp is not None:
            parents.setdefault(pp, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, ()))
    return out


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class TreeMemorySampler(threading.Thread):
    """Background thread sampling the memory of a process and all its children (e.g. DataLoader workers).

    Every ``interval`` (50 ms) it sums the RSS of the tree (cheap: /proc/<pid>/statm). The headline figure
    is the summed PSS (proportional set size, /proc/<pid>/smaps_rollup): PSS charges each shared page once
    in total (copy-on-write pages and shared libraries inherited by forked workers, shared-memory batches),
    so it is what the tree really costs, while an RSS sum counts ~0.5 GB of torch libraries once per worker.
    Reading smaps_rollup walks the page tables (~15 ms for a 600 MB torch process), which at 50 ms for three
    processes would occupy a whole core of a 2-core machine and slow the run being measured; so PSS is read
    whenever the RSS sum reaches a new high (at most every ``pss_min_interval``) and otherwise every
    ``pss_interval`` seconds. Without smaps_rollup (old kernels) PSS falls back to RSS.
    """

    def __init__(self, pid: int, interval: float = 0.05, pss_min_interval: float = 0.2, pss_interval: float = 1.0):
        super().__init__(daemon=True, name=f"mem-sampler-{pid}")
        self.pid, self.interval = pid, interval
        self.pss_min_interval, self.pss_interval = pss_min_interval, pss_interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_procs = 0
        self.samples = 0
        self.pss_samples = 0
        self._last_pss_t = -1e9
        self._rss_at_last_pss = 0
        self._stop_evt = threading.Event()
        self._pss_ok = os.path.exists(f"/proc/{os.getpid()}/smaps_rollup")

    def sample(self, force_pss: bool = False) -> None:
        pids = process_tree(self.pid)
        rss_by = {p: _rss_bytes(p) for p in pids}
        rss_by = {p: r for p, r in rss_by.items() if r}
        if not rss_by:
            return
        rss = sum(rss_by.values())
        self.samples += 1
        self.peak_procs = max(self.peak_procs, len(rss_by))
        now = time.perf_counter()
        new_high = rss > self.peak_rss
        self.peak_rss = max(self.peak_rss, rss)
        due = now - self._last_pss_t >= (self.pss_min_interval if new_high or rss > self._rss_at_last_pss
                                         else self.pss_interval)
        if force_pss or due:
            self._read_pss(rss_by)
            self.pss_samples += 1
            self._last_pss_t, self._rss_at_last_pss = now, rss

    def _read_pss(self, rss_by: dict[int, int]) -> None:
        """Read the PSS of every process (``rss_by``: pid -> RSS bytes) and keep the peak of their sum."""
        pss = 0
        for p, r in rss_by.items():
            v = _pss_bytes(p) if self._pss_ok else None
            pss += v if v is not None else r
        self.peak_pss = max(self.peak_pss, pss)

    def run(self) -> None:
        while not self._stop_evt.is_set():
            t = time.perf_counter()
            self.sample()
            self._stop_evt.wait(max(0.005, self.interval - (time.perf_counter() - t)))

    def stop(self) -> dict:
        self._stop_evt.set()
        if self.is_alive():
            self.join(timeout=5)
        return {"peak_host_mb": round(self.peak_pss / MB, 1), "peak_rss_sum_mb": round(self.peak_rss / MB, 1),
                "memory_metric": "pss" if self._pss_ok else "rss", "memory_samples": self.samples,
                "pss_samples": self.pss_samples, "peak_processes": self.peak_procs}


# --------------------------------------------------------------------------------------------- CPU load

def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    with open("/proc/stat") as fh:
        vals = [float(v) for v in fh.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


class CpuAccount:
    """CPU used by the measured subprocess tree versus everything else on the machine during a run.

    ``foreign_cpu_frac`` is the share of the machine's CPU capacity used by *other* processes (other users'
    jobs, this orchestrator and its memory sampler) while the run was going: a busy machine makes numbers
    low and noisy; compare only runs with a small value.
    """

    def __init__(self) -> None:
        import resource

        self._res = resource
        self.t0 = time.perf_counter()
        self.busy0, self.total0 = _cpu_times()
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.child0 = r.ru_utime + r.ru_stime
        self.load0 = os.getloadavg()[0]

    def finish(self) -> dict:
        wall = time.perf_counter() - self.t0
        busy1, total1 = _cpu_times()
        r = self._res.getrusage(self._res.RUSAGE_CHILDREN)
        run_cpu = r.ru_utime + r.ru_stime - self.child0
        hz = os.sysconf("SC_CLK_TCK")
        busy = (busy1 - self.busy0) / hz
        ncpu = usable_cores()
        capacity = max(1e-9, (total1 - self.total0) / hz) or wall * ncpu
        return {"run_cpu_s": round(run_cpu, 2), "machine_busy_frac": round(busy / capacity, 3),
                "foreign_cpu_frac": round(max(0.0, busy - run_cpu) / capacity, 3),
                "loadavg_1min_start": round(self.load0, 2), "loadavg_1min_end": round(os.getloadavg()[0], 2)}


def _proc_cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid`` (clock ticks), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return 0
    f = data[data.rfind(b")") + 2:].split()
    return int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])  # fields 14-17 of proc(5)


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process (all threads), its reaped children and its live descendants.

    Consistent across a child's exit (its time moves from 'live' into RUSAGE_CHILDREN), so the difference of
    two readings is the CPU the whole tree spent in between: DALI threads, DataLoader workers, everything.
    """
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime
    hz = os.sysconf("SC_CLK_TCK")
    pid = os.getpid()
    return total + sum(_proc_cpu_ticks(p) for p in process_tree(pid) if p != pid) / hz


def machine_load(seconds: float = 1.0) -> float:
    """Fraction of the machine's CPU busy over ``seconds`` (for waiting until it is quiet)."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(1e-9, t1 - t0)


# --------------------------------------------------------------------------------------------- measured runs

def run_measured(module: str, cfg: dict, timeout: float, log, rec: dict, env: dict | None = None,
                 sampler=None, cwd: str | None = None) -> dict:
    """Run ``python -m module --_child CFG --_result FILE`` (whose child side is :func:`child_main`; from the
    repository root unless ``cwd``, so that ``benchmarks`` is importable) in a fresh
    subprocess, sampling the memory of its process tree (``sampler``, default :class:`TreeMemorySampler`)
    and the CPU meanwhile. ``rec`` (the run's identifying fields) is completed and returned: ``ok``, the
    child's result, the memory and CPU figures, ``subprocess_s``; on failure ``error`` and the output's tail.
    """
    import subprocess

    fd, result_path = tempfile.mkstemp(prefix="bench-child-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, "-m", module, "--_child", json.dumps(cfg), "--_result", result_path]
    t = time.perf_counter()
    cpu = CpuAccount()
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem_sampler = (sampler or TreeMemorySampler)(proc.pid, interval=0.05)
    mem_sampler.start()
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        rc = "timeout"
    mem = mem_sampler.stop()
    mem.update(cpu.finish())
    try:
        with open(result_path) as fh:
            child = json.load(fh)
    except (OSError, ValueError):
        child = None
    finally:
        try:
            os.unlink(result_path)
        except OSError:
            pass
    wall = round(time.perf_counter() - t, 2)
    if rc != 0 or not child or "error" in child:
        err = (child or {}).get("error") or f"exit status {rc}"
        tail = "\n".join((out or "").strip().splitlines()[-15:])
        log(f"    FAILED: {err}\n{tail}")
        rec.update({"ok": False, "error": err, "output_tail": tail[-2000:], "subprocess_s": wall, **mem})
        return rec
    rec.update({"ok": True, **child, **mem, "subprocess_s": wall})
    return rec


def finish_log(doc: dict, records: list[dict], out: str, log) -> int:
    """The closing lines of a benchmark that records its library state: a warning if dali_lens changed
    during the run, then the count of runs; exit status 1 if any failed."""
    if doc.get("library", {}).get("changed_during_run"):
        log("WARNING: dali_lens/*.py changed while the benchmark ran (" + ", ".join(doc["library"]["changed_files"])
            + "): not every run measured the same code; see each run's library_sha")
    failed = [r for r in records if not r["ok"]]
    log(f"done in {doc['total_s']:.0f} s; {len(records) - len(failed)} ok, {len(failed)} failed -> {out}")
    return 1 if failed else 0
