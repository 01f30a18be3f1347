"""Transfer: does a pretrained encoder help on a small set of another survey? (issue 24, item 2)

1. Pretrain a timm model (default ``resnet10t``) on one built-in synthetic set: ground-based g,r,i PNG cutouts
   (0.2"/px, 0.6-1.2" seeing).
2. Fine-tune it on 300 training cutouts of a different set -- space-like 4-band g,r,i,z ``.npy`` float cutouts
   (0.1"/px, 0.16-0.22" seeing: another layout, band set, pixel scale and PSF) -- through ``--weights`` given
   the pretraining run's folder (the first conv adapted from 3 to 4 bands by timm), the head alone for the
   first ``--freeze-epochs``.
3. Train the same model from random initialisation on the same 300 cutouts, for the same epochs.

All runs score the same test split of the second set (best.pt by validation AUC); the test AUCs go to
``benchmarks/results/transfer-<host>.json`` with the machine, the commit and the command.

    python -m benchmarks.bench_transfer            # the committed figure (10-15 min on 2 busy CPU cores)
    python -m benchmarks.bench_transfer --quick    # a smoke run (tiny sets, 1 epoch)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from benchmarks import common


def _quiet(*a, **k):
    pass


def _train(log, **options) -> dict:
    from dali_lens.trainers import TrainConfig, run

    t0 = time.perf_counter()
    result = run(TrainConfig(progress=False, gallery=False, **options), log=_quiet)
    rec = {"test_auc": round(float(result["metrics"]["roc_auc"]), 4), "test_n": result["metrics"]["n"], "seconds": round(time.perf_counter() - t0, 1),
           "val_auc_best": round(max(h.get("val_auc", float("nan")) for h in result["history"]), 4),
           "options": {k: v for k, v in options.items() if k not in ("data_root", "out")}}
    log(f"  test AUC {rec['test_auc']:.3f} ({rec['seconds']:.0f} s)")
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet10t", help="a timm model name (default resnet10t)")
    p.add_argument("--size", type=int, default=32, help="cutout size in px (default 32)")
    p.add_argument("--n-pretrain", type=int, default=1000, help="cutouts of the pretraining set (default 1000)")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--n-train", type=int, default=300, help="training cutouts of the second set (default 300)")
    p.add_argument("--n-test", type=int, default=300, help="test cutouts of the second set (default 300)")
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning / from-scratch epochs (default 4)")
    p.add_argument("--freeze-epochs", type=int, default=1, help="fine-tuning: head-only epochs first (default 1)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of the small-set runs (default 0)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny sets and one epoch: a smoke test")
    p.add_argument("--work", default=None, help="folder for the sets and runs (default: a temporary one)")
    p.add_argument("--out", default=None, help="JSON output (default benchmarks/results/transfer-<host>.json)")
    p.add_argument("--target", choices=("space", "ground"), default="space",
                   help="the small set: space-like (0.1\"/px, 0.16-0.22\" seeing; another survey) or ground "
                        "(the pretraining survey's pixels and seeing, another layout and band set) (default space)")
    args = p.parse_args(argv)
    if args.quick:
        args.n_pretrain, args.pretrain_epochs, args.n_train, args.n_test = 80, 1, 40, 40
        args.epochs = 2
    import torch

    from dali_lens.data.synthetic import generate_dataset

    torch.set_num_threads(args.threads)
    machine = common.machine_info(with_gpu=False)
    out = common.result_path(args.out, "transfer", machine)
    work = args.work or tempfile.mkdtemp(prefix="bench-transfer-")
    log = print
    t_all = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    common_opts = dict(arch=args.arch, img_size=args.size, backend="torchvision", workers=0, batch_size=32)

    pre_data = os.path.join(work, "ground-gri-png")
    if not os.path.exists(os.path.join(pre_data, "train.csv")):
        generate_dataset(pre_data, n=args.n_pretrain, size=args.size, bands="g,r,i", fmt="png", seed=100)
    log(f"pretraining {args.arch} on {args.n_pretrain} ground g,r,i PNG cutouts, {args.pretrain_epochs} epochs")
    pre_run = os.path.join(work, "pretrain")
    shutil.rmtree(pre_run, ignore_errors=True)
    pretrain = _train(log, data_root=pre_data, out=pre_run, epochs=args.pretrain_epochs, seed=0, **common_opts)

    n_small = args.n_train + args.n_test + args.n_train // 3
    fractions = (args.n_train / n_small, (args.n_train // 3) / n_small, args.n_test / n_small)
    scale, seeing = ((0.1, (0.16, 0.22)) if args.target == "space" else (None, None))  # None: the ground preset
    small_data = os.path.join(work, f"{args.target}-griz-npy")
    if not os.path.exists(os.path.join(small_data, "train.csv")):
        generate_dataset(small_data, n=n_small, size=args.size, bands="g,r,i,z", fmt="npy", seed=200,
                         splits=fractions, pixel_scale=scale, seeing=seeing)
    runs = {"random_init": [], "pretrained": []}
    for seed in seeds:
        for name, extra in (("random_init", {}), ("pretrained", {"weights": pre_run, "freeze_epochs": args.freeze_epochs})):
            log(f"{name}, seed {seed}: {args.n_train} {args.target} g,r,i,z .npy cutouts, {args.epochs} epochs")
            run_dir = os.path.join(work, f"{name}-{seed}")
            shutil.rmtree(run_dir, ignore_errors=True)
            runs[name].append(_train(log, data_root=small_data, out=run_dir, epochs=args.epochs, seed=seed,
                                     **extra, **common_opts))
    summary = {name: round(sum(r["test_auc"] for r in recs) / len(recs), 4) for name, recs in runs.items()}
    log("test AUC (mean over seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    doc = {"benchmark": "transfer", "mode": "quick" if args.quick else "full", "command": common.command_line(),
           "timestamp": common.utc_timestamp(), "machine": machine,
           "settings": {"arch": args.arch, "size": args.size, "threads": torch.get_num_threads(), "seeds": seeds,
                        "pretrain_set": {"n": args.n_pretrain, "bands": "g,r,i", "format": "png", "survey": "ground",
                                         "pixel_scale": 0.2, "epochs": args.pretrain_epochs},
                        "small_set": {"n_train": args.n_train, "n_val": args.n_train // 3, "n_test": args.n_test,
                                      "bands": "g,r,i,z", "format": "npy", "target": args.target,
                                      "pixel_scale": 0.1 if args.target == "space" else 0.2,
                                      "seeing": [0.16, 0.22] if args.target == "space" else "ground preset",
                                      "epochs": args.epochs,
                                      "freeze_epochs": args.freeze_epochs}},
           "pretrain": pretrain, "runs": runs, "test_auc": summary,
           "seconds": round(time.perf_counter() - t_all, 1), "load_average_1min": round(os.getloadavg()[0], 2)}
    common.save_result(doc, out)
    log(f"wrote {out}")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
