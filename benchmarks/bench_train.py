#!/usr/bin/env python
"""End-to-end training throughput and data-stall fraction with the project's own training loop.

Each configuration (model x image size x backend) runs in a fresh subprocess that does what
``python -m dali_lens.train --trainer single`` does per epoch, without validation/test passes:
  loader  = build_loader(dataset, backend, LoaderOptions(scales=(S,), batch_size=B, train=True,
            max_shift=2, num_workers=cores, ...))       (the options runner.run passes)
  member  = dali_lens.trainers.members.make_member(MemberSpec(arch, (S,)), ..., TrainConfig(...))
            (AdamW + cosine schedule; on a GPU also AMP and channels-last, as the trainer uses them)
  stats   = dali_lens.trainers.loop.train_epoch(...)   one warm-up epoch (not timed: pipeline build, worker
            start-up, allocator warm-up), then --epochs timed epochs
samples/s = samples trained in the timed epochs / their wall time; data_wait_fraction = time blocked in
``next(loader)`` / epoch time, both as train_epoch reports them (summed over the timed epochs).
A ``model-only`` row per model and size feeds the same loop one resident batch (no loading at all): the
ceiling the loaders are measured against (loader efficiency = samples/s / model-only samples/s).

Models: small_cnn and resnet18 (build_model(arch, in_chans=3, img_size=S)); sizes: 64 px, and 224 px only
with CUDA or --full; backends: dali-cpu and torchvision, plus dali with CUDA. Data: synthetic g,r,i PNG
cutouts of S px from dali_lens.data.synthetic.generate_dataset, cached in --data-dir.

Default sizes on a CPU-only machine (< 8 min on 2 busy cores): small_cnn batch 64 over 512 images per
epoch, 3 timed epochs; resnet18 (about 30x the compute of small_cnn at 64 px: a few samples/s on 2 cores)
batch 16 over 64 images, 1 timed epoch. With CUDA: batch 64 over 2048 images (64 px) / 512 images (224 px),
3 timed epochs. Besides samples/s, cpu_ms_per_sample (CPU time of the whole process tree per trained sample)
is reported: it is much less sensitive than samples/s to other jobs taking CPU time on a shared machine.
--quick: small_cnn only, 64 px, batch 8 over 16 images, no model-only row.

The memory of every run's process tree is sampled too (common.TreeMemorySampler; peak_host_mb = PSS), and
the CPU used by other processes during each run is recorded (foreign_cpu_frac), as is the load average:
on a shared machine, compare only rows measured under similar load. Output: train-<host>.json and a bar
chart (.png) in --out (a folder, default benchmarks/results, or a .json path).

  python -m benchmarks.bench_train [--quick]        # from the repository root
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import common, runs
from benchmarks.common import MEAN, STD
from benchmarks.multiscale_memory_child import _subset
from dali_lens.choices import BACKENDS as _ALL_BACKENDS

MODELS = ("small_cnn", "resnet18")
BACKENDS = tuple(b for b in _ALL_BACKENDS if b != "auto")
MODULE = "benchmarks.bench_train"
# CPU defaults per model: (batch, images per epoch, timed epochs); the default run stays < 8 min on 2 busy cores
CPU_SIZES = {"small_cnn": (64, 512, 3), "resnet18": (16, 64, 1)}
GPU_SIZES = {64: (64, 2048, 3), 224: (64, 512, 3)}


# ============================================================================================ child side

class _ResidentBatches:
    """The model-only reference: one synthetic contract batch at scale ``size``, ``steps`` times."""

    def __init__(self, batch: int, bands: int, size: int, steps: int, device):
        import torch

        g = torch.Generator().manual_seed(0)
        self.batch = {"image": {size: torch.randn(batch, bands, size, size, generator=g).to(device)},
                      "label": (torch.arange(batch) % 2).to(device), "index": torch.arange(batch).to(device)}
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for _ in range(self.steps):
            yield self.batch


def run_child(cfg: dict) -> dict:
    import torch

    from dali_lens.pipelines import build_loader
    from dali_lens.pipelines.options import LoaderOptions
    from dali_lens.trainers.config import TrainConfig
    from dali_lens.trainers.loop import train_epoch
    from dali_lens.trainers.members import MemberSpec, make_member

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    size, batch, arch = cfg["size"], cfg["batch"], cfg["arch"]
    t0 = time.perf_counter()
    tc = TrainConfig(trainer="single", arch=arch, img_size=size, batch_size=batch, epochs=1 + cfg["epochs"],
                     workers=cfg["workers"], progress=False, seed=cfg["seed"])
    if cfg["backend"] == "model-only":
        bands = 3
        loader = _ResidentBatches(batch, bands, size, cfg["n"] // batch, device)
    else:
        dataset = _subset(cfg["root"], cfg["n"], cfg["seed"])
        bands = dataset.bands
        opts = LoaderOptions(scales=(size,), batch_size=batch, train=True, augment=True, max_shift=tc.max_shift,
                             seed=tc.seed, num_workers=tc.workers, mean=(MEAN,) * bands, std=(STD,) * bands)
        loader = build_loader(dataset, backend=cfg["backend"], options=opts)
    member = make_member(MemberSpec(arch, (size,), tc.seed), bands, tc, len(loader), device)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    loader.set_epoch(0)
    warm = train_epoch([member], loader, tc, device, 0, show_progress=False)
    if warm["steps"] == 0:
        raise RuntimeError(f"no training step ran (n={cfg['n']}, batch {batch})")
    epochs = []
    cpu0 = common.tree_cpu_seconds()
    for e in range(1, 1 + cfg["epochs"]):
        loader.set_epoch(e)
        st = train_epoch([member], loader, tc, device, e, show_progress=False)
        if cuda:
            torch.cuda.synchronize()
        epochs.append(st)
    cpu_s = common.tree_cpu_seconds() - cpu0
    samples = sum(st["samples"] for st in epochs)
    seconds = sum(st["seconds"] for st in epochs)
    wait = sum(st["data_wait_fraction"] * st["seconds"] for st in epochs)
    rates = sorted(st["images_per_s"] for st in epochs)
    return {
        "samples_per_s": round(samples / seconds, 2),
        "data_wait_fraction": round(wait / seconds, 4),
        "samples_per_s_median_epoch": round(rates[len(rates) // 2], 2),
        "samples_per_s_best_epoch": round(rates[-1], 2),
        "cpu_ms_per_sample": round(1000 * cpu_s / samples, 2),
        "data_wait_s": round(wait, 3),
        "timed_s": round(seconds, 3),
        "samples_timed": samples,
        "steps_per_epoch": epochs[0]["steps"],
        "epochs_timed": len(epochs),
        "per_epoch": [{"samples_per_s": round(st["images_per_s"], 2),
                       "data_wait_fraction": round(st["data_wait_fraction"], 4), "seconds": round(st["seconds"], 3)}
                      for st in epochs],
        "warmup_epoch_s": round(warm["seconds"], 3),
        "warmup_data_wait_fraction": round(warm["data_wait_fraction"], 4),
        "build_s": round(build_s, 3),
        "cpu_cores_used": round(cpu_s / seconds, 2),
        "final_loss": round(float(next(iter(epochs[-1]["loss"].values()))), 4),
        "device": str(device),
        "amp": str(tc.amp_dtype(device)),
        "torch_threads": torch.get_num_threads(),
        "loader_workers": cfg["workers"] if cfg["backend"] != "model-only" else None,
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / common.MB, 1) if cuda else None,
    }


# ============================================================================================ parent side

def build_plan(args, have_cuda: bool) -> list[dict]:
    models = args.models.split(",") if args.models else (["small_cnn"] if args.quick else list(MODELS))
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes else
             [64] + ([224] if (have_cuda or args.full) and not args.quick else []))
    backends = (args.backends.split(",") if args.backends else
                [b for b in BACKENDS if b != "dali" or have_cuda])
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {BACKENDS}")
        if b == "dali" and not have_cuda:
            raise SystemExit("backend 'dali' needs CUDA")
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {MODELS}")
    plan = []
    for size in sizes:
        for arch in models:
            if args.quick:
                batch, n, epochs = 8, 16, 1
            elif have_cuda:
                batch, n, epochs = GPU_SIZES.get(size, (64, 512, 3))
            else:
                batch, n, epochs = CPU_SIZES[arch]
            batch, n, epochs = args.batch or batch, args.n or n, args.epochs or epochs
            rows = backends + ([] if args.no_model_only or args.quick else ["model-only"])
            for backend in rows:
                plan.append({"arch": arch, "size": size, "backend": backend, "batch": batch, "n": n,
                             "epochs": epochs})
    return plan


def summarise(records: list[dict]) -> list[dict]:
    out = []
    for r in records:
        if not r.get("ok") or r["backend"] == "model-only":
            continue
        ref = next((m for m in records if m.get("ok") and m["backend"] == "model-only" and m["arch"] == r["arch"]
                    and m["size"] == r["size"]), None)
        out.append({"arch": r["arch"], "size": r["size"], "backend": r["backend"], "batch": r["batch"],
                    "samples_per_s": r["samples_per_s"], "data_wait_pct": round(100 * r["data_wait_fraction"], 1),
                    "cpu_ms_per_sample": r["cpu_ms_per_sample"],
                    "model_only_cpu_ms_per_sample": ref["cpu_ms_per_sample"] if ref else None,
                    "model_only_samples_per_s": ref["samples_per_s"] if ref else None,
                    "loader_efficiency": round(r["samples_per_s"] / ref["samples_per_s"], 3) if ref else None,
                    "foreign_cpu_frac": r.get("foreign_cpu_frac")})
    return out


STALL_GOAL = 0.9  # a loader keeps the model fed when training reaches >= 90 % of the model-only ceiling


def stall_targets(summary: list[dict]) -> list[dict]:
    """The data-stall goal per model, size and backend: samples/s against the model-only ceiling (the same loop
    fed one resident batch), as ``{"name", "value", "met"}``; rows without a ceiling are recorded, not judged."""
    out = []
    for s in summary:
        eff = s["loader_efficiency"]
        out.append({"name": f"data stall, {s['arch']} {s['size']} px, {s['backend']}, batch {s['batch']}: >= "
                            f"{100 * STALL_GOAL:.0f} % of the model-only ceiling (resident batches)",
                    "value": {"samples_per_s": s["samples_per_s"], "model_only_samples_per_s":
                              s["model_only_samples_per_s"], "loader_efficiency": eff,
                              "data_wait_pct": s["data_wait_pct"]},
                    "met": None if eff is None else eff >= STALL_GOAL})
    return out


def plot(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in doc["runs"] if r.get("ok")]
    configs = []
    for r in recs:
        if (r["arch"], r["size"]) not in configs:
            configs.append((r["arch"], r["size"]))
    rows = [b for b in BACKENDS + ("model-only",) if any(r["backend"] == b for r in recs)]
    colors = {"dali": "#76b900", "dali-cpu": "#2a7ab9", "torchvision": "#e08a1e", "model-only": "#cccccc"}
    panels = (("samples_per_s", "training samples / s", "%.1f", 1.0, False),
              ("data_wait_fraction", "time waiting for data\n(% of epoch)", "%.1f%%", 100.0, True),
              ("cpu_ms_per_sample", "CPU ms / sample\n(whole process tree)", "%.1f", 1.0, False))
    fig, axes = plt.subplots(len(panels), len(configs), figsize=(max(8.0, 3.8 * len(configs)), 9.0), squeeze=False)
    for j, (arch, size) in enumerate(configs):
        sel = {r["backend"]: r for r in recs if r["arch"] == arch and r["size"] == size}
        for k, (key, ylabel, fmt, mult, loaders_only) in enumerate(panels):
            ax = axes[k][j]
            names = [b for b in rows if b in sel and not (loaders_only and b == "model-only")]
            vals = [mult * sel[b][key] for b in names]
            bars = ax.bar(range(len(names)), vals, color=[colors[b] for b in names])
            ax.bar_label(bars, fmt=fmt, fontsize=7, padding=2)
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_ylim(0, max(vals + [5.0 if loaders_only else 1e-9]) * 1.25)
            ax.grid(axis="y", alpha=0.3)
            if k == 0:
                first = sel[names[0]]
                ax.set_title(f"{arch} @ {size} px, batch {first['batch']}, {first['epochs_timed']} timed epoch(s)",
                             fontsize=8)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    load = doc.get("loadavg")
    busy = [r["foreign_cpu_frac"] for r in recs if r.get("foreign_cpu_frac") is not None]
    fig.suptitle("Training throughput and data-stall fraction (dali_lens train_epoch after 1 warm-up epoch)\n"
                 f"{common.machine_line(doc['machine'])}"
                 + (f"\nload avg {load[0]:.1f} at start" if load else "")
                 + (f"; other jobs used {100 * min(busy):.0f}-{100 * max(busy):.0f}% of the CPUs during the runs"
                    if busy else ""), fontsize=8)
    fig.tight_layout()
    common.save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="seconds-long smoke test (small_cnn, 64 px, batch 8, 16 images)")
    mode.add_argument("--full", action="store_true", help="also 224 px on a CPU-only machine (slow)")
    p.add_argument("--out", help="output folder (default benchmarks/results) or .json path; the plot goes next "
                                 "to the JSON with a .png suffix")
    p.add_argument("--models", help=f"comma list from {','.join(MODELS)} (default: both; quick: small_cnn)")
    p.add_argument("--sizes", help="comma list of image sizes (default 64, plus 224 with CUDA or --full)")
    p.add_argument("--backends", help=f"comma list from {','.join(BACKENDS)} (default: all available)")
    p.add_argument("--batch", type=int, help="batch size for every model (default: see above)")
    p.add_argument("--n", type=int, help="images per epoch for every model (default: see above)")
    p.add_argument("--epochs", type=int, help="timed epochs after the warm-up epoch (default: small_cnn 3, "
                                             "resnet18 1 on a CPU, 3 with CUDA; quick 1)")
    p.add_argument("--no-model-only", action="store_true",
                   help="skip the model-only reference rows (always skipped by --quick)")
    p.add_argument("--workers", type=int, help="loader workers / DALI threads (default: usable cores)")
    runs.add_run_args(p, timeout=400, data_help="where generated data sets are cached")
    args = p.parse_args(argv)
    rc = runs.internal_entry(args, run_child)
    if rc is not None:
        return rc

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    load_start = [round(v, 2) for v in os.getloadavg()]
    workers = args.workers or common.usable_cores()
    info = common.machine_info(with_gpu=False)  # no torch in this process (see bench_multiscale_memory.prepare)
    library = runs.library_state()
    # the plan depends on CUDA; the data set sizes on the plan: probe with a provisional plan of 64 px + sizes
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else [64, 224]
    want = []
    for s in sizes:
        n = 16 if args.quick else max([args.n or 0, 2048 if s <= 64 else 512])
        want.append({"format": "png", "size": s, "n": n})
    if args.quick or (not args.sizes and not args.full):
        want = [w for w in want if w["size"] == 64] or want[:1]
    prep = runs.prepare(MODULE, want, args.seed, args.data_dir, log)
    info["gpu"] = prep["gpu"]
    have_cuda = info["gpu"] is not None
    plan = build_plan(args, have_cuda)
    missing = sorted({c["size"] for c in plan} - {int(k.split("-")[1]) for k in prep["roots"]})
    if missing:  # 224 px with CUDA: generate (or find cached) now that the plan is known
        extra = runs.prepare(MODULE, [{"format": "png", "size": s, "n": 2048 if s <= 64 else 512}
                                                        for s in missing], args.seed, args.data_dir, log)
        prep["roots"].update(extra["roots"])
    out = runs.out_path(args.out, "train")
    log(f"{common.machine_line(info)}; load average {load_start}\n{len(plan)} runs, {workers} workers/threads, "
        f"results -> {out}")

    records = []
    for i, c in enumerate(plan, 1):
        root = prep["roots"][f"png-{c['size']}"]
        cfg = dict(c, root=root, workers=workers, seed=args.seed)
        log(f"[{i}/{len(plan)}] {c['arch']:<10} {c['size']:>3}px {c['backend']:<12} batch {c['batch']} x "
            f"{c['n'] // c['batch']} steps/epoch, 1 + {c['epochs']} epochs")
        rec = runs.launch(cfg, args.timeout, log, MODULE,
                          keys=("arch", "size", "backend", "batch", "n", "epochs"))
        if rec["ok"]:
            log(f"    {rec['samples_per_s']:>8.1f} samples/s (median epoch {rec['samples_per_s_median_epoch']:.1f}), "
                f"data wait {100 * rec['data_wait_fraction']:.1f}%, {rec['cpu_ms_per_sample']:.1f} CPU ms/sample "
                f"(warm-up epoch {rec['warmup_epoch_s']:.1f} s), peak host {rec['peak_host_mb']:.0f} MB; other "
                f"processes used {100 * rec['foreign_cpu_frac']:.0f}% of the CPUs; {rec['subprocess_s']:.0f} s")
        records.append(rec)
        common.save_partial(out, "train", info, records)

    doc = {
        "benchmark": "train",
        "machine": info,
        "command": common.command_line(),
        "timestamp": common.utc_timestamp(),
        "mode": "quick" if args.quick else "full" if args.full else "default",
        "loadavg": load_start,
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "library": runs.check_library(library, records),
        "settings": {"timed_epochs": {f"{c['arch']}@{c['size']}": c["epochs"] for c in plan}, "warmup_epochs": 1,
                     "workers": workers, "format": "png",
                     "bands": ["g", "r", "i"], "generator": prep["generator"],
                     "normalisation": {"mean": MEAN, "std": STD}, "trainer": "single", "max_shift": 2,
                     "loop": "dali_lens.trainers.loop.train_epoch with a make_member() member",
                     "data_wait": "time blocked in next(loader) / epoch wall time (train_epoch)",
                     "memory": "peak of the summed PSS of the run's process tree (peak_host_mb)"},
        "runs": records,
        "summary": summarise(records),
        "total_s": round(time.perf_counter() - t_all, 1),
    }
    doc["targets"] = stall_targets(doc["summary"])
    common.save_result(doc, out, None if args.no_plot else plot)
    for s in doc["summary"]:
        eff = (f", {100 * s['loader_efficiency']:.0f}% of model-only {s['model_only_samples_per_s']:.1f}/s"
               if s["loader_efficiency"] is not None else "")
        log(f"{s['arch']:<10} {s['size']:>3}px {s['backend']:<12} {s['samples_per_s']:>8.1f} samples/s, "
            f"data wait {s['data_wait_pct']:.1f}%{eff}")
    return common.finish_log(doc, records, out, log)


if __name__ == "__main__":
    sys.exit(main())
