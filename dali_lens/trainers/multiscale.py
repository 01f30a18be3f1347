"""Multi-scale trainer: one model on several input scales, all produced from one decode.

``--schedule all``: every scale every step, loss averaged over scales (one scale's graph in memory at a
time), plus an optional per-sample consistency term (``--consistency kl|mse``). ``--schedule progressive``:
low to high resolution, ``--progressive-epochs`` per scale, and the loader produces only the active scale.
Evaluation averages the model's logits over all scales.
"""
from __future__ import annotations

from .members import MemberSpec, Trainer


def member_specs(cfg) -> list[MemberSpec]:
    scales = tuple(sorted(cfg.scale_list))
    if len(scales) < 2:
        raise ValueError(f"--trainer multiscale needs at least two --scales, got {cfg.scales!r}")
    if cfg.arch.startswith("vit"):
        raise ValueError("ViTs take one fixed input size: use --trainer ensemble with one ViT member per scale")
    return [MemberSpec(cfg.arch, scales, cfg.seed)]


def active_scales(cfg, epoch: int) -> tuple[int, ...]:
    scales = tuple(sorted(cfg.scale_list))
    if cfg.schedule == "progressive":
        return (scales[min(epoch // max(1, cfg.progressive_epochs), len(scales) - 1)],)
    return scales


TRAINER = Trainer(member_specs, active_scales)
