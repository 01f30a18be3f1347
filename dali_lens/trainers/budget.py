"""``--memory-budget``: how many samples of each scale one forward/backward pass may take.

A multi-scale step runs one scale's graph at a time; the memory that graph holds is the tensors autograd
saves for backward, which grow with the batch and with the square of the scale.  Given a budget in bytes,
each scale's batch is cut into the largest chunks whose saved tensors fit, gradients accumulated over the
chunks (the same update, except that BatchNorm normalises over a chunk).  The saved bytes per sample are
measured, not guessed: two probe forward passes (1 and 2 samples of the real batch; 2 and 4 where
BatchNorm needs more than one value per channel) with autograd's saved-tensor hooks counting each saved
storage once; their difference is what one more sample costs, free of the weights autograd also saves.
BatchNorm running statistics and the RNG are restored after the probes.
"""
from __future__ import annotations

import math
import re

import torch

GIB = 1024 ** 3


def parse_budget(text) -> float | str | None:
    """``auto``; ``off``/``0`` (None); or a size: ``2``/``2G``/``2GB`` (GiB), ``512M``/``512MB`` (MiB)."""
    value = str(text).strip().lower()
    if value == "auto":
        return "auto"
    if value in ("off", "none", "0", ""):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(g|gb|gib|m|mb|mib)?", value)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"--memory-budget {text!r}: expected auto, off, or a size such as 2GB or 512MB")
    return float(m.group(1)) * (1024 ** 2 if (m.group(2) or "g").startswith("m") else GIB)


def budget_bytes(text, device: torch.device) -> float | None:
    """The budget in bytes; ``auto`` is half of what the GPU can still hand out, and no budget on CPU."""
    budget = parse_budget(text)
    if budget != "auto":
        return budget
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return 0.5 * (free + cached)


def saved_bytes_per_sample(model: torch.nn.Module, x: torch.Tensor, autocast_ctx) -> float:
    """Bytes autograd keeps for backward per sample of ``x`` in ``model``'s training forward pass."""
    names = {name for name, _ in model.named_buffers()}
    buffers = {k: v.detach().clone() for k, v in model.state_dict().items() if k in names}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    try:
        # indexing copies: a probe input never shares (and counts) the storage of the whole batch
        try:  # 1 and 2 samples keep the probe itself small; BatchNorm over a 1x1 map needs 2 and 4
            small, large, n = _saved_bytes(model, x[[0]], autocast_ctx), _saved_bytes(model, x[[0, 0]], autocast_ctx), 1
        except ValueError:
            small, large, n = (*(_saved_bytes(model, x[torch.arange(k) % len(x)], autocast_ctx) for k in (2, 4)), 2)
    finally:
        model.load_state_dict(buffers, strict=False)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, x.device)
    return max(large - small, 0) / n


def _saved_bytes(model: torch.nn.Module, x: torch.Tensor, autocast_ctx) -> int:
    storages: dict = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[(t.device, s.data_ptr())] = s.nbytes()
        return t

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_ctx():
        out = model(x)
    del out
    return sum(storages.values())


def chunk_size(batch: int, per_sample: float, budget: float | None, micro_batch: int = 0) -> int:
    """Samples per forward/backward: the batch, bounded by ``--micro-batch`` and by the budget (at least 1)."""
    size = batch
    if micro_batch and micro_batch > 0:
        size = min(size, micro_batch)
    if budget is not None and per_sample > 0:
        size = min(size, max(1, math.floor(budget / per_sample)))
    return max(1, size)
