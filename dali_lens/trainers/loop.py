"""The shared epoch loop: train members on contract batches, predict (``scoring``), gather across ranks."""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..scoring import autocast, member_logits, to_model
from .base import get_trainer
from .budget import budget_bytes, chunk_size, saved_bytes_per_sample


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def train_epoch(members, loader, cfg, device: torch.device, epoch: int, active_scales=None,
                on_step=None, show_progress: bool = True, progress: dict | None = None, trainer=None,
                loss_weights: "LossWeights | None" = None) -> dict:
    """One pass over ``loader``; each member sees its own scales. Returns mean loss per member.

    ``trainer`` (default: ``cfg.trainer``'s) may add a loss term (``base.Trainer.extra_loss``).
    ``progress`` is where the epoch stands, ``{"steps": n, "loss_sums": {member: sum}}``: a resumed epoch
    continues from its mid-epoch checkpoint's (the loader restored to the same step), so that the epoch's mean
    loss is the uninterrupted run's. It is updated in place after every step, before ``on_step(step)`` (the
    step's number in the epoch) is called. ``loss_weights`` (:class:`LossWeights`) weighs each sample's BCE."""
    trainer = trainer if trainer is not None else get_trainer(cfg.trainer)
    for m in members:
        m.model.train()
    amp = cfg.amp_dtype(device)
    progress = progress if progress is not None else {"steps": 0, "loss_sums": {}}
    totals = {m.spec.name: float(progress["loss_sums"].get(m.spec.name, 0.0)) for m in members}
    steps, seen, t0, wait = int(progress["steps"]), 0, time.perf_counter(), 0.0
    bar = tqdm(total=len(loader), initial=steps, desc=f"epoch {epoch + 1} train", leave=False,
               disable=not show_progress, dynamic_ncols=True)
    norm = _norm(loader)
    chunker = Chunker(cfg, device, amp, norm)
    fetch = time.perf_counter()
    for batch in loader:
        wait += time.perf_counter() - fetch
        y = batch["label"].to(device, non_blocking=True).float()
        w, w_total = loss_weights.of(batch["index"], y) if loss_weights is not None else (None, None)
        for m in members:
            scales = [s for s in m.spec.scales if active_scales is None or s in active_scales]
            m.optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            # memory-bounded: one scale's graph at a time and, with --micro-batch or --memory-budget, at most
            # that many samples of it; the trainer's extra term sees the other scales as detached partners
            chunks = {s: chunker(m, s, batch["image"][s]) for s in scales}
            term = trainer.extra_loss(cfg, tuple(scales))
            with torch.no_grad(), autocast(device, amp):
                partner = ([torch.cat([m.model(_to(batch["image"][s][c], device, cfg, norm)).float() for c in chunks[s]])
                            for s in scales] if term is not None and len(scales) > 1 else None)
            passes = [(k, s, c) for k, s in enumerate(scales) for c in chunks[s]]
            for n, (k, s, c) in enumerate(passes):
                yc = y[c]
                # DistributedDataParallel: gradients are averaged across ranks once, in the step's last pass
                sync = n == len(passes) - 1 or not hasattr(m.model, "no_sync")
                with (contextlib.nullcontext() if sync else m.model.no_sync()):
                    with autocast(device, amp):
                        z = m.model(_to(batch["image"][s][c], device, cfg, norm)).float()
                    # each chunk's share of the batch mean: the accumulated gradient is the whole batch's
                    share = len(yc) / len(y) / len(scales)
                    if w is None:
                        loss = F.binary_cross_entropy_with_logits(z, yc) * share
                    else:  # this chunk's share of the batch's weighted mean
                        loss = (F.binary_cross_entropy_with_logits(z, yc, reduction="none") * w[c]).sum() \
                            / w_total / len(scales)
                    if term is not None:
                        group = [z if j == k else partner[j][c] for j in range(len(scales))]
                        loss = loss + term(group, k, yc) * share
                    if m.scaler is not None:
                        m.scaler.scale(loss).backward()
                    else:
                        loss.backward()
                loss_value += float(loss.detach())
            if m.scaler is not None:
                m.scaler.step(m.optimizer)
                m.scaler.update()
            else:
                m.optimizer.step()
            m.scheduler.step()
            totals[m.spec.name] += loss_value
        steps += 1
        seen += len(y)
        bar.update(1)
        if steps % 10 == 0:
            bar.set_postfix(img_s=f"{seen / (time.perf_counter() - t0):.0f}")
        progress["steps"], progress["loss_sums"] = steps, dict(totals)
        if on_step is not None:
            on_step(steps)
        fetch = time.perf_counter()
    bar.close()
    elapsed = time.perf_counter() - t0
    return {"loss": {k: v / max(1, steps) for k, v in totals.items()}, "steps": steps, "samples": seen,
            "seconds": elapsed, "images_per_s": seen / max(elapsed, 1e-9), "data_wait_fraction": wait / max(elapsed, 1e-9),
            **chunker.report()}


class LossWeights:
    """Per-sample loss weights (``data/labels.py``): ``sample`` (one per training-set position, or None: all 1)
    and ``pos_weight`` (lenses' factor, ``--pos-weight``). A batch's loss is ``sum(w p BCE) / sum(w)``: with
    ``sample`` None exactly ``BCEWithLogitsLoss(pos_weight=p)``."""

    def __init__(self, sample, pos_weight: float, device: torch.device):
        self.sample = None if sample is None else torch.as_tensor(sample, dtype=torch.float32, device=device)
        self.pos_weight = float(pos_weight)

    def of(self, index: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-sample factors ``w p``, the batch's ``sum(w)``) for a batch's ``index`` and labels ``y``."""
        w = self.sample[index.to(self.sample.device)].to(y.device) if self.sample is not None else torch.ones_like(y)
        return w * torch.where(y > 0.5, self.pos_weight, 1.0), w.sum().clamp_min(1e-12)


class Chunker:
    """Slices of a batch that one forward(/backward) pass may take, per member and scale.

    Bounded by ``--micro-batch`` and by ``--memory-budget`` (see ``budget.py``), whose bytes per sample are
    measured once per member, scale and sample shape.
    """

    def __init__(self, cfg, device: torch.device, amp, norm: tuple):
        self.cfg, self.device, self.amp, self.norm = cfg, device, amp, norm
        self.micro = getattr(cfg, "micro_batch", 0)
        self.budget = budget_bytes(getattr(cfg, "memory_budget", "off"), device)
        self.per_sample: dict = {}  # (member, scale, sample shape) -> bytes autograd keeps per sample
        self.measured: dict = {}  # the same, also by training mode, for members that do not keep it
        self.sizes: dict = {}  # member -> {scale: largest chunk used}

    def __call__(self, m, scale: int, x: torch.Tensor) -> list[slice]:
        per = 0.0
        if self.budget is not None:
            model = getattr(m, "core", m.model)
            key = (m.spec.name, scale, tuple(x.shape[1:]))
            known = getattr(m, "saved_bytes", self.measured)  # a Member keeps it from epoch to epoch
            if (key, model.training) not in known:
                known[key, model.training] = saved_bytes_per_sample(
                    model, _to(x[:4], self.device, self.cfg, self.norm), lambda: autocast(self.device, self.amp))
            per = self.per_sample[key] = known[key, model.training]
        size = chunk_size(len(x), per, self.budget, self.micro)
        sizes = self.sizes.setdefault(m.spec.name, {})
        sizes[scale] = max(sizes.get(scale, 0), size)
        return [slice(i, min(i + size, len(x))) for i in range(0, len(x), size)]

    def report(self) -> dict:
        return {"chunk_sizes": self.sizes, "budget_bytes": self.budget,
                "saved_bytes_per_sample": {f"{k[0]}@{k[1]}": int(v) for k, v in self.per_sample.items()}}


def _norm(loader) -> tuple:
    """(mean, std) with which uint8 batches of ``loader`` are finished on the training device."""
    opts = getattr(loader, "opts", None)
    return (opts.mean, opts.std) if opts is not None else (None, None)


def _to(x: torch.Tensor, device: torch.device, cfg, norm: tuple = (None, None)) -> torch.Tensor:
    """One scale of a batch on ``device`` as the model takes it (``scoring.to_model``)."""
    return to_model(x, device, norm, cfg.channels_last)


@torch.no_grad()
def predict(members, loader, cfg, device: torch.device, desc: str = "eval", show_progress: bool = True):
    """Logits per member for every sample of ``loader`` (``scoring.member_logits``: averaged over a member's
    scales and over TTA).

    Returns ``(index, label, {member name: logits})`` as numpy arrays, gathered across ranks so that every
    rank holds the whole split, ordered by sample index.
    """
    for m in members:
        m.model.eval()
    amp = cfg.amp_dtype(device)
    idx, lab, out = [], [], {m.spec.name: [] for m in members}
    norm = _norm(loader)
    chunker = Chunker(cfg, device, amp, norm)  # evaluation at the training batch size stays under the budget too
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        idx.append(batch["index"].cpu())
        lab.append(batch["label"].cpu())
        for m in members:
            z = member_logits(m.core, batch["image"], m.spec.scales, device, amp=amp, norm=norm,
                              channels_last=cfg.channels_last, chunks=lambda s, x, m=m: chunker(m, s, x))
            out[m.spec.name].append(z.cpu())
    index = torch.cat(idx).numpy() if idx else np.zeros(0, dtype=np.int64)
    label = torch.cat(lab).numpy() if lab else np.zeros(0, dtype=np.int64)
    logits = {k: (torch.cat(v).numpy() if v else np.zeros(0, dtype=np.float32)) for k, v in out.items()}
    rank, world, _ = dist_info()
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, (index, label, logits))
        index = np.concatenate([p[0] for p in parts])
        label = np.concatenate([p[1] for p in parts])
        logits = {k: np.concatenate([p[2][k] for p in parts]) for k in logits}
    order = np.argsort(index, kind="stable")
    return index[order], label[order], {k: v[order] for k, v in logits.items()}
