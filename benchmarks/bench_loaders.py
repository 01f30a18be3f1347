#!/usr/bin/env python
"""Loader throughput and memory: dali_lens backends side by side with a mechine_lensing-style baseline.

Backends measured
  dali                    build_loader(backend='dali')         (only when CUDA is available)
  dali-cpu                build_loader(backend='dali-cpu')
  torchvision             build_loader(backend='torchvision')  (the project's own fallback)
  baseline                mechine_lensing legacy multi-scale loading: a torch Dataset that opens each image
                          with PIL and, for every requested scale separately, applies
                          transforms.Resize((s, s)) + ToTensor + Normalize (float data: astropy / numpy,
                          then Resize + Normalize per scale); DataLoader with num_workers = usable cores,
                          persistent_workers=True, pin_memory only with CUDA, shuffle + drop_last.
  torchvision-strong      the strong torchvision DataLoader a user would write today (legacy.build_strong):
                          torchvision.io.decode_image to uint8, the same dihedral augmentation drawn once per
                          sample, transforms.v2 Resize(antialias=True) per scale on uint8, ToDtype + Normalize,
                          num_workers = usable cores, persistent workers, pin_memory with CUDA, prefetch 4;
                          PNG/JPEG and .npy.
  baseline-tensor-decode  the same as baseline, but PNG/JPEG decoded with torchvision.io.decode_image to a uint8 tensor
                          (Resize + ConvertImageDtype + Normalize per scale); images only.
The baseline has no augmentation, the project's loaders run in training mode (shuffle, random dihedral
flips, drop the last partial batch): that favours the baseline slightly.

Measurement: every configuration runs in a fresh subprocess. It builds the loader, runs one warm-up epoch
(pipeline build / worker start-up included there), then times whole epochs until at least --min-time
seconds and --min-epochs epochs have passed (at most --max-epochs). images/s = images yielded in the timed
epochs / their wall time; cpu_ms_per_image = CPU time of the whole process tree (DALI threads, workers) in
those epochs per image, which is much less sensitive than images/s to other jobs on a shared machine
(foreign_cpu_frac records how much of the CPUs other processes took during each run; a run during which
they took more than 25% is measured once more, after waiting up to 15 s for a quieter machine, and the
cleaner measurement kept, within --retry-budget seconds per invocation (always for the CPU-target runs);
--wait-quiet waits before every run). The default run aims at --deadline (420 s): if other jobs slow it
down so much that the remaining runs would overrun, they time a single epoch each and are not repeated
(``shortened`` in their records). Memory: a background thread in this (parent) process samples the run's process and
all its children (DataLoader workers) every 50 ms; peak_host_mb is the peak of their summed PSS (shared
pages counted once; read whenever the RSS sum reaches a new high, at most every 0.2 s, and every 1 s),
peak_rss_sum_mb the peak of the summed RSS. With CUDA the subprocess also reports
torch.cuda.max_memory_allocated (peak_gpu_mb) and the peak device-wide memory use above its start
(peak_gpu_device_mb, which includes DALI's own allocations that torch does not see).

Grids (the data sets are generated once and cached under --data-dir):
  default (about 12 min on 2 cores with torchvision-strong): 2048 images at 64 px, 512 at 224 px;
      64 px PNG : native scale and 3 scales (64,112,224) x batch 64 and 256   <- the CPU target
      64 px JPEG, NPY, FITS : 3 scales x batch 256
      224 px PNG : native scale and 3 scales x batch 64
      (baseline-tensor-decode only in the 64 px -> 3 scales PNG/JPEG rows); at least 1.5 s timed per run
  --full: formats png,jpeg,npy,fits x sizes 64,224 x {native, 3 scales} x batch 64,256
      (4096 images at 64 px, 1536 at 224 px)
  --gpu (the GPU session's grid, see benchmarks/gpu_plan.py): 16384 images of 64 px PNG and JPEG, at least
      3 timed epochs after the warm-up epoch; PNG -> 3 scales at batch 256 and 64 with every backend (DALI GPU
      at 16 and 8 CPU threads), PNG native 64 px and JPEG -> 3 scales at batch 256 with DALI and the strong
      baseline. --keep-from FILE reuses FILE's successful runs (the baselines, measured by an earlier call)
  --quick: a seconds-long smoke test (128 images of 64 px PNG, 3 scales, batch 32, one timed epoch)
  --formats/--sizes/--scales/--batches/--backends narrow or change the grid.

CPU target checked: dali-cpu >= 2x the baseline's images/s on 64 px PNG -> 3 scales, with no more peak host
memory (per batch size). Results go to benchmarks/results/loaders-<gpu-name-or-hostname>.json (--out) with
a grouped bar chart next to it (same name, .png). The baseline's code is benchmarks/legacy.py.

  python -m benchmarks.bench_loaders [--quick]        # from the repository root
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from benchmarks import common
from benchmarks.common import MEAN, STD
from benchmarks.legacy import build_baseline, build_strong
from dali_lens.choices import BACKENDS

ALL_BACKENDS = tuple(b for b in BACKENDS if b != "auto") + ("torchvision-strong", "baseline", "baseline-tensor-decode")
GPU_N = 16384  # --gpu: images per data set, so that every one of 16 workers has many batches in every epoch
GPU_DALI_THREADS = (16, 8)  # --gpu: DALI GPU also at 8 CPU threads (PNG decodes on the CPU, JPEG on the GPU)
FORMATS = ("png", "jpeg", "npy", "fits")
MULTI_SCALES = (64, 112, 224)
EXT = {"png": ".png", "jpeg": ".jpg", "npy": ".npy", "fits": ".fits"}
BAND_NAMES = ("g", "r", "i")
BANDS = len(BAND_NAMES)
BUSY = 0.25  # share of the CPUs used by other processes above which a run counts as disturbed


# ============================================================================================ data sets

def _fallback_generate(out: str, n: int, size: int, bands: int = 3, fmt: str = "png", seed: int = 0) -> None:
    """Stand-in for dali_lens.data.synthetic.generate_dataset: smooth random images in the same layout.

    OUT/{train,val,test}/{lens,nonlens}/<id>.<ext> plus OUT/<split>.csv (filepath,label) and dataset.json.
    Images are a few Gaussian blobs plus mild noise (so PNG compresses like real cutouts, not like flat
    colour); lenses get a ring.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    splits = {"train": int(n * 0.8), "val": int(n * 0.1)}
    splits["test"] = n - splits["train"] - splits["val"]
    k = 0
    for split, count in splits.items():
        rows = []
        for j in range(count):
            label = j % 2
            img = np.zeros((bands, size, size), np.float32)
            for _ in range(3):
                cy, cx = rng.uniform(0.2, 0.8, 2) * size
                w = rng.uniform(0.04, 0.2) * size
                amp = rng.uniform(0.2, 1.0, bands).astype(np.float32)[:, None, None]
                img += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w))[None]
            if label:
                re_ = rng.uniform(0.15, 0.3) * size
                img += 0.6 * np.exp(-((r - re_) ** 2) / (2 * (0.03 * size) ** 2))[None]
            img += rng.normal(0, 0.03, img.shape).astype(np.float32)
            cls = "lens" if label else "nonlens"
            folder = os.path.join(out, split, cls)
            os.makedirs(folder, exist_ok=True)
            name = f"{split}_{k:06d}{EXT[fmt]}"
            k += 1
            path = os.path.join(folder, name)
            if fmt in ("png", "jpeg"):
                from PIL import Image

                u8 = np.clip(np.arcsinh(4 * img) / np.arcsinh(4.0) * 255, 0, 255).astype(np.uint8)
                Image.fromarray(u8.transpose(1, 2, 0)).save(path, **({"quality": 90} if fmt == "jpeg" else {}))
            elif fmt == "npy":
                np.save(path, img)
            else:
                from astropy.io import fits

                hdus = [fits.PrimaryHDU()] + [fits.ImageHDU(img[b], name="GRIZY"[b] if bands <= 5 else f"B{b}")
                                              for b in range(bands)]
                fits.HDUList(hdus).writeto(path, overwrite=True)
            rows.append((os.path.relpath(path, out), label))
        with open(os.path.join(out, f"{split}.csv"), "w") as fh:
            fh.write("filepath,label\n")
            fh.writelines(f"{p},{lab}\n" for p, lab in rows)
    with open(os.path.join(out, "dataset.json"), "w") as fh:
        json.dump({"generator": "benchmarks fallback", "n": n, "size": size, "bands": bands, "format": fmt,
                   "seed": seed}, fh)


def _real_generator():
    try:
        from dali_lens.data.synthetic import generate_dataset  # type: ignore

        return generate_dataset
    except Exception:  # noqa: BLE001 - ImportError, or a half-written module another engineer is editing
        return None


def prepare_dataset(data_dir: str, fmt: str, size: int, n: int, seed: int, log) -> tuple[str, str]:
    """Generate (once, cached) ``n`` images of ``size`` px in ``fmt``; returns (root, generator name)."""
    gen = _real_generator()
    gname = "synthetic" if gen is not None else "fallback"
    root = os.path.join(data_dir, f"{gname}-{fmt}-{size}px-n{n}-s{seed}")
    if os.path.exists(os.path.join(root, ".complete")):
        return root, gname
    tmp = root + f".partial-{os.getpid()}"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    t = time.perf_counter()
    log(f"  generating {n} {fmt} images of {size} px with the {gname} generator -> {root}")
    if gen is not None:
        gen(tmp, n=n, size=size, bands=BAND_NAMES, fmt=fmt, seed=seed)
    else:
        _fallback_generate(tmp, n=n, size=size, bands=BANDS, fmt=fmt, seed=seed)
    # the dataset's manifests hold relative paths: renaming the folder keeps them valid
    if os.path.exists(root):
        import shutil

        shutil.rmtree(root)
    os.replace(tmp, root)
    open(os.path.join(root, ".complete"), "w").close()
    log(f"  generated in {time.perf_counter() - t:.1f} s")
    return root, gname


def load_all_samples(root: str):
    """Every split of the data set at ``root`` as one dali_lens Dataset (the benchmark streams all files)."""
    from dali_lens.data import Dataset, discover

    splits = discover(root)
    first = next(iter(splits.values()))
    samples = [s for name in ("train", "val", "test", "predict") if name in splits for s in splits[name].samples]
    return Dataset(samples, first.bands, first.kind, first.root, "train", first.hdus, first.shape)


# ============================================================================================ one run (child)

def run_one(cfg: dict) -> dict:
    """Runs in a fresh subprocess: build the loader, warm up one epoch, time whole epochs."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda") if cuda else torch.device("cpu")
    dataset = load_all_samples(cfg["root"])
    scales = tuple(cfg["scales"])
    backend = cfg["backend"]
    workers = cfg.get("threads") or cfg["workers"]
    t_build = time.perf_counter()
    if backend == "torchvision-strong":
        loader = build_strong(dataset, scales, cfg["batch"], cuda, workers, cfg["train"])
    elif backend.startswith("baseline"):
        loader = build_baseline(dataset, scales, cfg["batch"], cuda, backend == "baseline-tensor-decode", workers,
                                cfg["train"])
    else:
        from dali_lens.pipelines import build_loader

        kwargs = dict(scales=scales, batch_size=cfg["batch"], train=cfg["train"], mean=(MEAN,) * dataset.bands,
                      std=(STD,) * dataset.bands, num_workers=workers, dtype="float32")
        kwargs.update(cfg.get("loader_kwargs") or {})  # profile_dali_cpu.py's variants: build_loader options
        loader = build_loader(dataset, backend=backend, **kwargs)
    build_s = time.perf_counter() - t_build
    used0 = None
    peak_used = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        used0 = total - free
    checked = False

    def epoch() -> tuple[int, int, float]:
        nonlocal checked, peak_used
        n_img = n_batch = 0
        t = time.perf_counter()
        for batch in loader:
            images = batch["image"]
            if cuda:  # the project's loaders already deliver on the device; the baseline is copied like a trainer
                images = {s: x.to(device, non_blocking=True) for s, x in images.items()}
                free_, total_ = torch.cuda.mem_get_info()
                peak_used = max(peak_used, total_ - free_)
            if not checked:
                b = int(batch["label"].shape[0])
                for s in scales:
                    x = images[s]
                    assert tuple(x.shape) == (b, dataset.bands, s, s), (s, tuple(x.shape))
                    assert x.dtype == torch.float32, x.dtype
                    assert bool(torch.isfinite(x).all())
                checked = True
            n_img += int(batch["label"].shape[0])
            n_batch += 1
        if cuda:
            torch.cuda.synchronize()
        return n_img, n_batch, time.perf_counter() - t

    warm_imgs, warm_batches, warm_s = epoch()
    if warm_imgs == 0:
        raise RuntimeError(f"the loader yielded no images ({len(dataset)} samples, batch {cfg['batch']})")
    epochs, imgs, timed = [], 0, 0.0
    cpu0 = common.tree_cpu_seconds()
    while True:
        n, _, dt = epoch()
        epochs.append(round(dt, 4))
        imgs += n
        timed += dt
        if len(epochs) >= cfg["max_epochs"] or (len(epochs) >= cfg["min_epochs"] and timed >= cfg["min_time"]):
            break
    cpu_s = common.tree_cpu_seconds() - cpu0
    rec = {
        "images_per_s": round(imgs / timed, 1),
        "cpu_ms_per_image": round(1000 * cpu_s / imgs, 3),
        "cpu_cores_used": round(cpu_s / timed, 2),
        "epochs_timed": len(epochs),
        "images_timed": imgs,
        "timed_s": round(timed, 3),
        "epoch_s": epochs,
        "images_per_epoch": warm_imgs,
        "batches_per_epoch": warm_batches,
        "warmup_epoch_s": round(warm_s, 3),
        "build_s": round(build_s, 3),
        "dataset_samples": len(dataset),
        "workers": (workers if backend.startswith("baseline") or backend == "torchvision-strong"
                    else getattr(loader, "opts", None) and loader.opts.workers),
        "dali_imported": "nvidia.dali" in sys.modules,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / common.MB, 1) if cuda else None,
        "peak_gpu_reserved_mb": round(torch.cuda.max_memory_reserved() / common.MB, 1) if cuda else None,
        "peak_gpu_device_mb": round((peak_used - used0) / common.MB, 1) if cuda and peak_used else None,
    }
    return rec


# ============================================================================================ orchestration

def build_grid(args, have_cuda: bool) -> list[dict]:
    backends = [b for b in (args.backends.split(",") if args.backends else ALL_BACKENDS)]
    for b in backends:
        if b not in ALL_BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {ALL_BACKENDS}")
    if "dali" in backends and not have_cuda:
        backends.remove("dali")
    if getattr(args, "gpu", False):
        return gpu_grid(backends)
    if args.quick:
        base = [("png", 64, "multi", 32)]
    elif args.full:
        base = [(f, s, m, b) for f in FORMATS for s in (64, 224) for m in ("single", "multi") for b in (64, 256)]
    else:
        base = ([("png", 64, m, b) for m in ("single", "multi") for b in (64, 256)]
                + [(f, 64, "multi", 256) for f in ("jpeg", "npy", "fits")]
                + [("png", 224, m, 64) for m in ("single", "multi")])
    preset = "quick" if args.quick else "full" if args.full else "default"
    if args.formats or args.sizes or args.scales or args.batches:  # an explicit grid replaces the preset
        preset = "custom"
        fmts = args.formats.split(",") if args.formats else sorted({f for f, *_ in base}, key=FORMATS.index)
        sizes = [int(v) for v in args.sizes.split(",")] if args.sizes else sorted({s for _, s, *_ in base})
        modes = args.scales.split(",") if args.scales else sorted({m for *_, m, _ in base}, reverse=True)
        batches = [int(v) for v in args.batches.split(",")] if args.batches else sorted({b for *_, b in base})
        base = [(f, s, m, b) for f in fmts for s in sizes for m in modes for b in batches]
    grid = []
    for fmt, size, mode, batch in base:
        if fmt not in FORMATS or mode not in ("single", "multi"):
            raise SystemExit(f"bad grid entry {fmt} {mode}")
        scales = [size] if mode == "single" else list(MULTI_SCALES)
        for backend in backends:
            if backend == "baseline-tensor-decode" and fmt not in ("png", "jpeg"):
                continue  # decode_image reads PNG/JPEG only; for float data it is the same as 'baseline'
            if (backend == "baseline-tensor-decode" and preset == "default"
                    and not (mode == "multi" and size == 64)):
                continue  # default grid: the tensor-decode variant only where decode matters (64 px -> 3 scales)
            if backend == "torchvision-strong" and fmt == "fits":
                continue  # decode_image reads PNG/JPEG, numpy .npy; FITS has no torchvision reader
            grid.append({"backend": backend, "format": fmt, "size": size, "scales": scales,
                         "scale_mode": mode, "batch": batch})
    return grid


def gpu_grid(backends: list[str]) -> list[dict]:
    """The GPU session's grid, most important first: PNG 64 px -> 3 scales at batch 256 with every backend (DALI
    GPU at 16 and 8 CPU threads: PNG is decoded on the CPU even on the GPU backend), the same at batch 64, then
    native 64 px PNG and JPEG -> 3 scales at batch 256 with DALI and the strong baseline."""
    rows = [("png", 64, "multi", 256, b) for b in ("dali", "torchvision-strong", "dali-cpu", "torchvision", "baseline")]
    rows += [("png", 64, "multi", 64, b) for b in ("dali", "torchvision-strong", "dali-cpu")]
    rows += [("png", 64, "single", 256, b) for b in ("dali", "torchvision-strong")]
    rows += [("jpeg", 64, "multi", 256, b) for b in ("dali", "torchvision-strong", "dali-cpu")]
    grid = []
    for fmt, size, mode, batch, backend in rows:
        if backend not in backends:
            continue
        scales = [size] if mode == "single" else list(MULTI_SCALES)
        for threads in (GPU_DALI_THREADS if backend == "dali" and (mode, batch) == ("multi", 256) else (None,)):
            grid.append({"backend": backend, "format": fmt, "size": size, "scales": scales, "scale_mode": mode,
                         "batch": batch, **({"threads": threads} if threads else {})})
    return grid


def run_key(r: dict) -> tuple:
    """What identifies a run of the grid: backend, format, size, scales, batch and DALI threads (when set)."""
    return (r["backend"], r["format"], r["size"], r["scale_mode"], r["batch"], r.get("threads"))


def n_images(args, size: int) -> int:
    if args.n:
        return args.n
    if getattr(args, "gpu", False):
        return GPU_N
    if args.quick:
        return 128
    if args.full:
        return 4096 if size <= 64 else 1536
    return 2048 if size <= 64 else 512


def wait_quiet(max_wait: float, log, threshold: float = 0.25) -> float:
    """Wait up to ``max_wait`` s until other processes use < ``threshold`` of the CPUs; returns that share."""
    load = common.machine_load(0.5)
    t = time.perf_counter()
    while load >= threshold and time.perf_counter() - t < max_wait:
        load = common.machine_load(1.0)
    if load >= threshold:
        log(f"    note: the machine is {100 * load:.0f}% busy with other work before this run")
    return load


def launch(cfg: dict, timeout: float, log) -> dict:
    """Run ``cfg`` in a fresh subprocess while sampling its process tree's memory from this process."""
    rec = {k: cfg[k] for k in ("backend", "format", "size", "scales", "scale_mode", "batch", "threads") if k in cfg}
    return common.run_measured("benchmarks.bench_loaders", cfg, timeout, log, rec, env=common.child_env())


def target_check(records: list[dict]) -> list[dict]:
    """The CPU target: dali-cpu >= 2x baseline images/s on 64 px PNG -> 3 scales, peak host MB not higher."""
    out = []
    by = {(r["backend"], r["format"], r["size"], r["scale_mode"], r["batch"]): r for r in records if r.get("ok")}
    for batch in sorted({r["batch"] for r in records}):
        ours = by.get(("dali-cpu", "png", 64, "multi", batch))
        base = by.get(("baseline", "png", 64, "multi", batch))
        if not ours or not base:
            continue
        speed = ours["images_per_s"] / base["images_per_s"]
        mem = ours["peak_host_mb"] / base["peak_host_mb"]
        entry = {"config": f"png 64px -> {list(MULTI_SCALES)}, batch {batch}", "batch": batch,
                 "dali_cpu_images_per_s": ours["images_per_s"], "baseline_images_per_s": base["images_per_s"],
                 "speedup": round(speed, 2), "dali_cpu_peak_host_mb": ours["peak_host_mb"],
                 "baseline_peak_host_mb": base["peak_host_mb"], "memory_ratio": round(mem, 2),
                 "speed_met": speed >= 2.0, "memory_met": mem <= 1.0, "met": speed >= 2.0 and mem <= 1.0,
                 "cpu_efficiency_ratio": round(base["cpu_ms_per_image"] / ours["cpu_ms_per_image"], 2),
                 "foreign_cpu_frac": {"dali-cpu": ours.get("foreign_cpu_frac"),
                                      "baseline": base.get("foreign_cpu_frac")}}
        tdec = by.get(("baseline-tensor-decode", "png", 64, "multi", batch))
        if tdec:
            entry["speedup_vs_baseline_tensor_decode"] = round(ours["images_per_s"] / tdec["images_per_s"], 2)
        out.append(entry)
    return out


def goal_targets(records: list[dict]) -> list[dict]:
    """The goals as ``{"name", "value", "met"}`` entries (the form every benchmark's ``targets`` block has):
    for each configuration with a dali_lens run and a baseline, the fastest dali_lens backend against the
    strongest baseline (3-scale rows: the throughput goal, >= 2x); and 64 px PNG img/s per backend."""
    out = []
    strongest = common.strongest_baselines(records)
    for k, base in strongest.items():
        fmt, size, mode, batch = k
        ours = [r for r in records if r.get("ok") and r["backend"] in ("dali", "dali-cpu")
                and (r["format"], r["size"], r["scale_mode"], r["batch"]) == k]
        if not ours:
            continue
        top = max(ours, key=lambda r: r["images_per_s"])
        ratio = top["images_per_s"] / base["images_per_s"]
        sc = "3 scales" if mode == "multi" else "native"
        label = top["backend"] + (f"@{top['threads']}" if top.get("threads") else "")
        out.append({"name": f"{fmt} {size} px -> {sc}, batch {batch}: {label} vs the strongest baseline "
                            f"({base['backend']}) >= 2x images/s",
                    "value": {"ours": top["images_per_s"], "ours_backend": label,
                              "strongest_baseline": base["images_per_s"], "strongest_baseline_backend": base["backend"],
                              "ratio": round(ratio, 2)},
                    "met": ratio >= 2.0})
    for r in records:
        if r.get("ok") and r["format"] == "png" and r["size"] == 64 and r["scale_mode"] == "single":
            label = r["backend"] + (f"@{r['threads']}" if r.get("threads") else "")
            out.append({"name": f"png 64 px native, batch {r['batch']}: {label} images/s (recorded, no threshold)",
                        "value": r["images_per_s"], "met": None})
    return out


def config_label(r: dict) -> str:
    sc = "native" if r["scale_mode"] == "single" else "3 scales"
    return f"{r['format']} {r['size']}px\n{sc}, b{r['batch']}"


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in doc["runs"] if r.get("ok")]
    if not recs:
        return
    backends = [b for b in ALL_BACKENDS if any(r["backend"] == b for r in recs)]
    configs = []
    for r in recs:
        key = (r["format"], r["size"], r["scale_mode"], r["batch"])
        if key not in configs:
            configs.append(key)
    by = {(r["backend"], r["format"], r["size"], r["scale_mode"], r["batch"]): r for r in recs}
    width = 0.8 / len(backends)
    colors = {"dali": "#76b900", "dali-cpu": "#2a7ab9", "torchvision": "#e08a1e", "baseline": "#888888",
              "baseline-tensor-decode": "#bbbbbb"}
    panels = (("images_per_s", "images / s (log)"), ("cpu_ms_per_image", "CPU ms / image\n(all processes)"),
              ("peak_host_mb", "peak host MB\n(PSS, process tree)"))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 1.3 * len(configs) + 2), 11), sharex=True,
                             gridspec_kw={"height_ratios": [1.6, 1, 1]})
    for ax, (key, ylabel) in zip(axes, panels):
        for i, b in enumerate(backends):
            xs, ys = [], []
            for j, c in enumerate(configs):
                r = by.get((b, *c))
                if r and r.get(key) is not None:
                    xs.append(j + (i - (len(backends) - 1) / 2) * width)
                    ys.append(r[key])
            bars = ax.bar(xs, ys, width, label=b, color=colors.get(b))
            if key == "images_per_s":
                ax.bar_label(bars, fmt="%.0f", fontsize=6, rotation=90, padding=2)
        ax.set_ylabel(ylabel, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_yscale("log")
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo, hi * 3)
    axes[0].legend(ncol=len(backends), fontsize=8, loc="upper right")
    labels = [config_label({"format": c[0], "size": c[1], "scale_mode": c[2], "batch": c[3]}) for c in configs]
    axes[-1].set_xticks(range(len(configs)), labels, fontsize=7)
    busy = [r["foreign_cpu_frac"] for r in recs if r.get("foreign_cpu_frac") is not None]
    title = "dali_lens loader throughput (train mode, warm epochs), CPU cost and peak host memory"
    if busy and max(busy) > 0.1:
        title += f" (other jobs used up to {100 * max(busy):.0f}% of the CPUs)"
    fig.suptitle(f"{title}\n{common.machine_line(doc['machine'])}", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="seconds-long smoke test (CI)")
    mode.add_argument("--full", action="store_true", help="the whole grid (formats x sizes x scales x batches)")
    mode.add_argument("--gpu", action="store_true", help="the GPU session's grid (16384 images, 3 timed epochs, "
                                                         "batch 256 and 64, DALI GPU at 16 and 8 threads)")
    p.add_argument("--keep-from", metavar="JSON", help="reuse this result file's successful runs of the same grid "
                                                       "(measured earlier on the same machine and data) instead of "
                                                       "measuring them again")
    p.add_argument("--out", help="result JSON path (default benchmarks/results/loaders-<gpu-or-host>.json); "
                                 "the plot is written next to it with a .png suffix")
    p.add_argument("--backends", help=f"comma list from {','.join(ALL_BACKENDS)} (default: all available)")
    p.add_argument("--formats", help="comma list from png,jpeg,npy,fits (replaces the preset grid)")
    p.add_argument("--sizes", help="comma list of image sizes, e.g. 64,224 (replaces the preset grid)")
    p.add_argument("--scales", help="comma list from single,multi (replaces the preset grid)")
    p.add_argument("--batches", help="comma list of batch sizes (replaces the preset grid)")
    p.add_argument("--n", type=int, help="images per data set (default: 2048 at 64 px, 512 at 224 px)")
    p.add_argument("--workers", type=int, help="loader workers / DALI threads (default: usable cores)")
    p.add_argument("--eval", action="store_true", help="eval-mode loaders (no shuffle/augmentation)")
    p.add_argument("--min-time", type=float, help="minimum timed seconds per run (default 1.5; quick 0)")
    p.add_argument("--min-epochs", type=int, default=1, help="minimum timed epochs (default 1)")
    p.add_argument("--max-epochs", type=int, help="maximum timed epochs (default 5; quick 1)")
    p.add_argument("--timeout", type=float, default=300, help="seconds before one run is killed (default 300)")
    p.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dali-lens-bench"),
                   help="where generated data sets are cached (default ~/.cache/dali-lens-bench)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each run wait up to S seconds until other processes use < 25%% of the CPUs "
                        "(default 0: do not wait; every record stores foreign_cpu_frac either way)")
    p.add_argument("--retry-budget", type=float, metavar="S",
                   help="seconds (whole run) allowed for measuring disturbed runs once more (a run counts as "
                        "disturbed when other processes used > 25%% of the CPUs; the dali-cpu and baseline runs of "
                        "the CPU target are always measured again once when disturbed); default 90, quick 0")
    p.add_argument("--deadline", type=float, metavar="S",
                   help="target total seconds (default 420; quick and --full: none = 0): when the runs so far "
                        "predict an overrun, the remaining runs time a single epoch and are not repeated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        return common.child_main(run_one, args._child, args._result)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    info = common.machine_info()
    have_cuda = info["gpu"] is not None
    grid = build_grid(args, have_cuda)
    workers = args.workers or common.usable_cores()
    min_time = args.min_time if args.min_time is not None else (0.0 if args.quick else 1.5)
    if args.deadline is None:
        args.deadline = 0.0 if (args.quick or args.full or args.gpu) else 420.0
    if args.retry_budget is None:
        args.retry_budget = 0.0 if args.quick else 90.0
    max_epochs = args.max_epochs or (1 if args.quick else 5)
    if args.gpu:  # every worker busy: 16k images, 3 whole timed epochs after the warm-up epoch
        args.min_epochs = max(args.min_epochs, 3)
        max_epochs = args.max_epochs or 3
    out = common.result_path(args.out, "loaders", info)
    log(f"{common.machine_line(info)}\n{len(grid)} runs, {workers} workers/threads, results -> {out}")

    roots, generators = {}, {}
    for fmt, size in sorted({(c["format"], c["size"]) for c in grid}):
        roots[(fmt, size)], generators[(fmt, size)] = prepare_dataset(args.data_dir, fmt, size, n_images(args, size),
                                                                      args.seed, log)
    records = []
    kept = {}
    if args.keep_from and os.path.exists(args.keep_from):
        with open(args.keep_from) as fh:  # trusted only as JSON: runs of the same grid, matched by their key
            kept = {run_key(r): r for r in json.load(fh).get("runs", []) if isinstance(r, dict) and r.get("ok")}
    retry_spent = 0.0
    run_times: list[float] = []
    for i, cfg in enumerate(grid, 1):
        # time guard: when the runs so far (e.g. slowed down by other jobs) predict that the remaining ones
        # would overrun --deadline, time one epoch per run and stop measuring disturbed runs again
        if run_key(cfg) in kept:
            rec = dict(kept[run_key(cfg)], kept_from=os.path.basename(args.keep_from))
            log(f"[{i}/{len(grid)}] {cfg['backend']:<22} {cfg['format']:<4} {cfg['size']:>3}px batch={cfg['batch']}: "
                f"kept from {args.keep_from} ({rec['images_per_s']:.1f} img/s)")
            records.append(rec)
            common.save_partial(out, "loaders", info, records)
            continue
        elapsed = time.perf_counter() - t_all
        mean_run = sum(run_times) / len(run_times) if run_times else 0.0
        hurry = bool(args.deadline) and elapsed + mean_run * (len(grid) - i + 1) > args.deadline
        child_cfg = dict(cfg, root=roots[(cfg["format"], cfg["size"])], workers=workers, train=not args.eval,
                         min_time=0.0 if hurry else min_time, min_epochs=args.min_epochs,
                         max_epochs=1 if hurry else max_epochs)
        label = cfg["backend"] + (f"@{cfg['threads']}" if cfg.get("threads") else "")
        log(f"[{i}/{len(grid)}] {label:<22} {cfg['format']:<4} {cfg['size']:>3}px scales={cfg['scales']} "
            f"batch={cfg['batch']}" + ("  (short: behind schedule)" if hurry else ""))
        busy_before = wait_quiet(args.wait_quiet, log) if args.wait_quiet and not hurry else None
        rec = launch(child_cfg, args.timeout, log)
        run_times.append(rec.get("subprocess_s", 0.0))
        attempts = 1
        # a shared machine: if other jobs took a large share of the CPUs, wait briefly and measure once more,
        # keeping the cleaner of the two measurements (bounded by --retry-budget seconds for the whole run)
        is_target = (cfg["backend"] in ("dali-cpu", "baseline") and cfg["format"] == "png" and cfg["size"] == 64
                     and cfg["scale_mode"] == "multi")
        while (rec["ok"] and rec.get("foreign_cpu_frac", 0) > BUSY and attempts < 2 and args.retry_budget > 0
               and not hurry and (is_target or retry_spent + rec["subprocess_s"] <= args.retry_budget)):
            t_retry = time.perf_counter()
            log(f"    other processes used {100 * rec['foreign_cpu_frac']:.0f}% of the CPUs: measuring again")
            left = args.retry_budget - retry_spent - rec["subprocess_s"]
            wait_quiet(15.0 if is_target else min(15.0, max(0.0, left)), log, BUSY)
            again = launch(child_cfg, args.timeout, log)
            attempts += 1
            if again["ok"] and again.get("foreign_cpu_frac", 1) < rec["foreign_cpu_frac"]:
                rec = again
            retry_spent += time.perf_counter() - t_retry
        rec["attempts"] = attempts
        rec["shortened"] = hurry
        rec["machine_busy_before"] = None if busy_before is None else round(busy_before, 3)
        rec["generator"] = generators[(cfg["format"], cfg["size"])]
        if rec["ok"]:
            gpu = f", GPU {rec['peak_gpu_mb']} MB" if rec.get("peak_gpu_mb") is not None else ""
            log(f"    {rec['images_per_s']:>9.1f} img/s over {rec['epochs_timed']} epoch(s) of "
                f"{rec['images_per_epoch']} ({rec['cpu_ms_per_image']:.2f} CPU ms/img), peak host "
                f"{rec['peak_host_mb']:.0f} MB PSS ({rec['peak_rss_sum_mb']:.0f} MB RSS sum){gpu}; other processes "
                f"used {100 * rec['foreign_cpu_frac']:.0f}% of the CPUs")
        records.append(rec)
        common.save_partial(out, "loaders", info, records)

    doc = {
        "benchmark": "loaders",
        "machine": info,
        "command": common.command_line(),
        "timestamp": common.utc_timestamp(),
        "mode": "quick" if args.quick else "full" if args.full else "gpu" if args.gpu else "default",
        "settings": {"loader_mode": "eval" if args.eval else "train", "workers": workers,
                     "retry_budget_s": args.retry_budget, "retry_spent_s": round(retry_spent, 1),
                     "deadline_s": args.deadline,
                     "min_time_s": min_time, "min_epochs": args.min_epochs, "max_epochs": max_epochs,
                     "images": {f"{f} {s}px": n_images(args, s) for f, s in roots},
                     "generator": sorted(set(generators.values())),
                     "normalisation": {"mean": MEAN, "std": STD},
                     "multi_scales": list(MULTI_SCALES),
                     "memory": "peak of the summed PSS of the run's process and all its children, sampled "
                               "every 50 ms from the parent process",
                     "gpu_memory": "torch.cuda.max_memory_allocated (peak_gpu_mb); DALI's own device memory is "
                                   "in peak_gpu_device_mb (device-wide use above the run's start)"},
        "runs": records,
        "targets": target_check(records) + goal_targets(records),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    common.save_result(doc, out, None if args.no_plot else plot)
    for t in doc["targets"]:
        if "config" not in t:
            log(f"target {t['name']}: {t['value']} -> {'recorded' if t['met'] is None else 'met' if t['met'] else 'NOT met'}")
            continue
        log(f"target {t['config']}: dali-cpu {t['dali_cpu_images_per_s']:.0f} vs baseline "
            f"{t['baseline_images_per_s']:.0f} img/s = {t['speedup']:.2f}x (need 2x); peak host "
            f"{t['dali_cpu_peak_host_mb']:.0f} vs {t['baseline_peak_host_mb']:.0f} MB -> "
            f"{'MET' if t['met'] else 'NOT MET'} (CPU time per image: baseline / dali-cpu = "
            f"{t['cpu_efficiency_ratio']:.2f})")
    return common.finish_log(doc, records, out, log)


if __name__ == "__main__":
    sys.exit(main())
