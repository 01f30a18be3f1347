#!/usr/bin/env python
"""Peak memory of multi-scale training: dali_lens's one-decode pipeline vs the legacy mechine_lensing mode.

What is compared (64 px g,r,i PNG cutouts -> scales 64,112,224, equal batch size, training mode)
  dali-cpu   build_loader(dataset, backend='dali-cpu', scales=(64,112,224), batch_size=B, train=True)
  dali       the same with backend='dali' (only when CUDA is available)
  baseline   the legacy multi-scale mode of mechine_lensing (benchmarks/legacy.py): a torch
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
                     (read by dali_backend._build: default 1 on the CPU, 2 on the GPU)
  threads=N          num_threads=N, through LoaderOptions(num_workers=N) (a real option)
  dtype=float32|float16|uint8 LoaderOptions(dtype=...) (a real option; as shipped, 8-bit images come out as
                     uint8 and the trainer normalises them: dtype=float32 shows what that saves)
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

This module is the parent half (the plan, the launches, the aggregation, targets and plot; it never imports
torch); multiscale_memory_child.py is the child half (one measured run per subprocess), runs.py the harness
it shares with bench_train.py, legacy.py the baseline.

  python -m benchmarks.bench_multiscale_memory [--quick]        # from the repository root
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from benchmarks import common
from benchmarks.common import MEAN, STD
from benchmarks.multiscale_memory_child import ARCH, BAND_NAMES, SCALES, run_child
from benchmarks.runs import (add_run_args, check_library, internal_entry, launch, library_state, out_path,
                             prepare)

MODULE = "benchmarks.bench_multiscale_memory"
DEFAULT_VARIANTS = ("as-shipped", "queue=2", "threads=1", "dtype=float32")
QUICK_VARIANTS = ("as-shipped",)
TRAIN_VARIANTS = ("micro-batch=16", "memory-budget=256MB")


# ============================================================================================ parent side

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
            # the form every benchmark's targets block shares: the goal, its measured value, met or not
            e["name"] = (f"multi-scale training, {backend}, batch {b}: peak host"
                         + (" and GPU" if "gpu_met" in e else "") + " memory >= 50 % below the legacy mode")
            e["value"] = {k: e.get(k) for k in ("host_reduction_pct", "gpu_reduction_pct", "loader_only_reduction_pct")
                          if e.get(k) is not None}
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
    prep = prepare(MODULE, [{"format": "png", "size": 64, "n": n_data}], args.seed,
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
        rec = launch(cfg, args.timeout, log, MODULE)
        if rec["ok"]:
            gpu = f", GPU device {rec['peak_gpu_device_mb']} MB" if rec.get("peak_gpu_device_mb") is not None else ""
            speed = f", {rec['images_per_s']} img/s" if rec.get("images_per_s") else ""
            log(f"    peak host {rec['peak_host_mb']:.0f} MB PSS, {rec['peak_data_mb']} MB anon+shmem "
                f"({rec['peak_rss_sum_mb']:.0f} MB RSS sum, main process max RSS {rec['main_maxrss_mb']:.0f} MB)"
                f"{gpu}{speed}; {rec['subprocess_s']:.0f} s")
        records.append(rec)
        common.save_partial(out, "multiscale-memory", info, records)

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
