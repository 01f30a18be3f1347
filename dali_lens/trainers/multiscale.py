"""Multi-scale trainer: one model on several input scales, all produced from one decode.

``--schedule all``: every scale every step, loss averaged over scales (one scale's graph in memory at a
time), plus an optional per-sample consistency term (``--consistency kl|mse``, :func:`consistency_loss`).
``--schedule progressive``: low to high resolution, ``--progressive-epochs`` per scale, and the loader
produces only the active scale. Evaluation averages the model's logits over all scales.
"""
from __future__ import annotations

import torch

from .base import Trainer
from ..checkpoint import MemberSpec


def consistency_loss(logits: list[torch.Tensor], kind: str) -> torch.Tensor:
    """Per-sample agreement between the lens probabilities at different scales (not a batch softmax).

    Each scale is pulled toward the mean of the *other* scales' probabilities, which are detached, so every
    scale's backward pass is independent and the step's memory stays bounded by one scale at a time.
    ``kl``: symmetric Bernoulli KL; ``mse``: squared difference of probabilities.
    """
    probs = [torch.sigmoid(z.float()) for z in logits]
    losses = []
    for i, p in enumerate(probs):
        others = [q.detach() for j, q in enumerate(probs) if j != i]
        if not others:
            continue
        target = torch.stack(others).mean(0).clamp(1e-6, 1 - 1e-6)
        pc = p.clamp(1e-6, 1 - 1e-6)
        if kind == "mse":
            losses.append(((pc - target) ** 2).mean())
        else:
            kl_pt = pc * (pc / target).log() + (1 - pc) * ((1 - pc) / (1 - target)).log()
            kl_tp = target * (target / pc).log() + (1 - target) * ((1 - target) / (1 - pc)).log()
            losses.append((0.5 * (kl_pt + kl_tp)).mean())
    return torch.stack(losses).mean() if losses else logits[0].new_zeros(())


class MultiscaleTrainer(Trainer):
    def member_specs(self, cfg) -> list[MemberSpec]:
        scales = tuple(sorted(cfg.scales))
        if len(scales) < 2:
            raise ValueError(f"--trainer multiscale needs at least two --scales, got {','.join(map(str, scales))}")
        if cfg.arch.startswith("vit"):
            raise ValueError("ViTs take one fixed input size: use --trainer ensemble with one ViT member per scale")
        return [MemberSpec(cfg.arch, scales, cfg.seed)]

    def active_scales(self, cfg, epoch: int) -> tuple[int, ...]:
        scales = tuple(sorted(cfg.scales))
        if cfg.schedule == "progressive":
            return (scales[min(epoch // max(1, cfg.progressive_epochs), len(scales) - 1)],)
        return scales

    def extra_loss(self, cfg, scales: tuple[int, ...]):
        """``--consistency kl|mse`` between the scales training in a step, weighted by ``--consistency-weight``."""
        if cfg.consistency == "none" or len(scales) < 2:
            return None
        return lambda logits, k, labels: cfg.consistency_weight * consistency_loss(logits, cfg.consistency)


TRAINER = MultiscaleTrainer()
