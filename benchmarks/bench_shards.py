#!/usr/bin/env python
"""Packed shards at survey scale: packing throughput, reading shards vs loose files, predict memory.

Three measurements, each in fresh subprocesses (results -> benchmarks/results/shards-<host>.json):

1. pack   ``dali_lens.data.packing.pack`` on --pack-n generated 64 px PNG cutouts (3 bands), warm page cache,
          default options (256 MB shards, fsync per shard); --repeats runs, best and median cutouts/s and
          MB/s. PNG/JPEG bytes are copied after a header check (no decoding). Target: >= 3000 cutouts/s.
2. read   the --backend (default dali-cpu; dali on a GPU) eval loader, batch 256, 64 px, one scale, over --read-n generated 64 px
          .npy cutouts (3 bands, float32) as loose files vs the same samples packed into shards. Each run is
          a fresh process: its first epoch includes the loader's construction (for loose files DALI's
          pre-flight header scan of every file, for shards nothing) and the pipeline build; later epochs are
          steady state. Warm: everything in the page cache. Cold: the data evicted before the process starts
          (--cold: ``fadvise`` evicts just the data files with posix_fadvise(DONTNEED); ``drop_caches``
          writes 3 to /proc/sys/vm/drop_caches (root only; also evicts the libraries); ``auto``: both, one
          run each). The share of the data resident at the start is measured with ``fincore``. On a virtual
          machine the host may still cache the disk image: "cold" means "not in this kernel's page cache".
   --png-shards: also 64 px PNG shards (``shards-png``, warm only). Target: >= 100k cutouts/s from packed shards
          (best steady-state epoch; the GPU goal).
3. predict ``python -m dali_lens.predict`` (--predict-models, default the small CNN, untrained weights,
          --backend, --predict-batch, default 256, 1 thread on the CPU backend, all cores on dali; the
          "scored N cutouts in S s (R img/s)" line is kept as scored_images_per_s) over packed sets of
          --predict-n unlabelled 64 px PNG cutouts (hard links to a pool of generated cutouts, so that large
          sets cost no generation time; every link is its own sample). Peak memory of the process tree
          (PSS and RSS sum, sampled every 50 ms; RSS split into anonymous and file-backed pages every 0.5 s)
          and a timeline; memory should not grow with the number of cutouts beyond the per-sample metadata
          (the Sample objects and predict's bookkeeping: well under 2 KB each). DALI reads the shards with
          plain reads by default; memory-mapped shards (``mmap=True``, measured in the read
          section as ``shards-mmap``) would add every shard read so far to the RSS as file-backed pages.

Every record stores the CPU time of the measured process tree and the share of the CPUs other processes
used meanwhile (foreign_cpu_frac): the machine is shared, compare runs with small values.

  python -m benchmarks.bench_shards                    # the full run (~15 min on 2 cores)
  python -m benchmarks.bench_shards --quick            # a smoke test (~1 min)
  python -m benchmarks.bench_shards --sections predict --predict-n 50000,100000,200000
                                                       # rerun one section, keep the others in the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks.common import ROOT

SIZE = 64
BANDS = ("g", "r", "i")
NPY_BYTES = 4 * 3 * SIZE * SIZE  # float32 payload of one cutout


# ============================================================================================ data

def generated(data_dir: str, fmt: str, n: int, seed: int, log) -> str:
    """A synthetic dataset of n cutouts at 64 px (cached: reused when its dataset.json matches)."""
    from dali_lens.data.synthetic import generate_dataset

    root = os.path.join(data_dir, f"{fmt}{SIZE}-{n}-s{seed}")
    meta = os.path.join(root, "dataset.json")
    if os.path.isfile(meta):
        with open(meta) as fh:
            if json.load(fh).get("n") == n:
                return root
    log(f"generating {n} {fmt} cutouts of {SIZE} px in {root} ...")
    t = time.perf_counter()
    generate_dataset(root, n=n, size=SIZE, bands=BANDS, fmt=fmt, seed=seed, overwrite=True,
                     workers=common.usable_cores())
    log(f"  {time.perf_counter() - t:.0f} s")
    return root


def dataset_files(root: str) -> list[str]:
    out = []
    for dirpath, _, names in os.walk(root):
        out.extend(os.path.join(dirpath, n) for n in names if n.endswith((".png", ".npy", ".tar")))
    return sorted(out)


def linked_set(pool_root: str, out: str, n: int, log) -> str:
    """A flat folder of n hard links to the pool's PNG files (n distinct samples, no generation cost)."""
    if os.path.isdir(out) and len(os.listdir(out)) == n:
        return out
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    pool = [f for f in dataset_files(pool_root) if f.endswith(".png")]
    log(f"linking {n} cutouts (pool of {len(pool)}) in {out} ...")
    for i in range(n):
        os.link(pool[i % len(pool)], os.path.join(out, f"c{i:07d}.png"))
    return out


def make_checkpoint(path: str, arch: str = "small_cnn") -> str:
    """A checkpoint of ``arch`` (small_cnn, resnet18) in the trainers' format with seeded, untrained weights
    (64 px, 3 bands)."""
    import torch

    from dali_lens.models import build_model
    from dali_lens.checkpoint import Checkpoint, PixelSettings
    from dali_lens.trainers.config import TrainConfig

    torch.manual_seed(0)
    model = build_model(arch, in_chans=3, img_size=SIZE)
    spec = {"arch": arch, "scales": (SIZE,), "seed": 0, "name": f"{arch}@{SIZE}#0"}
    member = {"spec": spec, "model": model.state_dict(), "optimizer": {}, "scheduler": {}, "scaler": None,
              "temperature": 1.0, "history": []}
    Checkpoint(members=[member], bands=3, pixels=PixelSettings(kind="image", mean=[0.1] * 3, std=[0.2] * 3),
               config=TrainConfig(trainer="single").to_dict(), epoch=1, best_auc=0.5).save(path)
    return path


# ============================================================================================ page cache

def resident_fraction(files: list[str], limit: int = 400) -> float | None:
    """Share of the files' bytes in the page cache (``fincore``, on up to ``limit`` files)."""
    if not files or shutil.which("fincore") is None:
        return None
    step = max(1, len(files) // limit)
    sample = files[::step]
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *sample],
                             capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    res = size = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            res, size = res + int(parts[0]), size + int(parts[1])
    return round(res / size, 4) if size else None


def evict(files: list[str], method: str) -> str:
    """Drop ``files`` from the page cache (``fadvise``: just them; ``drop_caches``: everything, root only).

    Run before the measured process starts: pages a live process has mapped (DALI mmaps the shards and the
    .npy files) are not evicted."""
    os.sync()
    if method == "drop_caches":
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("3\n")
        return method
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


# ============================================================================================ children

def child_pack(cfg: dict) -> dict:
    from dali_lens.data.packing import pack

    shutil.rmtree(cfg["out"], ignore_errors=True)
    m = pack(cfg["src"], cfg["out"], log=lambda *a: None, **cfg.get("options", {}))
    run = m["run"]
    return {"samples": m["total_samples"], "shards": len(m["shards"]), "bytes": m["total_bytes"],
            "seconds": round(run["packing_seconds"], 3), "cutouts_per_s": round(run["samples_per_s"], 1),
            "mb_per_s": round(run["mb_per_s"], 1), "total_seconds_incl_discover": round(run["seconds"], 3)}


def child_read(cfg: dict) -> dict:
    """One fresh process: build the loader and time its first epoch (including the loader's construction:
    the header scan of loose files, the pipeline build), then further (warm) epochs."""
    from dali_lens.data import discover
    from dali_lens.data.dataset import Dataset
    from dali_lens.pipelines import build_loader

    splits = discover(cfg["root"], val_fraction=0)
    ref = next(iter(splits.values()))
    samples = [s for name in sorted(splits) for s in splits[name].samples]
    ds = Dataset(samples, ref.bands, ref.kind, ref.root, "all", ref.hdus, ref.shape)
    files = dataset_files(cfg["root"])

    def epoch(loader, t=None) -> dict:
        t = time.perf_counter() if t is None else t
        c, n = common.tree_cpu_seconds(), 0
        for b in loader:
            n += len(b["index"])
        wall, cpu = time.perf_counter() - t, common.tree_cpu_seconds() - c
        return {"images": n, "seconds": round(wall, 3), "images_per_s": round(n / wall, 1),
                "payload_mb_per_s": round(n * NPY_BYTES / 2 ** 20 / wall, 1),
                "cpu_ms_per_image": round(1e3 * cpu / n, 3)}

    out = {"backend": cfg.get("backend", "dali-cpu"), "samples": len(ds), "kind": ds.kind, "files": len(files),
           "bytes_on_disk": sum(os.path.getsize(f) for f in files), "resident_at_start": resident_fraction(files)}
    t = time.perf_counter()
    loader = build_loader(ds, backend=cfg.get("backend", "dali-cpu"), scales=(SIZE,), batch_size=cfg["batch"], num_workers=cfg["workers"],
                          mean=(10.0,) * 3, std=(50.0,) * 3, **cfg.get("extra", {}))
    out["loader_construction_s"] = round(time.perf_counter() - t, 3)
    out["first_epoch"] = epoch(loader, t)  # includes construction (header scan of loose files) and pipeline build
    epochs, t0 = [], time.perf_counter()
    while len(epochs) < cfg["min_epochs"] or (time.perf_counter() - t0 < cfg["min_time"] and len(epochs) < 6):
        epochs.append(epoch(loader))
    best = max(epochs, key=lambda e: e["images_per_s"])
    out["later_epochs"] = {"epochs": epochs, "images_per_s_best": best["images_per_s"],
                           "images_per_s_median": round(statistics.median(e["images_per_s"] for e in epochs), 1),
                           "payload_mb_per_s_best": best["payload_mb_per_s"],
                           "cpu_ms_per_image_median": round(statistics.median(e["cpu_ms_per_image"] for e in epochs), 3)}
    return out


# ============================================================================================ parent side

def _rss_split(pids) -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes summed over ``pids`` (/proc/<pid>/status)."""
    anon = file = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as fh:
                for line in fh:
                    if line.startswith("RssAnon:"):
                        anon += int(line.split()[1]) * 1024
                    elif line.startswith("RssFile:"):
                        file += int(line.split()[1]) * 1024
        except OSError:
            pass
    return anon, file


def launch(cmd: list[str], timeout: float, timeline: bool = False) -> dict:
    """Run ``cmd``; wall time, CPU account, peak memory of its process tree (PSS, RSS sum, and the RSS split
    into anonymous memory and file-backed pages every 0.5 s) and, with ``timeline``, the RSS every 10 s."""
    cpu = common.CpuAccount()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = common.TreeMemorySampler(proc.pid, interval=0.05)
    sampler.start()
    points, next_point, peak_anon, peak_file = [], 0.0, 0, 0
    try:
        while proc.poll() is None:
            elapsed = time.perf_counter() - t0
            anon, file = _rss_split(common.process_tree(proc.pid))
            peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
            if timeline and elapsed >= next_point:
                points.append([round(elapsed, 1), round(anon / common.MB, 1), round(file / common.MB, 1)])
                next_point += 10.0
            if elapsed > timeout:
                proc.kill()
            time.sleep(0.5)
        output = proc.stdout.read()
    finally:
        mem = sampler.stop()
    rec = {"ok": proc.returncode == 0, "returncode": proc.returncode, "wall_s": round(time.perf_counter() - t0, 2)}
    rec.update(mem)
    rec.update(peak_rss_anon_mb=round(peak_anon / common.MB, 1), peak_rss_file_mb=round(peak_file / common.MB, 1))
    rec.update(cpu.finish())
    if timeline:
        rec["rss_timeline_s_anon_file_mb"] = points
    if not rec["ok"]:
        rec["output_tail"] = output[-3000:]
    rec["_output"] = output
    return rec


def run_child(kind: str, cfg: dict, timeout: float) -> dict:
    fd, result = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        rec = launch([sys.executable, "-m", "benchmarks.bench_shards", "--_child", json.dumps({"kind": kind, **cfg}),
                      "--_result", result], timeout)
        if rec["ok"]:
            with open(result) as fh:
                rec.update(json.load(fh))
    finally:
        os.unlink(result)
    rec.pop("_output", None)
    return rec


def all_targets(doc: dict) -> None:
    """The issue's targets, from whatever sections ``doc`` holds (recomputed after every section)."""
    doc["targets"] = []
    pack = doc.get("pack") or {}
    if pack.get("runs"):
        best = pack.get("cutouts_per_s_best")
        doc["targets"].append({"name": "pack >= 3000 cutouts/s (64 px PNG)", "value": best,
                               "met": best is not None and best >= 3000})
    read_targets(doc)
    for arch in sorted({r.get("arch", "small_cnn") for r in doc.get("predict", []) if r.get("ok")}):
        rates = [r.get("scored_images_per_s") for r in doc["predict"] if r.get("ok") and r["source"] == "shards"
                 and r.get("arch", "small_cnn") == arch and r.get("scored_images_per_s")]
        if rates:
            doc["targets"].append({"name": f"predict from packed shards, {arch}: cutouts/s per GPU (predict's "
                                           "'scored' line; recorded, no threshold)", "value": max(rates), "met": None})
    shard_runs = sorted((r for r in doc.get("predict", []) if r["source"] == "shards" and r["ok"]
                         and r.get("arch", "small_cnn") == (doc["settings"].get("predict_models") or ["small_cnn"])[0]),
                        key=lambda r: r["n"])
    if len(shard_runs) >= 2:
        a, b = shard_runs[0], shard_runs[-1]
        growth = {k: round((b[k] - a[k]) * common.MB / (b["n"] - a["n"]), 1)
                  for k in ("peak_rss_sum_mb", "peak_host_mb", "peak_rss_anon_mb")}
        doc["predict_memory_growth_bytes_per_cutout"] = growth
        doc["targets"].append({"name": f"predict peak RSS flat from {a['n']} to {b['n']} cutouts: growth below 2 KB per "
                                       "cutout (the per-sample bookkeeping: samples, shard plan, DALI's tar index)",
                               "value": growth["peak_rss_sum_mb"], "met": growth["peak_rss_sum_mb"] < 2048})


def read_targets(doc: dict) -> None:
    """The issue's read targets: shards at least as fast as loose files with a warm page cache (median of the
    steady-state epochs), faster with a cold one (first epoch after eviction, per eviction method)."""
    r = doc["read"]
    loose, shards = r.get("loose", {}), r.get("shards", {})
    w_l, w_s = loose.get("warm", {}), shards.get("warm", {})
    if w_l.get("ok") and w_s.get("ok"):
        a, b = w_l["later_epochs"]["images_per_s_median"], w_s["later_epochs"]["images_per_s_median"]
        doc["targets"].append({"name": "read 64 px .npy, warm page cache: shards >= loose files (img/s, median of "
                                       "steady-state epochs)", "value": {"loose": a, "shards": b}, "met": b >= a})
    for name in ("shards", "shards-png"):
        warm = r.get(name, {}).get("warm", {})
        if warm.get("ok"):
            best = warm["later_epochs"]["images_per_s_best"]
            doc["targets"].append({"name": f"read {name} (64 px, {warm.get('backend', 'dali-cpu')}): >= 100k cutouts/s "
                                           "(best steady-state epoch)", "value": best, "met": best >= 100_000})
    for key in sorted(k for k in shards if k.startswith("cold_")):
        c_l, c_s = loose.get(key, {}), shards[key]
        if c_l.get("ok") and c_s.get("ok"):
            a, b = c_l["first_epoch"]["images_per_s"], c_s["first_epoch"]["images_per_s"]
            doc["targets"].append({"name": f"read 64 px .npy, cold page cache ({key[5:]}): shards > loose files "
                                           "(img/s, first epoch)", "value": {"loose": a, "shards": b}, "met": b > a})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke test with tiny sets")
    p.add_argument("--pack-n", type=int, help="PNG cutouts for the packing throughput (default 20000)")
    p.add_argument("--repeats", type=int, default=3, help="packing runs (default 3)")
    p.add_argument("--read-n", type=int, help=".npy cutouts for the read comparison (default 20000)")
    p.add_argument("--predict-n", help="comma-separated set sizes for predict memory (default 50000,100000)")
    p.add_argument("--predict-loose", action="store_true", help="also run predict on the smallest set as loose files")
    p.add_argument("--cold", choices=("auto", "drop_caches", "fadvise", "none"), default="auto",
                   help="how the data is evicted before a cold-cache run: fadvise (only the data files), drop_caches "
                        "(the whole page cache; root only), auto (both, one run each; default), none")
    p.add_argument("--workers", type=int, help="loader threads (default: usable cores)")
    p.add_argument("--backend", choices=("dali-cpu", "dali", "torchvision"), default="dali-cpu",
                   help="the backend of the read and predict sections (default dali-cpu; dali on a GPU)")
    p.add_argument("--png-shards", action="store_true", help="read section: also 64 px PNG shards (warm)")
    p.add_argument("--read-min-time", type=float, default=10.0,
                   help="read section: steady-state epochs until this many seconds, 2 to 6 epochs (default 10; "
                        "quick 0)")
    p.add_argument("--predict-batch", type=int, default=256, help="predict --batch-size (default 256)")
    p.add_argument("--predict-models", default="small_cnn",
                   help="comma list of models predict scores with: small_cnn, resnet18 (default small_cnn)")
    p.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dali-lens-bench", "shards"),
                   help="where generated and packed sets are kept (default ~/.cache/dali-lens-bench/shards)")
    p.add_argument("--out", help="result JSON (default benchmarks/results/shards-<host>.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sections", default="pack,read,predict",
                   help="comma list of the sections to run (default: pack,read,predict); the others are kept from "
                        "the existing --out file, and each section records when and by which command it ran")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        return common.child_main(lambda cfg: {"pack": child_pack, "read": child_read}[cfg["kind"]](cfg),
                                 args._child, args._result)

    def log(msg: str) -> None:
        print(msg, flush=True)

    t_all = time.perf_counter()
    info = common.machine_info()
    workers = args.workers or common.usable_cores()
    pack_n = args.pack_n or (1000 if args.quick else 20000)
    read_n = args.read_n or (600 if args.quick else 20000)
    predict_ns = [int(v) for v in (args.predict_n or ("2000" if args.quick else "50000,100000")).split(",")]
    repeats = 1 if args.quick else args.repeats
    models = [m.strip() for m in args.predict_models.split(",") if m.strip()]
    if not models or any(m not in ("small_cnn", "resnet18") for m in models):
        p.error(f"--predict-models: choose from small_cnn, resnet18 (got {args.predict_models!r})")
    if not 0 <= args.read_min_time <= 600:
        p.error(f"--read-min-time: between 0 and 600 seconds (got {args.read_min_time})")
    if not 1 <= args.predict_batch <= 65536:
        p.error(f"--predict-batch: between 1 and 65536 (got {args.predict_batch})")
    out = common.result_path(args.out, "shards", info)
    os.makedirs(args.data_dir, exist_ok=True)
    log(f"{common.machine_line(info)}\nresults -> {out}")
    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    bad = [x for x in sections if x not in ("pack", "read", "predict")]
    if bad or not sections:
        p.error(f"--sections: choose from pack, read, predict (got {args.sections!r})")
    mode = "quick" if args.quick else "full"
    settings = {"size": SIZE, "bands": len(BANDS), "pack_n": pack_n, "read_n": read_n, "predict_n": predict_ns,
                "workers": workers, "cold": args.cold, "data_dir": args.data_dir, "backend": args.backend,
                "predict_batch": args.predict_batch, "predict_models": models}
    doc = {"benchmark": "shards", "machine": info, "command": common.command_line(), "timestamp": common.utc_timestamp(),
           "mode": mode, "settings": settings, "pack": {}, "read": {}, "predict": [], "targets": []}
    if len(sections) < 3 and os.path.exists(out):  # keep the sections not rerun from the existing results
        with open(out) as fh:
            old = json.load(fh)
        if old.get("mode") != mode:
            p.error(f"{out} holds a {old.get('mode')} run; rerun every section or write elsewhere (--out)")
        for key in ("pack", "read", "predict"):
            if key not in sections:
                doc[key] = old.get(key, doc[key])
        doc["section_runs"] = old.get("section_runs") or {
            k: {"timestamp": old.get("timestamp"), "command": old.get("command")} for k in ("pack", "read", "predict")}
        # a setting that belongs to a section kept from the old file keeps its old value
        owner = {"pack_n": "pack", "read_n": "read", "cold": "read", "predict_n": "predict",
                 "predict_batch": "predict", "predict_models": "predict"}
        doc["settings"] = {**old.get("settings", {}),
                           **{k: v for k, v in settings.items() if k not in owner or owner[k] in sections}}
    doc.setdefault("section_runs", {})
    for key in sections:
        doc["section_runs"][key] = {"timestamp": doc["timestamp"], "command": doc["command"]}

    def save() -> None:
        all_targets(doc)
        doc["seconds_total"] = round(time.perf_counter() - t_all, 1)
        common.write_json_atomic(out, doc)

    if "pack" in sections:
        # 1. packing throughput (64 px PNG, warm cache)
        src = generated(args.data_dir, "png", pack_n, args.seed, log)
        for f in dataset_files(src):  # warm the page cache
            with open(f, "rb") as fh:
                fh.read()
        runs = []
        for r in range(repeats):
            rec = run_child("pack", {"src": src, "out": os.path.join(args.data_dir, "packed-png")}, timeout=1800)
            runs.append(rec)
            log(f"pack {pack_n} PNG [{r + 1}/{repeats}]: " + (f"{rec['cutouts_per_s']:.0f} cutouts/s, {rec['mb_per_s']:.1f} "
                f"MB/s, {rec['shards']} shard(s), peak {rec['peak_host_mb']:.0f} MB PSS, other processes "
                f"{100 * rec['foreign_cpu_frac']:.0f}% of the CPUs" if rec["ok"] else f"FAILED {rec.get('output_tail')}"))
        ok = [r for r in runs if r["ok"]]
        doc["pack"] = {"source": "png", "n": pack_n, "runs": runs,
                       "cutouts_per_s_best": max((r["cutouts_per_s"] for r in ok), default=None),
                       "cutouts_per_s_median": statistics.median(r["cutouts_per_s"] for r in ok) if ok else None,
                       "mb_per_s_best": max((r["mb_per_s"] for r in ok), default=None)}
        save()

    if "read" in sections:
        # 2. reading: DALI CPU over loose .npy vs the same samples packed
        npy = generated(args.data_dir, "npy", read_n, args.seed, log)
        npy_packed = os.path.join(args.data_dir, f"packed-npy-{read_n}")
        rec = run_child("pack", {"src": npy, "out": npy_packed}, timeout=1800)
        doc["read"]["pack_npy"] = rec
        if rec["ok"]:
            log(f"pack {read_n} npy: {rec['cutouts_per_s']:.0f} cutouts/s, {rec['mb_per_s']:.1f} MB/s, {rec['shards']} shard(s)")
        cold_methods = {"auto": ["fadvise", "drop_caches"], "none": []}.get(args.cold, [args.cold])
        sets = [("loose", npy, {}), ("shards", npy_packed, {}), ("shards-mmap", npy_packed, {"mmap": True})]
        if args.png_shards:
            png = generated(args.data_dir, "png", read_n, args.seed, log)
            png_packed = os.path.join(args.data_dir, f"packed-png-{read_n}")
            rec = run_child("pack", {"src": png, "out": png_packed}, timeout=1800)
            doc["read"]["pack_png"] = rec
            sets.append(("shards-png", png_packed, {}))
        for name, root, extra in sets:
            files = dataset_files(root)
            for f in files:  # warm: everything in the page cache
                with open(f, "rb") as fh:
                    while fh.read(1 << 22):
                        pass
            cfg = {"root": root, "batch": 256, "workers": workers, "backend": args.backend, "min_epochs": 1 if args.quick else 2,
                   "min_time": 0 if args.quick else args.read_min_time, "extra": extra}
            rec = run_child("read", cfg, timeout=1800)
            doc["read"][name] = {"warm": rec}
            if rec["ok"]:
                log(f"read {name:<11} warm: peak RSS {rec['peak_rss_anon_mb']:.0f} MB anonymous + "
                    f"{rec['peak_rss_file_mb']:.0f} MB file-backed; first epoch {rec['first_epoch']['images_per_s']:.0f} img/s (incl. loader "
                    f"construction {rec['loader_construction_s']:.2f} s), then {rec['later_epochs']['images_per_s_best']:.0f} "
                    f"img/s best ({rec['later_epochs']['images_per_s_median']:.0f} median, "
                    f"{rec['later_epochs']['cpu_ms_per_image_median']:.3f} CPU ms/img); other processes "
                    f"{100 * rec['foreign_cpu_frac']:.0f}% of the CPUs")
            else:
                log(f"read {name} warm: FAILED {rec.get('output_tail')}")
            for method in cold_methods if name not in ("shards-mmap", "shards-png") else []:
                try:
                    used = evict(files, method)
                except OSError as exc:
                    doc["read"][name][f"cold_{method}"] = {"ok": False, "error": f"eviction failed: {exc}"}
                    log(f"read {name} cold ({method}): eviction not permitted here ({exc})")
                    continue
                rec = run_child("read", dict(cfg, min_epochs=1, min_time=0), timeout=1800)
                rec["eviction"] = used
                doc["read"][name][f"cold_{used}"] = rec
                if rec["ok"]:
                    log(f"read {name:<11} cold ({used}, {100 * (rec['resident_at_start'] or 0):.0f}% of the data resident "
                        f"at start): first epoch {rec['first_epoch']['images_per_s']:.0f} img/s "
                        f"({rec['first_epoch']['payload_mb_per_s']:.0f} MB/s payload, loader construction "
                        f"{rec['loader_construction_s']:.2f} s), next epoch {rec['later_epochs']['images_per_s_best']:.0f} "
                        f"img/s; other processes {100 * rec['foreign_cpu_frac']:.0f}% of the CPUs")
                else:
                    log(f"read {name} cold: FAILED {rec.get('output_tail')}")
            save()

    if "predict" in sections:
        # 3. predict from shards over large sets: peak memory
        pool = generated(args.data_dir, "png", min(4096, max(predict_ns)), args.seed + 1, log)
        ckpts = {m: make_checkpoint(os.path.join(args.data_dir, f"{m}64.pt"), m) for m in models}
        threads = ["--workers", "1", "--threads", "1"] if args.backend == "dali-cpu" else []
        for n, arch in [(n, m) for n in predict_ns for m in models]:
            ckpt = ckpts[arch]
            loose = linked_set(pool, os.path.join(args.data_dir, f"links-{n}"), n, log)
            packed = os.path.join(args.data_dir, f"packed-links-{n}")
            prec = run_child("pack", {"src": loose, "out": packed}, timeout=3600)
            if prec["ok"]:
                log(f"pack {n} linked PNG: {prec['cutouts_per_s']:.0f} cutouts/s, {prec['mb_per_s']:.1f} MB/s, "
                    f"{prec['shards']} shard(s), peak {prec['peak_host_mb']:.0f} MB PSS")
            targets = [("shards", packed)] + ([("loose", loose)] if args.predict_loose and n == min(predict_ns)
                                              and arch == models[0] else [])
            for source, data in targets:
                csv_out = os.path.join(args.data_dir, f"predict-{source}-{n}-{arch}.csv")
                if os.path.exists(csv_out):
                    os.unlink(csv_out)
                cmd = [sys.executable, "-m", "dali_lens.predict", "-c", ckpt, data, "--out", csv_out, "--backend",
                       args.backend, "--batch-size", str(args.predict_batch), *threads, "--no-progress"]
                log(f"predict {n} cutouts from {source} with {arch}, batch {args.predict_batch} ...")
                rec = launch(cmd, timeout=3600, timeline=True)
                output = rec.pop("_output", "")
                rows = sum(1 for _ in open(csv_out)) - 1 if os.path.exists(csv_out) else 0
                scored = [ln for ln in output.splitlines() if ln.lstrip().startswith("scored ")]
                rate = re.search(r"\(([0-9.]+) img/s\)", scored[-1]) if scored else None
                rec.update(n=n, source=source, rows=rows, pack=prec if source == "shards" else None, arch=arch,
                           backend=args.backend, batch=args.predict_batch,
                           scored_images_per_s=float(rate.group(1)) if rate else None,
                           images_per_s=round(n / rec["wall_s"], 1),
                           log_tail=[ln for ln in output.splitlines() if "scored" in ln or "cutouts" in ln][-2:])
                doc["predict"].append(rec)
                log(f"  {rows} rows in {rec['wall_s']:.0f} s ({rec['images_per_s']:.0f} img/s incl. start-up), peak "
                    f"{rec['peak_host_mb']:.0f} MB PSS / {rec['peak_rss_sum_mb']:.0f} MB RSS sum (anonymous "
                    f"{rec['peak_rss_anon_mb']:.0f} MB, file-backed {rec['peak_rss_file_mb']:.0f} MB); other processes "
                    f"{100 * rec['foreign_cpu_frac']:.0f}% of the CPUs")
                if os.path.exists(csv_out):
                    os.unlink(csv_out)
                save()
    save()
    for t in doc["targets"]:
        log(f"target {t['name']}: {t['value']} -> {'met' if t['met'] else 'NOT met'}")
    log(f"done in {time.perf_counter() - t_all:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
