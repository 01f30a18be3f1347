"""Ensemble trainer: members differing in architecture, input scale or seed, trained side by side.

One loader decodes each image once and produces every member's scale; each member has its own optimizer.
Fusion at evaluation: mean probability, mean logit, or temperature-scaled logits (fitted on validation, after
training: :meth:`EnsembleTrainer.after_fit`).
"""
from __future__ import annotations

from .base import Trainer
from ..checkpoint import MemberSpec


class EnsembleTrainer(Trainer):
    def member_specs(self, cfg) -> list[MemberSpec]:
        specs = list(cfg.members)  # MemberSpecs, read once by TrainConfig
        names = [s.name for s in specs]
        if len(specs) < 2:
            raise ValueError(f"--trainer ensemble needs at least two --members, got {', '.join(names) or 'none'}")
        if len(set(names)) != len(names):
            raise ValueError(f"ensemble members must differ (architecture, scale or seed): {names}")
        return specs

    def after_fit(self, cfg, members, val_loader, device, say):
        """``--fusion temperature``: each member's temperature, fitted on the validation split and set on it."""
        if cfg.fusion != "temperature" or val_loader is None:
            return None
        return fit_temperatures(members, val_loader, cfg, device, say)

    def run_name(self, cfg) -> str:
        return f"{cfg.trainer}-ensemble"


def fit_temperatures(members, val_loader, cfg, device, say) -> dict:
    """Each member's temperature, fitted on ``val_loader`` and set on it; returns ``{member: temperature}``."""
    from ..metrics import fit_temperature
    from .loop import predict

    _, y, logits = predict(members, val_loader, cfg, device, desc="calibrate", show_progress=False)
    temperatures = {k: float(fit_temperature(z, y)) for k, z in logits.items()}
    for m in members:
        m.temperature = temperatures[m.spec.name]
    say("fitted temperatures: " + ", ".join(f"{k} {v:.3f}" for k, v in temperatures.items()))
    return temperatures


TRAINER = EnsembleTrainer()
