"""Multi-process runs under ``torchrun``: the one place that joins (and leaves) the process group.

``train`` and ``predict`` both call :func:`init`; ``torchrun`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``.
A plain run (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) joins nothing and gets rank 0 of 1.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init() -> tuple[int, int, int, torch.device]:
    """Join the process group once (NCCL with CUDA, else gloo; each process on its ``LOCAL_RANK`` GPU) and
    return ``(rank, world size, local rank, device)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return rank, world, local, torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")


def shutdown() -> None:
    """Leave the process group, if one was joined (best effort: called on the way out of a command)."""
    try:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # pragma: no cover - best effort at exit
        pass
