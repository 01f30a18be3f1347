#!/usr/bin/env python
"""Where does the DALI CPU loader spend its time and memory? Variants of dali-cpu, without editing the library.

Each variant runs ``build_loader(backend='dali-cpu')`` on 64 px PNG -> 3 scales (64,112,224) in a fresh
subprocess (the same harness, warm-up and memory sampler as bench_loaders.py), with one or more run-time
monkeypatches that emulate a candidate change to ``dali_lens/pipelines/dali_backend.py`` /
``dali_lens/pipelines/batch.py``:

  as-shipped        the library as it is
  no-finite-check   BatchChecker built with check_finite=False for 8-bit images (uint8 data cannot be NaN/inf)
  cheap-finite      NaN/inf check on per-sample sums (one fast reduction) instead of torch.isfinite over the
                    largest scale; the exact check only runs when a sum is not finite
  queue1            pipeline prefetch_queue_depth=1 instead of 2
  resize-u8         fn.resize keeps uint8 output (crop_mirror_normalize converts to float afterwards)
  no-augment        training loader without the random dihedral augmentation (no DALI conditionals)
  branchless-aug    the same dihedral augmentation without DALI conditionals: the random transpose is a
                    per-sample 0/1 blend of the image and its transpose at native resolution
                    (enable_conditionals=False)
  threads=N         DALI num_threads=N (default: usable cores)
  baseline          the mechine_lensing-style baseline, for reference

Variants combine with '+', e.g. ``no-finite-check+queue1``. Results are printed and written as JSON
(--out, default benchmarks/results/profile-dali-cpu-<host>.json).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import common  # noqa: E402

DEFAULT_VARIANTS = ("as-shipped", "no-finite-check", "cheap-finite", "no-finite-check+queue1",
                    "no-finite-check+resize-u8", "no-finite-check+no-augment", "no-finite-check+threads=1",
                    "no-finite-check+threads=3", "baseline")


def apply(patches: list[str]) -> dict:
    """Install the monkeypatches named in ``patches`` (runs in the child); returns extra build_loader kwargs."""
    from dali_lens.pipelines import batch as batch_mod
    from dali_lens.pipelines import dali_backend

    extra: dict = {}
    for patch in patches:
        if patch in ("as-shipped", "baseline"):
            continue
        if patch == "no-finite-check":
            orig_init = batch_mod.BatchChecker.__init__

            def init(self, dataset, device, tta=False, check_finite=True, _orig=orig_init):
                _orig(self, dataset, device, tta=tta, check_finite=check_finite and dataset.kind != "image")

            batch_mod.BatchChecker.__init__ = init
            dali_backend.BatchChecker = batch_mod.BatchChecker
        elif patch == "cheap-finite":
            import torch

            orig_call = batch_mod.BatchChecker.__call__

            def call(self, images, index, shapes=None, _orig=orig_call):
                largest = images[max(images)]
                if self.check_finite and largest.is_floating_point():
                    # a NaN/inf element makes its sample's sum NaN/inf; a (rare) overflow falls through to the
                    # exact check. float32 sums: a float64 accumulator takes a slow conversion path in torch.
                    sums = largest.reshape(len(index.reshape(-1)), -1).sum(1)
                    if bool(torch.isfinite(sums).all()):
                        self.check_finite = False
                        try:
                            return _orig(self, images, index, shapes)
                        finally:
                            self.check_finite = True
                return _orig(self, images, index, shapes)

            batch_mod.BatchChecker.__call__ = call
        elif patch == "queue1":
            _override_pipeline_kwargs(dali_backend, prefetch_queue_depth=1)
        elif patch == "resize-u8":
            _resize_uint8(dali_backend)
        elif patch == "branchless-aug":
            _branchless_augment(dali_backend)
        elif patch == "no-augment":
            extra["augment"] = False
        elif patch.startswith("threads="):
            extra["num_workers"] = int(patch.split("=", 1)[1])
        else:
            raise SystemExit(f"unknown patch {patch!r}")
    return extra


def _override_pipeline_kwargs(dali_backend, **overrides) -> None:
    orig = dali_backend.pipeline_def

    def patched(*args, **kwargs):
        dec = orig(*args, **kwargs)

        def wrap(func):
            pipe = dec(func)

            def call(*a, **k):
                k.update(overrides)
                return pipe(*a, **k)

            return call

        return wrap

    dali_backend.pipeline_def = patched


def _branchless_augment(dali_backend) -> None:
    from nvidia.dali import fn, types

    def augment(img, opts, shape_hw):
        if not opts.augment:
            return img
        if opts.max_shift:
            raise SystemExit("branchless-aug: max_shift is not emulated")
        t = fn.random.coin_flip(probability=0.5, dtype=types.UINT8)
        # t is 0 or 1 per sample: an exact select, computed on the small native-resolution image
        img = fn.cast_like(img * (1 - t) + fn.transpose(img, perm=[1, 0, 2], transpose_layout=False) * t, img)
        return fn.flip(img, horizontal=fn.random.coin_flip(probability=0.5),
                       vertical=fn.random.coin_flip(probability=0.5))

    orig = dali_backend.pipeline_def

    def no_conditionals(*args, **kwargs):
        kwargs["enable_conditionals"] = False
        return orig(*args, **kwargs)

    dali_backend._augment = augment
    dali_backend.pipeline_def = no_conditionals


def _resize_uint8(dali_backend) -> None:
    from nvidia.dali import types

    real = dali_backend.fn

    class FnProxy:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def resize(*args, **kwargs):
            if kwargs.get("dtype") == types.FLOAT:
                kwargs.pop("dtype")
            return real.resize(*args, **kwargs)

    dali_backend.fn = FnProxy()


def main(argv=None) -> int:
    import bench_loaders as bl

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=list(DEFAULT_VARIANTS), help="variants (default: all)")
    p.add_argument("--batches", default="64,256", help="comma list of batch sizes (default 64,256)")
    p.add_argument("--n", type=int, default=2048, help="images (default 2048)")
    p.add_argument("--size", type=int, default=64, help="image size (default 64)")
    p.add_argument("--format", default="png", choices=bl.FORMATS)
    p.add_argument("--single", action="store_true", help="native scale only instead of 3 scales (64,112,224)")
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--max-epochs", type=int, default=5)
    p.add_argument("--data-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "dali-lens-bench"))
    p.add_argument("--out", help="JSON output (default benchmarks/results/profile-dali-cpu-<host>.json)")
    args = p.parse_args(argv)

    info = common.machine_info()
    root, gen = bl.prepare_dataset(args.data_dir, args.format, args.size, args.n, 0, print)
    workers = common.usable_cores()
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        for variant in args.variants:
            patches = variant.split("+")
            backend = "baseline" if "baseline" in patches else "dali-cpu"
            scales = [args.size] if args.single else list(bl.MULTI_SCALES)
            cfg = {"backend": backend, "format": args.format, "size": args.size, "scales": scales,
                   "scale_mode": "single" if args.single else "multi", "batch": batch, "root": root,
                   "workers": workers, "train": True, "min_time": args.min_time, "min_epochs": 1,
                   "max_epochs": args.max_epochs, "patches": patches}
            rec = bl.launch(cfg, 300, print)
            rec["variant"] = variant
            rows.append(rec)
            if rec["ok"]:
                print(f"batch {batch:>3} {variant:<32} {rec['images_per_s']:>8.0f} img/s "
                      f"{rec['cpu_ms_per_image']:>6.2f} CPU ms/img  peak {rec['peak_host_mb']:>6.0f} MB PSS  "
                      f"(others used {100 * rec['foreign_cpu_frac']:.0f}% CPU)", flush=True)
    out = args.out or os.path.join(HERE, "results", f"profile-dali-cpu-{common.device_tag(info)}.json")
    common.write_json_atomic(out, {"benchmark": "profile-dali-cpu", "machine": info, "command": common.command_line(),
                                   "timestamp": common.utc_timestamp(), "generator": gen, "runs": rows})
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
