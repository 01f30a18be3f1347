"""Train a lens finder.

With no arguments: generates the built-in synthetic dataset once (cached in ~/.cache/dali-lens, or
$DALI_LENS_CACHE), trains the small CNN on the CPU (or GPU if present) and prints test metrics.

Examples:
  python -m dali_lens.train
  python -m dali_lens.train --data-root /data/lenses --arch resnet18 --img-size 96 --epochs 20
  python -m dali_lens.train --trainer multiscale --scales 64,112,224 --consistency kl
  python -m dali_lens.train --trainer ensemble --members small_cnn:64:0,resnet18:112:1,vit_b_16:224:2
  python -m dali_lens.train --arch efficientnet_b0 --weights runs/pretrain --freeze-epochs 2 --layer-decay 0.75
  torchrun --nproc_per_node 4 -m dali_lens.train --data-root /data/lenses
Outputs go to --out (default runs/<trainer>-<arch>-<time>/): best.pt, last.pt, config.json,
metrics.json (with purity@N, completeness@N, completeness at purity), predictions.csv, roc.png, and the
per-epoch curves.csv, curves.png and tensorboard/. One run at a time per --out (run.lock); --resume
continues it with the same options (--allow-config-change for deliberate changes).
Exit status: 0 done, 2 bad input or options (the message names the file or option), 130 interrupted
(Ctrl-C), 143 terminated (SIGTERM); both keep the checkpoints written so far.
"""
from __future__ import annotations

import argparse
import sys

from ..cli import Parser, run_command
from ..data.dataset import DataError
from ..pipelines import resolve_backend
from ..trainers.config import add_arguments, from_args
from ..trainers.runner import run


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.train", description=__doc__)
    add_arguments(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def train() -> None:
        resolve_backend(args.backend)  # an unusable --backend (BackendError, a ValueError) fails before any work
        run(from_args(args))

    return run_command(train, (DataError, FileExistsError, FileNotFoundError, PermissionError, ValueError),
                       "interrupted: the checkpoints written so far are kept; rerun with --resume to continue",
                       output=args.out)


if __name__ == "__main__":
    sys.exit(main())

