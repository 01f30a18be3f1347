"""bench_multiscale_memory.py's child half: the one measured run that each of its subprocesses makes.

``run_child(cfg)`` runs in a fresh process (``python -m benchmarks.bench_multiscale_memory --_child CFG``):
``kind`` is ``train`` (loader + model step, one epoch), ``model-only`` (the step on one resident batch),
``loader-only`` (the loader alone) or ``import-floor`` (imports, then stops). It returns the child's own
figures (steps, images/s, ru_maxrss, GPU peaks); the parent half samples the memory of the process tree.
bench_train.py's child reuses :func:`_subset`. torch, DALI and dali_lens are imported inside the functions:
the parent imports this module for its constants and must stay free of torch.
"""
from __future__ import annotations

import gc
import resource
import sys
import time

from benchmarks import common
from benchmarks.common import MEAN, STD

SCALES = (64, 112, 224)
BAND_NAMES = ("g", "r", "i")
ARCH = "small_cnn"


def _subset(root: str, n: int, seed: int):
    """``n`` samples (seeded choice over every split, both classes) of the data set at ``root``."""
    import numpy as np

    from benchmarks.bench_loaders import load_all_samples
    from dali_lens.data import Dataset

    full = load_all_samples(root)
    if n >= len(full):
        return full
    pick = sorted(np.random.default_rng([seed, 77]).choice(len(full), size=n, replace=False).tolist())
    return Dataset([full.samples[i] for i in pick], full.bands, full.kind, full.root, "train", full.hdus, full.shape)


def _apply_variant(variant: str) -> dict:
    """The LoaderOptions overrides of ``variant`` (parts joined by '+'; the trainer's and the environment's
    parts are read elsewhere)."""
    over: dict = {}
    for part in [p for p in variant.split("+") if p and p != "as-shipped"]:
        if part.startswith("queue="):  # LoaderOptions.prefetch_queue_depth, read by dali_backend
            over["prefetch_queue_depth"] = int(part.split("=")[1])
        elif part.startswith("threads="):
            over["num_workers"] = int(part.split("=")[1])
        elif part.startswith("dtype="):
            over["dtype"] = part.split("=")[1]
        elif part.startswith("arenas="):
            pass  # set in the child's environment by launch()
        elif part.startswith(("micro-batch=", "memory-budget=")):
            pass  # trainer options (--micro-batch, --memory-budget), read by run_child
        else:
            raise ValueError(f"unknown variant part {part!r}")
    return over


def _build(cfg: dict, dataset, cuda: bool):
    backend = cfg["backend"]
    if backend == "baseline":
        from benchmarks.legacy import build_baseline

        return build_baseline(dataset, SCALES, cfg["batch"], cuda, False, cfg["workers"], True)
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


def _maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)  # KiB on Linux


def import_floor(variant: str) -> dict:
    """A process that imports and stops: ``torch``; ``torch+dali`` (plus DALI's PyTorch plugin and
    dali_lens.pipelines); ``run`` (everything a measured run imports: the trainers and the legacy baseline).
    What any run of that kind holds before it touches data."""
    t0 = time.perf_counter()
    import torch  # noqa: F401

    if variant in ("torch+dali", "run"):
        import nvidia.dali.plugin.pytorch  # noqa: F401

        import dali_lens.pipelines  # noqa: F401
    if variant == "run":
        import dali_lens.trainers.loop  # noqa: F401
        import dali_lens.trainers.members  # noqa: F401

        import benchmarks.bench_loaders  # noqa: F401
        import benchmarks.legacy  # noqa: F401
    time.sleep(1.0)  # let the parent's sampler read the settled process
    return {"main_maxrss_mb": _maxrss_mb(), "child_s": round(time.perf_counter() - t0, 2)}


def run_child(cfg: dict) -> dict:
    if cfg["kind"] == "import-floor":
        return import_floor(cfg["variant"])
    import torch

    from benchmarks.legacy import legacy_train_epoch
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
            stats = legacy_train_epoch(member, loader, device, SCALES, on_step=lambda step: gpu.read())
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
