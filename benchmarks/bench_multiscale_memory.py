#!/usr/bin/env python
"""Peak memory of multi-scale training: dali_lens's one-decode pipeline vs the legacy mechine_lensing mode.

What is compared (64 px g,r,i PNG cutouts -> scales 64,112,224, equal batch size, training mode)
  dali-cpu   build_loader(dataset, backend='dali-cpu', scales=(64,112,224), batch_size=B, train=True)
  dali       the same with backend='dali' (only when CUDA is available)
  baseline   the legacy multi-scale mode of mechine_lensing (bench_loaders.LegacyMultiScaleDataset): a torch
             Dataset whose __getitem__ opens the image with PIL and materialises every scale of the sample
             (Resize((s, s)) -> ToTensor -> Normalize per scale), collated by a DataLoader with
             num_workers = usable cores (persistent, fork, pin_memory only with CUDA, shuffle, drop_last)
The model is the same multi-scale small_cnn member (dali_lens.trainers.members.make_member, AdamW). The step:
  ours       dali_lens.trainers.loop.train_epoch, exactly what `--trainer multiscale --scales 64,112,224` runs:
             the loader's uint8 batches (the trainer's --dtype auto) are normalised per scale just before that
             scale's forward pass, forward + backward per scale, one scale's graph alive at a time
  legacy     (--baseline-step legacy, the default) mechine_lensing's MultiScaleTrainer.train_epoch in standard
             mode: every scale forwarded, losses averaged, one backward, so all three graphs are alive at once
             (its scale grouping puts 64, 112 and 224 in one group); --baseline-step ours gives the baseline
             our step instead, which isolates the loader

Kinds of run, each in a fresh subprocess (nothing shared, no warm caches):
  train        loader + model step, one epoch (the figure the target is about); also our trainer with a
               memory knob (--train-variants, default micro-batch=16 and memory-budget=256MB: `--micro-batch
               16`, the same update from gradients accumulated over 16-sample chunks; `--memory-budget 256MB`,
               each scale cut into the largest chunks whose saved activations fit in 256 MB), reported beside
               the as-shipped figure
  model-only   each step (ours-step, legacy-step) fed one resident synthetic float batch (no loader, no
               decoding): the floor that the model, its autograd graphs and the optimizer cost whatever the
               loader does
  import-floor a process that imports and stops: torch; torch+dali (plus DALI and dali_lens.pipelines);
               run (everything a measured run imports): what any run holds before it touches data (not in
               --quick)
  loader-only  the loader alone (no model), 1 warm-up + timed epochs over --loader-n images: the memory the
               loader itself adds, not diluted by the model; also run for dali-cpu variants that change
               one knob (see --variants) to find out where the DALI loader's memory goes

Memory: common.TreeMemorySampler in this (parent) process samples the subprocess and all its children
(DataLoader workers) every 50 ms; peak_host_mb = peak of the summed PSS (shared pages counted once),
peak_rss_sum_mb = peak of the summed RSS. peak_data_mb = peak of the summed Pss_Anon + Pss_Shmem: the data
alone, without shared-library pages, whose PSS shrinks when other processes on the machine (other jobs using
the same venv) map the same torch/DALI libraries; it is the figure that does not drift with other jobs. This
parent process never imports torch, so that it does not share (and halve) those pages itself. The child
also reports its own kernel high-water mark (main_maxrss_mb, ru_maxrss: exact, no sampling, main process).
With CUDA, peak_gpu_mb = torch.cuda.max_memory_allocated and peak_gpu_device_mb = the peak device-wide use
above the run's start, read after every step (this includes DALI's own device memory, which torch does not
see).

Target (from the issue): dali-lens >= 50 % lower peak host memory than the legacy mode at equal batch size
(and GPU memory on a GPU). The JSON's "targets" reports the reduction for the train runs and, for context,
for the loader-only runs and for the loader-attributable part (train peak - model-only floor).

dali-cpu variants (loader-only, batch = the largest of --batches), each emulating one library setting
(default list: as-shipped, queue=2, threads=1, dtype=float32):
  as-shipped         the library as it is (the JSON's "library" records which: git HEAD, uncommitted files,
                     a hash of dali_lens/*.py; num_threads = usable cores)
  queue=K            pipeline prefetch_queue_depth=K, through LoaderOptions.prefetch_queue_depth
                     (read by dali_backend._build since aeaf1a4: default 1 on the CPU, 2 on the GPU; it was
                     hard-coded to 2 before) and, for older versions, by wrapping pipeline_def
                     (benchmarks/profile_dali_cpu._override_pipeline_kwargs)
  threads=N          num_threads=N, through LoaderOptions(num_workers=N) (a real option)
  dtype=float32|float16|uint8 LoaderOptions(dtype=...) (a real option; as shipped, 8-bit images come out as
                     uint8 and the trainer normalises them: dtype=float32 shows what that saves)
  no-finite-check    BatchChecker without the per-batch NaN/inf scan of 8-bit images
                     (profile_dali_cpu.apply(['no-finite-check']); what DaliLoader does since aeaf1a4)
  cheap-finite       the NaN/inf scan done on per-sample sums (one reduction, no full-size temporaries)
                     instead of torch.isfinite over the largest scale (profile_dali_cpu.apply(['cheap-finite']))
  arenas=N           the child runs with MALLOC_ARENA_MAX=N: tests whether glibc's per-thread malloc arenas
                     (up to 8 per core) retain freed DALI buffers (memory kept mapped but no longer used);
                     not in the default list: arenas=2 measured -13 and -51 MB at batch 128, within noise
Variants combine with '+', e.g. queue=2+threads=1.

Modes: default (< 8 min on 2 busy cores): batches 64,128 over --n 128 images (one epoch = 2 / 1 steps, for
time: a CPU runs this step at a few images/s), model-only floor of 1 step, loader-only 1 warm-up + 1 timed
epoch of 1024 images (8-16 batches: the loaders' steady state, their prefetch queues full), the variants
above at batch 128, every loader-only configuration measured twice (--repeats; median and range reported).
Caveat: a 1-2 step epoch does not give the baseline's DataLoader time to fill all of its 2 x workers
prefetched batches (DALI's queue of 2 fills at once), so the train runs understate the baseline's loader
memory a little; the loader-only runs show the steady state. --quick (smoke test): batch 4, one step, no
model-only floor, no variants. Data are generated once with dali_lens.data.synthetic.generate_dataset (via
bench_loaders.prepare_dataset) and cached in --data-dir. Output: multiscale-memory-<host>.json and a bar
chart (.png) in --out (a folder, or a .json path).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402  (benchmarks/common.py)

SCALES = (64, 112, 224)
BAND_NAMES = ("g", "r", "i")
MEAN, STD = 0.5, 0.25  # the same per-band normalisation for every loader (images after /255)
ARCH = "small_cnn"
DEFAULT_VARIANTS = ("as-shipped", "queue=2", "threads=1", "dtype=float32")
QUICK_VARIANTS = ("as-shipped",)
TRAIN_VARIANTS = ("micro-batch=16", "memory-budget=256MB")


def _library_files() -> dict[str, str]:
    """sha256 (16 hex digits) of every dali_lens/*.py file as it is on disk now."""
    import glob
    import hashlib

    pkg = os.path.join(ROOT, "dali_lens")
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
            out = subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True, timeout=30)
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


def _bench_loaders():
    """The baseline (LegacyMultiScaleDataset / build_baseline) and data helpers of bench_loaders.py."""
    try:
        import bench_loaders
    except Exception as exc:  # noqa: BLE001
        raise SystemExit(f"benchmarks/bench_loaders.py is needed for the legacy baseline and the data set: {exc}")
    return bench_loaders


# ============================================================================================ child side

def _subset(root: str, n: int, seed: int):
    """``n`` samples (seeded choice over every split, both classes) of the data set at ``root``."""
    import numpy as np

    from dali_lens.data import Dataset

    full = _bench_loaders().load_all_samples(root)
    if n >= len(full):
        return full
    pick = sorted(np.random.default_rng([seed, 77]).choice(len(full), size=n, replace=False).tolist())
    return Dataset([full.samples[i] for i in pick], full.bands, full.kind, full.root, "train", full.hdus, full.shape)


def _apply_variant(variant: str) -> dict:
    """Install the monkeypatches of ``variant``; returns LoaderOptions overrides."""
    over: dict = {}
    for part in [p for p in variant.split("+") if p and p != "as-shipped"]:
        if part.startswith("queue="):
            import profile_dali_cpu

            from dali_lens.pipelines import dali_backend

            k = int(part.split("=")[1])
            # LoaderOptions.prefetch_queue_depth where the library reads it (since the working-tree
            # change after 23ffd12), and the pipeline_def wrapper for versions that hard-code the depth
            over["prefetch_queue_depth"] = k
            profile_dali_cpu._override_pipeline_kwargs(dali_backend, prefetch_queue_depth=k)
        elif part.startswith("threads="):
            over["num_workers"] = int(part.split("=")[1])
        elif part.startswith("dtype="):
            over["dtype"] = part.split("=")[1]
        elif part.startswith("arenas="):
            pass  # set in the child's environment by launch()
        elif part.startswith(("micro-batch=", "memory-budget=")):
            pass  # trainer options (--micro-batch, --memory-budget), read by run_child
        elif part in ("no-finite-check", "cheap-finite"):
            import profile_dali_cpu

            profile_dali_cpu.apply([part])
        else:
            raise ValueError(f"unknown variant part {part!r}")
    return over


def _build(cfg: dict, dataset, cuda: bool):
    backend = cfg["backend"]
    if backend == "baseline":
        return _bench_loaders().build_baseline(dataset, SCALES, cfg["batch"], cuda, False, cfg["workers"], True)
    from dali_lens.pipelines import build_loader

    from dali_lens.trainers.config import TrainConfig
    from dali_lens.trainers.runner import output_dtype

    # as shipped: the output dtype `python -m dali_lens.train` uses (uint8 for 8-bit images, normalised per
    # scale on the training device by the trainer)
    opts = dict(scales=SCALES, batch_size=cfg["batch"], train=True, mean=(MEAN,) * dataset.bands,
                std=(STD,) * dataset.bands, num_workers=cfg["workers"], dtype=output_dtype(TrainConfig(), dataset))
    opts.update(_apply_variant(cfg.get("variant", "as-shipped")))
    return build_loader(dataset, backend=backend, **opts)


class _GpuPeak:
    """Device-wide memory above the run's start (includes DALI's device memory), read when asked."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.used0 = self.peak = 0
        if cuda:
            import torch

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            free, total = torch.cuda.mem_get_info()
            self.used0 = self.peak = total - free

    def read(self) -> None:
        if self.cuda:
            import torch

            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)

    def record(self) -> dict:
        if not self.cuda:
            return {"peak_gpu_mb": None, "peak_gpu_reserved_mb": None, "peak_gpu_device_mb": None}
        import torch

        torch.cuda.synchronize()
        self.read()
        return {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / common.MB, 1),
                "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved() / common.MB, 1),
                "peak_gpu_device_mb": round((self.peak - self.used0) / common.MB, 1)}


class _ResidentBatches:
    """A loader stand-in for the model-only floor: the same synthetic contract batch, ``steps`` times."""

    def __init__(self, batch: int, bands: int, steps: int, device):
        import torch

        g = torch.Generator().manual_seed(0)
        self.batch = {"image": {s: torch.randn(batch, bands, s, s, generator=g).to(device) for s in SCALES},
                      "label": (torch.arange(batch) % 2).to(device), "index": torch.arange(batch).to(device)}
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def legacy_train_epoch(member, loader, device, on_step=None) -> dict:
    """mechine_lensing's multi-scale training step (``MultiScaleTrainer.train_epoch``, standard mode).

    Its ``_group_scales_by_memory`` puts 64, 112 and 224 in one group ((s/224)^2 sums to 1.33 < its budget
    of 2.0), so every scale is forwarded, the losses averaged, and one backward pass made: the autograd graphs
    of all three scales are alive at once. dali_lens's ``train_epoch`` keeps one scale's graph at a time.
    Same model, optimizer (AdamW) and schedule as the dali_lens member, so only the step differs.
    """
    import torch.nn.functional as F

    m = member
    m.model.train()
    steps, seen, total, wait, t0 = 0, 0, 0.0, 0.0, time.perf_counter()
    fetch = t0
    for batch in loader:
        wait += time.perf_counter() - fetch
        y = batch["label"].to(device).float()
        loss = 0.0
        for s in SCALES:
            z = m.model(batch["image"][s].to(device, non_blocking=True)).float()
            loss = loss + F.binary_cross_entropy_with_logits(z, y)
        loss = loss / len(SCALES)
        m.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        m.optimizer.step()
        m.scheduler.step()
        total += float(loss.detach())
        steps += 1
        seen += len(y)
        if on_step is not None:
            on_step(steps)
        fetch = time.perf_counter()
    elapsed = time.perf_counter() - t0
    return {"loss": {"legacy": total / max(1, steps)}, "steps": steps, "samples": seen, "seconds": elapsed,
            "images_per_s": seen / max(elapsed, 1e-9), "data_wait_fraction": wait / max(elapsed, 1e-9)}


def _maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # KiB on Linux


def import_floor(variant: str) -> dict:
    """A process that imports and stops: ``torch``; ``torch+dali`` (plus DALI's PyTorch plugin and
    dali_lens.pipelines); ``run`` (everything a measured run imports: the trainers and the legacy baseline).
    What any run of that kind holds before it touches data."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    if variant in ("torch+dali", "run"):
        sys.path.insert(0, ROOT)
        import nvidia.dali.plugin.pytorch  # noqa: F401

        import dali_lens.pipelines  # noqa: F401
    if variant == "run":
        import dali_lens.trainers.loop  # noqa: F401
        import dali_lens.trainers.members  # noqa: F401

        _bench_loaders()
    time.sleep(1.0)  # let the parent's sampler read the settled process
    return {"main_maxrss_mb": _maxrss_mb(), "child_s": round(time.perf_counter() - t0, 2)}


def run_child(cfg: dict) -> dict:
    if cfg["kind"] == "import-floor":
        return import_floor(cfg["variant"])
    import torch

    sys.path.insert(0, ROOT)
    from dali_lens.trainers.config import TrainConfig
    from dali_lens.trainers.loop import train_epoch
    from dali_lens.trainers.members import MemberSpec, make_member

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    kind = cfg["kind"]
    t0 = time.perf_counter()
    rec: dict = {"torch_threads": torch.get_num_threads()}

    if kind == "loader-only":
        dataset = _subset(cfg["root"], cfg["n"], cfg["seed"])
        loader = _build(cfg, dataset, cuda)
        gpu = _GpuPeak(cuda)
        rec["build_s"] = round(time.perf_counter() - t0, 3)
        per_epoch, times = 0, []
        for e in range(1 + cfg["loader_epochs"]):
            n, t = 0, time.perf_counter()
            for batch in loader:
                x = batch["image"][max(SCALES)]
                if cuda:
                    x = x.to(device, non_blocking=True)
                    gpu.read()
                assert tuple(x.shape[1:]) == (dataset.bands, max(SCALES), max(SCALES)), tuple(x.shape)
                n += int(batch["label"].shape[0])
            times.append(time.perf_counter() - t)
            per_epoch = n
        timed = sum(times[1:])
        rec.update({"images_per_epoch": per_epoch, "epochs": len(times), "warmup_epoch_s": round(times[0], 3),
                    "images_per_s": round(per_epoch * (len(times) - 1) / timed, 1) if timed > 0 else None,
                    "dataset_samples": len(dataset), **gpu.record()})
    else:
        if kind == "model-only":
            bands = len(BAND_NAMES)
            gpu = _GpuPeak(cuda)
            loader = _ResidentBatches(cfg["batch"], bands, cfg["floor_steps"], device)
            n_samples = cfg["batch"] * cfg["floor_steps"]
        else:
            dataset = _subset(cfg["root"], cfg["n"], cfg["seed"])
            bands, n_samples = dataset.bands, len(dataset)
            gpu = _GpuPeak(cuda)
            loader = _build(cfg, dataset, cuda)
        knobs = dict(v.split("=", 1) for v in (cfg.get("variant") or "").split("+")
                     if v.startswith(("micro-batch=", "memory-budget=")))
        tc = TrainConfig(trainer="multiscale", arch=ARCH, scales=",".join(map(str, SCALES)), batch_size=cfg["batch"],
                         epochs=1, workers=cfg["workers"], progress=False, seed=cfg["seed"],
                         micro_batch=int(knobs.get("micro-batch", 0)), memory_budget=knobs.get("memory-budget", "off"))
        member = make_member(MemberSpec(ARCH, SCALES, cfg["seed"]), bands, tc, len(loader), device)
        rec["build_s"] = round(time.perf_counter() - t0, 3)
        if cfg.get("step", "ours") == "legacy":
            stats = legacy_train_epoch(member, loader, device, on_step=lambda step: gpu.read())
        else:
            stats = train_epoch([member], loader, tc, device, 0, on_step=lambda step: gpu.read(),
                                show_progress=False)
        if stats["steps"] == 0:
            raise RuntimeError(f"no training step ran ({n_samples} samples, batch {cfg['batch']})")
        rec.update({"steps": stats["steps"], "images": stats["samples"], "epoch_s": round(stats["seconds"], 3),
                    "images_per_s": round(stats["images_per_s"], 2),
                    "data_wait_fraction": round(stats["data_wait_fraction"], 4),
                    "step": cfg.get("step", "ours"),
                    "loss": round(float(next(iter(stats["loss"].values()))), 4),
                    # samples per forward/backward at each scale (--micro-batch / --memory-budget) and the
                    # measured bytes autograd keeps per sample (budget runs only)
                    "chunk_sizes": next(iter(stats.get("chunk_sizes", {}).values()), None),
                    "saved_bytes_per_sample": stats.get("saved_bytes_per_sample") or None,
                    "dataset_samples": n_samples, **gpu.record()})
    rec["main_maxrss_mb"] = _maxrss_mb()
    rec["child_s"] = round(time.perf_counter() - t0, 2)
    rec["dali_imported"] = "nvidia.dali" in sys.modules
    del loader
    gc.collect()
    return rec


# ============================================================================================ parent side

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
    """The options this script and bench_train.py share, and their hidden subprocess modes."""
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


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + HERE + os.pathsep + env.get("PYTHONPATH", "")
    return env


def prepare(script: str, data: list[dict], seed: int, data_dir: str, log) -> dict:
    """GPU description and data sets, in a subprocess: this parent process never imports torch.

    That matters for the memory figures: PSS splits a shared page between every process that maps it, so
    torch's ~0.4 GB of libraries mapped by the parent as well would be charged half to a measured run.
    ``data``: [{"format", "size", "n"}]; returns {"gpu": ..., "roots": {"fmt-size": root}, "generator": name}.
    """
    fd, result_path = tempfile.mkstemp(prefix="bench-prepare-", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, script, "--_prepare", json.dumps({"data": data, "seed": seed, "data_dir": data_dir}),
           "--_result", result_path]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
    bl = _bench_loaders()
    roots, gens = {}, set()
    for d in spec["data"]:
        root, gen = bl.prepare_dataset(spec["data_dir"], d["format"], d["size"], d["n"], spec["seed"],
                                       lambda m: print(m, flush=True))
        roots[f"{d['format']}-{d['size']}"] = root
        gens.add(gen)
    return {"gpu": common.gpu_info(), "roots": roots, "generator": ",".join(sorted(gens))}


def launch(cfg: dict, timeout: float, log, script: str | None = None,
           keys=("kind", "backend", "variant", "batch")) -> dict:
    """Run one configuration in a fresh subprocess while sampling the memory of its process tree."""
    env = _child_env()
    for part in (cfg.get("variant") or "").split("+"):
        if part.startswith("arenas="):  # glibc reads it at start-up: it cannot be set from inside the child
            env["MALLOC_ARENA_MAX"] = part.split("=", 1)[1]
    rec = {k: cfg.get(k) for k in keys}
    rec["n"] = cfg["n"] if cfg.get("kind") != "model-only" else None
    return common.run_measured(script or os.path.abspath(__file__), cfg, timeout, log, rec, env=env,
                               sampler=DataMemorySampler, cwd=ROOT)


def batch_payload_mb(batch: int, bands: int = len(BAND_NAMES)) -> float:
    """Size of one float32 multi-scale batch (every scale): the unit in which loaders hold memory."""
    return round(batch * bands * sum(s * s for s in SCALES) * 4 / common.MB, 1)


def build_plan(args, have_cuda: bool) -> list[dict]:
    ours = ["dali-cpu"] + (["dali"] if have_cuda else [])
    if args.backends:
        ours = [b for b in args.backends.split(",") if b != "baseline"]
        bad = [b for b in ours if b not in ("dali-cpu", "dali")]
        if bad:
            raise SystemExit(f"unknown backend(s) {bad}: dali-cpu, dali (the baseline always runs)")
        if "dali" in ours and not have_cuda:
            raise SystemExit("backend 'dali' needs CUDA")
    plan = []
    # repeats run in rounds (A B C, A B C), so that a slow drift of the machine hits every configuration alike
    for rep in range(args.train_repeats):
        for b in args.batch_list:
            for backend in ours + ["baseline"]:
                plan.append({"kind": "train", "backend": backend, "variant": "as-shipped", "batch": b, "rep": rep,
                             "step": args.baseline_step if backend == "baseline" else "ours"})
            for v in args.train_variant_list:  # our trainer with a memory knob, e.g. --micro-batch 16
                plan.append({"kind": "train", "backend": ours[0], "variant": v, "batch": b, "rep": rep, "step": "ours"})
            if not args.quick:  # the smoke test skips the floors (each step fed a resident batch)
                for step in sorted({"ours", args.baseline_step}):
                    plan.append({"kind": "model-only", "backend": None, "variant": f"{step}-step", "batch": b,
                                 "rep": rep, "step": step})
    if not args.quick:  # the floor under every figure: a process that imports torch (and DALI) and stops
        for rep in range(args.repeats):
            for v in ("torch", "torch+dali", "run"):
                plan.append({"kind": "import-floor", "backend": None, "variant": v, "batch": None, "rep": rep})
    if not args.no_loader_only:
        for rep in range(args.repeats):
            for b in args.batch_list:
                for backend in ours + ["baseline"]:
                    plan.append({"kind": "loader-only", "backend": backend, "variant": "as-shipped", "batch": b,
                                 "rep": rep})
            vb = max(args.batch_list)
            for v in args.variant_list:
                if v != "as-shipped":
                    plan.append({"kind": "loader-only", "backend": "dali-cpu", "variant": v, "batch": vb, "rep": rep})
    return plan


AGG_KEYS = ("peak_host_mb", "peak_data_mb", "peak_rss_sum_mb", "main_maxrss_mb", "peak_gpu_mb",
            "peak_gpu_device_mb", "images_per_s")


def aggregate(records: list[dict]) -> list[dict]:
    """One row per configuration over its repeats: the median of each measure, with min, max and all values."""
    import statistics

    groups: dict = {}
    for r in records:
        if r.get("ok"):
            groups.setdefault((r["kind"], r["backend"], r["variant"], r["batch"]), []).append(r)
    out = []
    for (kind, backend, variant, batch), rs in groups.items():
        row = {"kind": kind, "backend": backend, "variant": variant, "batch": batch, "repeats": len(rs), "ok": True,
               "step": rs[0].get("step")}
        for k in AGG_KEYS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if not vals:
                row[k] = None
                continue
            row[k] = round(statistics.median(vals), 1)
            if len(vals) > 1:
                row[f"{k}_min"], row[f"{k}_max"], row[f"{k}_all"] = min(vals), max(vals), vals
        out.append(row)
    return out


def _find(recs, **kw):
    for r in recs:
        if r.get("ok") and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def _spread(r: dict, key: str = "peak_host_mb") -> str:
    return f" [{r[key + '_min']:.0f}-{r[key + '_max']:.0f}]" if r.get(key + "_min") is not None else ""


def _pct(ours: float, base: float) -> float:
    return round(100.0 * (1.0 - ours / base), 1)


def targets(records: list[dict], batches, backends) -> list[dict]:
    """Reduction of peak host (and GPU) memory vs the legacy baseline; the issue asks for >= 50 %."""
    out = []
    for b in batches:
        base = _find(records, kind="train", backend="baseline", batch=b, variant="as-shipped")
        floor = _find(records, kind="model-only", batch=b, variant="ours-step")
        base_floor = _find(records, kind="model-only", batch=b, variant=f"{base['step']}-step") if base else None
        lbase = _find(records, kind="loader-only", backend="baseline", batch=b, variant="as-shipped")
        for backend in backends:
            ours = _find(records, kind="train", backend=backend, batch=b, variant="as-shipped")
            if not ours or not base:
                continue
            e = {"batch": b, "backend": backend, "ours_peak_host_mb": ours["peak_host_mb"],
                 "baseline_peak_host_mb": base["peak_host_mb"], "repeats": min(ours["repeats"], base["repeats"]),
                 "host_reduction_pct": _pct(ours["peak_host_mb"], base["peak_host_mb"]),
                 "ours_peak_data_mb": ours.get("peak_data_mb"), "baseline_peak_data_mb": base.get("peak_data_mb"),
                 "data_reduction_pct": (_pct(ours["peak_data_mb"], base["peak_data_mb"])
                                        if ours.get("peak_data_mb") and base.get("peak_data_mb") else None),
                 "ours_peak_rss_sum_mb": ours["peak_rss_sum_mb"], "baseline_peak_rss_sum_mb": base["peak_rss_sum_mb"],
                 "rss_sum_reduction_pct": _pct(ours["peak_rss_sum_mb"], base["peak_rss_sum_mb"])}
            e["host_met"] = e["host_reduction_pct"] >= 50.0
            if ours.get("peak_gpu_device_mb") is not None and base.get("peak_gpu_device_mb"):
                e.update(ours_peak_gpu_device_mb=ours["peak_gpu_device_mb"],
                         baseline_peak_gpu_device_mb=base["peak_gpu_device_mb"],
                         gpu_reduction_pct=_pct(ours["peak_gpu_device_mb"], base["peak_gpu_device_mb"]))
                e["gpu_met"] = e["gpu_reduction_pct"] >= 50.0
            e["baseline_step"] = base.get("step")
            if floor and base_floor:
                # each run's memory above the floor of its own training step: what its loader adds
                e["model_only_floor_mb"] = floor["peak_host_mb"]
                e["model_only_floor_data_mb"] = floor.get("peak_data_mb")
                e["baseline_step_floor_mb"] = base_floor["peak_host_mb"]
                e["baseline_step_floor_data_mb"] = base_floor.get("peak_data_mb")
                lo = ours["peak_host_mb"] - floor["peak_host_mb"]
                lb = base["peak_host_mb"] - base_floor["peak_host_mb"]
                e["ours_above_floor_mb"], e["baseline_above_floor_mb"] = round(lo, 1), round(lb, 1)
                e["above_floor_reduction_pct"] = _pct(lo, lb) if lb > 0 else None
                # even a loader costing nothing could only reach (base - our floor) / base
                e["best_possible_reduction_pct"] = _pct(floor["peak_host_mb"], base["peak_host_mb"])
            lours = _find(records, kind="loader-only", backend=backend, batch=b, variant="as-shipped")
            if lours and lbase:
                e.update(loader_only_ours_mb=lours["peak_host_mb"], loader_only_baseline_mb=lbase["peak_host_mb"],
                         loader_only_ours_range_mb=[lours.get("peak_host_mb_min"), lours.get("peak_host_mb_max")],
                         loader_only_baseline_range_mb=[lbase.get("peak_host_mb_min"), lbase.get("peak_host_mb_max")],
                         loader_only_repeats=min(lours["repeats"], lbase["repeats"]),
                         loader_only_reduction_pct=_pct(lours["peak_host_mb"], lbase["peak_host_mb"]),
                         loader_only_ours_data_mb=lours.get("peak_data_mb"),
                         loader_only_baseline_data_mb=lbase.get("peak_data_mb"))
                if lours.get("peak_data_mb") and lbase.get("peak_data_mb"):
                    e["loader_only_data_reduction_pct"] = _pct(lours["peak_data_mb"], lbase["peak_data_mb"])
            imp = _find(records, kind="import-floor", variant="torch")
            run_floor = _find(records, kind="import-floor", variant="run")
            if imp and run_floor and e.get("loader_only_baseline_mb"):
                # half the baseline's loader-only peak vs what importing alone holds in this environment
                e["import_torch_floor_mb"] = imp["peak_host_mb"]
                e["import_run_floor_mb"] = run_floor["peak_host_mb"]
                e["loader_only_50pct_goal_mb"] = round(0.5 * e["loader_only_baseline_mb"], 1)
                e["loader_only_50pct_below_import_floor"] = e["loader_only_50pct_goal_mb"] < run_floor["peak_host_mb"]
                lo = e["loader_only_ours_mb"] - run_floor["peak_host_mb"]
                lb = e["loader_only_baseline_mb"] - run_floor["peak_host_mb"]
                e["loader_only_above_import_floor_mb"] = {"ours": round(lo, 1), "baseline": round(lb, 1)}
                e["loader_only_above_import_floor_reduction_pct"] = _pct(lo, lb) if lb > 0 else None
            e["train_variants"] = [
                {"variant": r["variant"], "peak_host_mb": r["peak_host_mb"], "images_per_s": r.get("images_per_s"),
                 "host_reduction_pct": _pct(r["peak_host_mb"], base["peak_host_mb"])}
                for r in records if r.get("ok") and r["kind"] == "train" and r["backend"] == backend
                and r["batch"] == b and r["variant"] != "as-shipped"]
            e["met"] = e["host_met"] and e.get("gpu_met", True)
            out.append(e)
    return out


def variant_effects(records: list[dict]) -> list[dict]:
    """Loader-only dali-cpu variants against as-shipped at the same batch size."""
    out = []
    for r in records:
        if not r.get("ok") or r["kind"] != "loader-only" or r["backend"] != "dali-cpu":
            continue
        ref = _find(records, kind="loader-only", backend="dali-cpu", batch=r["batch"], variant="as-shipped")
        base = _find(records, kind="loader-only", backend="baseline", batch=r["batch"], variant="as-shipped")
        if not ref:
            continue
        out.append({"variant": r["variant"], "batch": r["batch"], "peak_host_mb": r["peak_host_mb"],
                    "peak_host_range_mb": [r.get("peak_host_mb_min"), r.get("peak_host_mb_max")],
                    "repeats": r["repeats"],
                    "peak_data_mb": r.get("peak_data_mb"), "main_maxrss_mb": r.get("main_maxrss_mb"),
                    "delta_vs_as_shipped_mb": round(r["peak_host_mb"] - ref["peak_host_mb"], 1),
                    "data_delta_vs_as_shipped_mb": (round(r["peak_data_mb"] - ref["peak_data_mb"], 1)
                                                    if r.get("peak_data_mb") and ref.get("peak_data_mb") else None),
                    "vs_baseline_reduction_pct": _pct(r["peak_host_mb"], base["peak_host_mb"]) if base else None,
                    "images_per_s": r.get("images_per_s")})
    return out


def _err(r: dict) -> dict:
    """Matplotlib error-bar kwargs (min-max over the repeats) for a summary row; {} for one measurement."""
    if r.get("peak_host_mb_min") is None:
        return {}
    return {"yerr": [[r["peak_host_mb"] - r["peak_host_mb_min"]], [r["peak_host_mb_max"] - r["peak_host_mb"]]],
            "capsize": 2}


def _bars(ax, recs, kind: str, backends, batches, w: float, colors: dict) -> None:
    """Grouped bars of the as-shipped ``kind`` runs: peak PSS per backend and batch, the data part hatched."""
    for i, bk in enumerate(backends):
        for j, b in enumerate(batches):
            r = _find(recs, kind=kind, backend=bk, batch=b, variant="as-shipped")
            if not r:
                continue
            x = j + (i - (len(backends) - 1) / 2) * w
            ax.bar(x, r["peak_host_mb"], w, color=colors.get(bk), label=bk if j == 0 else None, **_err(r))
            if r.get("peak_data_mb"):
                ax.bar(x, r["peak_data_mb"], w * 0.5, color="none", edgecolor="k", hatch="///", lw=0.6,
                       label="of which anon+shmem" if j == 0 and i == 0 else None)
            ax.text(x, r.get("peak_host_mb_max") or r["peak_host_mb"], f"{r['peak_host_mb']:.0f}", ha="center",
                    va="bottom", fontsize=7)


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = doc["summary"]
    batches = doc["settings"]["batches"]
    backends = doc["settings"]["backends"] + ["baseline"]
    colors = {"dali": "#76b900", "dali-cpu": "#2a7ab9", "baseline": "#888888"}
    variants = [v for v in doc["variant_effects"] if v["variant"] != "as-shipped"]
    ncols = 3 if variants else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5.2 * ncols, 5.4),
                             gridspec_kw={"width_ratios": [1.2, 1.0] + ([1.6] if variants else [])})
    # panel 1: train runs (loader + model step), with the model-only floor
    ax = axes[0]
    w = 0.8 / len(backends)
    _bars(ax, recs, "train", backends, batches, w, colors)
    for j, b in enumerate(batches):
        for step, style in (("ours", "--"), ("legacy", ":")):
            f = _find(recs, kind="model-only", batch=b, variant=f"{step}-step")
            if f:
                ax.hlines(f["peak_host_mb"], j - 0.45, j + 0.45, colors="k", linestyles=style, lw=1,
                          label=f"model-only floor, {step} step" if j == 0 else None)
    for t in doc["targets"]:
        j = batches.index(t["batch"])
        ax.text(j + (backends.index(t["backend"]) - (len(backends) - 1) / 2) * w, ax.get_ylim()[1] * 0.08,
                f"{t['backend']} vs legacy:\n{t['host_reduction_pct']:+.0f}% reduction\n(target >= 50%)"
                + "".join(f"\n{v['variant']}: {v['host_reduction_pct']:+.0f}%" for v in t.get("train_variants", [])),
                ha="center", va="bottom", fontsize=7, bbox={"facecolor": "white", "alpha": 0.85, "lw": 0})
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("peak host MB (PSS, process tree)")
    ax.set_title("train: loader + small_cnn step, 3 scales", fontsize=9)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    # panel 2: loader-only
    ax = axes[1]
    _bars(ax, recs, "loader-only", backends, batches, w, colors)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_title("loader only (no model)", fontsize=9)
    ax.set_ylabel("peak host MB (PSS)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    ax.grid(axis="y", alpha=0.3)
    if variants:
        ax = axes[2]
        vb = variants[0]["batch"]
        ref = _find(recs, kind="loader-only", backend="dali-cpu", batch=vb, variant="as-shipped")
        base = _find(recs, kind="loader-only", backend="baseline", batch=vb, variant="as-shipped")
        rows = ([("baseline (legacy)", base, colors["baseline"])] if base else []) + (
            [("dali-cpu as-shipped", ref, colors["dali-cpu"])] if ref else []) + [
            (v["variant"], v, "#8fbce6") for v in variants]
        names = [n for n, _, _ in rows]
        errs = [_err(r).get("yerr", [[0], [0]]) for _, r, _ in rows]
        ax.barh(range(len(rows)), [r["peak_host_mb"] for _, r, _ in rows], color=[c for *_, c in rows],
                xerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]], capsize=2)
        for k, (_, r, _) in enumerate(rows):
            ax.text((r.get("peak_host_mb_max") or r["peak_host_mb"]) + 8, k, f"{r['peak_host_mb']:.0f}", va="center",
                    fontsize=7)
        datas = [r.get("peak_data_mb") or 0 for _, r, _ in rows]
        if any(datas):
            ax.barh(range(len(rows)), datas, 0.4, color="none", edgecolor="k", hatch="///", lw=0.6,
                    label="of which anon+shmem")
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        if base:
            ax.axvline(base["peak_host_mb"] * 0.5, color="r", ls=":", lw=1, label="50% of baseline")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
        ax.set_xlim(0, max(r.get("peak_host_mb_max") or r["peak_host_mb"] for _, r, _ in rows) * 1.15)
        reps = max(r["repeats"] for _, r, _ in rows)
        ax.set_xlabel("peak host MB (PSS)" + (f"; median of {reps} runs, bars = range" if reps > 1 else ""))
        ax.set_title(f"dali-cpu loader-only variants, batch {vb}", fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    load = doc.get("loadavg")
    fig.suptitle("Multi-scale (64,112,224 from 64 px PNG) peak host memory: dali_lens vs legacy per-scale "
                 f"Dataset\n{common.machine_line(doc['machine'])}"
                 + (f"; load avg {load[0]:.1f} at start" if load else ""), fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path)


def host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname()).strip("-").lower() or "host"


def out_path(arg: str | None, prefix: str) -> str:
    """``--out``: a .json file path, or a folder (default benchmarks/results) receiving <prefix>-<host>.json."""
    if arg and arg.endswith(".json"):
        return os.path.abspath(arg)
    return os.path.join(os.path.abspath(arg or os.path.join(HERE, "results")), f"{prefix}-{host_tag()}.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="seconds-long smoke test (batch 4, one step, no floor or variants)")
    p.add_argument("--out", help="output folder (default benchmarks/results) or .json path; the plot goes next "
                                 "to the JSON with a .png suffix")
    p.add_argument("--batches", help="comma list of batch sizes (default 64,128; quick 4)")
    p.add_argument("--n", type=int, help="images in the train runs' epoch (default 128; quick 4)")
    p.add_argument("--loader-n", type=int, help="images per loader-only epoch (default 1024; quick 16)")
    p.add_argument("--loader-epochs", type=int, default=1, help="timed loader-only epochs after 1 warm-up "
                                                                "(default 1)")
    p.add_argument("--floor-steps", type=int, default=1, help="steps of the model-only floor run (default 1)")
    p.add_argument("--backends", help="dali-lens backends: dali-cpu and/or dali (default: dali-cpu, plus dali "
                                      "with CUDA); the baseline always runs")
    p.add_argument("--variants", help=f"comma list of dali-cpu loader-only variants (default "
                                      f"{','.join(DEFAULT_VARIANTS)}; 'none' for none)")
    p.add_argument("--no-loader-only", action="store_true", help="skip the loader-only runs and variants")
    p.add_argument("--train-variants", default=None,
                   help="train runs of our trainer with a memory knob, reported beside as-shipped (default "
                        f"{','.join(TRAIN_VARIANTS)}: --micro-batch 16, the same update from gradients accumulated "
                        "over 16-sample chunks; --memory-budget 256MB, each scale cut into the largest chunks whose "
                        "activations fit in 256 MB; 'none' for no such runs)")
    p.add_argument("--repeats", type=int, help="measurements of every loader-only configuration, in rounds; the "
                                               "median is reported, with the range (default 2; quick 1)")
    p.add_argument("--train-repeats", type=int, default=1,
                   help="measurements of every train / model-only configuration (default 1)")
    p.add_argument("--workers", type=int, help="DataLoader workers / DALI threads (default: usable cores)")
    p.add_argument("--baseline-step", choices=("legacy", "ours"), default="legacy",
                   help="the baseline's training step: legacy (mechine_lensing's MultiScaleTrainer: all scales' "
                        "graphs alive, one backward; default) or ours (dali_lens's train_epoch, to isolate the "
                        "loader)")
    add_run_args(p, timeout=300, data_help="where the generated PNG set is cached")
    args = p.parse_args(argv)
    rc = internal_entry(args, run_child)
    if rc is not None:
        return rc

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.batch_list = [int(b) for b in args.batches.split(",")] if args.batches else ([4] if args.quick else [64, 128])
    tv = args.train_variants if args.train_variants is not None else ("none" if args.quick else ",".join(TRAIN_VARIANTS))
    args.train_variant_list = [] if tv == "none" else tv.split(",")
    n = args.n or (4 if args.quick else 128)
    loader_n = args.loader_n or (16 if args.quick else 1024)
    loader_epochs = args.loader_epochs
    if args.variants:
        args.variant_list = [] if args.variants == "none" else args.variants.split(",")
    else:
        args.variant_list = list(QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    workers = args.workers or common.usable_cores()
    info = common.machine_info(with_gpu=False)  # no torch in this process (see prepare())
    library = library_state()
    # 2048 images (a subset is used) unless more are asked for: the same cached set as bench_loaders.py
    n_data = max(n, loader_n) if args.quick else max(n, loader_n, 2048)
    prep = prepare(os.path.abspath(__file__), [{"format": "png", "size": 64, "n": n_data}], args.seed,
                   args.data_dir, log)
    info["gpu"] = prep["gpu"]
    have_cuda = info["gpu"] is not None
    root, generator = prep["roots"]["png-64"], prep["generator"]
    plan = build_plan(args, have_cuda)
    backends = sorted({c["backend"] for c in plan if c["kind"] == "train" and c["backend"] != "baseline"},
                      key=["dali-cpu", "dali"].index)
    out = out_path(args.out, "multiscale-memory")
    log(f"{common.machine_line(info)}; load average {load_start}\n{len(plan)} runs, {workers} workers/threads, "
        f"results -> {out}")

    records = []
    for i, c in enumerate(plan, 1):
        cfg = dict(c, root=root, n=loader_n if c["kind"] == "loader-only" else n, workers=workers, seed=args.seed,
                   floor_steps=args.floor_steps, loader_epochs=loader_epochs)
        what = c["kind"] + (f" {c['backend']}" if c["backend"] else "") + (
            f" [{c['variant']}]" if c["variant"] not in (None, "as-shipped") else "")
        log(f"[{i}/{len(plan)}] {what:<40} batch {c['batch']}" + (f" (repeat {c['rep'] + 1})" if c["rep"] else ""))
        rec = launch(cfg, args.timeout, log)
        if rec["ok"]:
            gpu = f", GPU device {rec['peak_gpu_device_mb']} MB" if rec.get("peak_gpu_device_mb") is not None else ""
            speed = f", {rec['images_per_s']} img/s" if rec.get("images_per_s") else ""
            log(f"    peak host {rec['peak_host_mb']:.0f} MB PSS, {rec['peak_data_mb']} MB anon+shmem "
                f"({rec['peak_rss_sum_mb']:.0f} MB RSS sum, main process max RSS {rec['main_maxrss_mb']:.0f} MB)"
                f"{gpu}{speed}; {rec['subprocess_s']:.0f} s")
        records.append(rec)

    summary = aggregate(records)
    doc = {
        "benchmark": "multiscale-memory",
        "machine": info,
        "command": common.command_line(),
        "timestamp": common.utc_timestamp(),
        "mode": "quick" if args.quick else "default",
        "loadavg": load_start,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "library": check_library(library, records),
        "settings": {"scales": list(SCALES), "image_size": 64, "format": "png", "bands": list(BAND_NAMES),
                     "model": ARCH, "batches": args.batch_list, "backends": backends, "train_images": n,
                     "loader_only_images": loader_n, "loader_only_timed_epochs": loader_epochs,
                     "floor_steps": args.floor_steps, "workers": workers, "variants": args.variant_list,
                     "repeats": args.repeats, "train_repeats": args.train_repeats, "generator": generator,
                     "data_root": root,
                     "normalisation": {"mean": MEAN, "std": STD},
                     "batch_payload_mb": {str(b): batch_payload_mb(b) for b in args.batch_list},
                     "memory": "peak of the summed PSS of the run's process and all its children, sampled every "
                               "50 ms from the parent (peak_host_mb); peak_data_mb the peak of the summed "
                               "Pss_Anon + Pss_Shmem (data only: no shared-library pages, whose PSS depends on "
                               "other processes mapping the same files); peak_rss_sum_mb the summed RSS; "
                               "main_maxrss_mb the child's own ru_maxrss",
                     "gpu_memory": "peak_gpu_mb = torch.cuda.max_memory_allocated; peak_gpu_device_mb = device-wide "
                                   "use above the run's start, read after every step (includes DALI's own)"},
        "runs": records,
        "summary": summary,
        "targets": targets(summary, args.batch_list, backends),
        "variant_effects": variant_effects(summary),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    common.save_result(doc, out, None if args.no_plot else plot)
    for t in doc["targets"]:
        extra = (f"; model-only floors {t['model_only_floor_mb']:.0f} (our step) vs "
                 f"{t['baseline_step_floor_mb']:.0f} MB ({t['baseline_step']} step); loader-attributable "
                 f"{t['ours_above_floor_mb']:.0f} vs {t['baseline_above_floor_mb']:.0f} MB"
                 if "model_only_floor_mb" in t else "")
        lo = (f"; loader-only {t['loader_only_ours_mb']:.0f} vs {t['loader_only_baseline_mb']:.0f} MB "
              f"({t['loader_only_reduction_pct']:+.0f}%)" if "loader_only_ours_mb" in t else "")
        data = (f"; data (anon+shmem) {t['ours_peak_data_mb']:.0f} vs {t['baseline_peak_data_mb']:.0f} MB = "
                f"{t['data_reduction_pct']:+.1f}%" if t.get("data_reduction_pct") is not None else "")
        log(f"target batch {t['batch']} {t['backend']}: peak host {t['ours_peak_host_mb']:.0f} vs baseline "
            f"{t['baseline_peak_host_mb']:.0f} MB = {t['host_reduction_pct']:+.1f}% reduction (need >= 50%) -> "
            f"{'MET' if t['met'] else 'NOT MET'}{data}{extra}{lo}")
    for t in doc["targets"]:
        for v in t.get("train_variants", []):
            log(f"train variant {v['variant']} batch {t['batch']}: peak host {v['peak_host_mb']:.0f} MB = "
                f"{v['host_reduction_pct']:+.1f}% vs the baseline's {t['baseline_peak_host_mb']:.0f} MB")
    for v in doc["variant_effects"]:
        rng = v["peak_host_range_mb"]
        rng = f" [{rng[0]:.0f}-{rng[1]:.0f}]" if rng[0] is not None else ""
        log(f"variant {v['variant']:<30} batch {v['batch']}: {v['peak_host_mb']:.0f} MB{rng} "
            f"({v['delta_vs_as_shipped_mb']:+.0f} MB vs as-shipped, median of {v['repeats']})")
    return common.finish_log(doc, records, out, log)


if __name__ == "__main__":
    sys.exit(main())
