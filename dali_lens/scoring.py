"""How models score a batch: member logits over scales and test-time augmentation, and the fused score.

One path for the trainer's validation and test passes (``trainers.loop.predict``) and for ``predict`` and
``evaluate`` (``inference.score_batches`` and ``Ensemble.probabilities``), so that a change to TTA, the
normalisation on the device or channels-last lands once:

* :func:`member_logits`: one model's logits for a contract batch, the mean over its scales and, for TTA
  batches ``(B, 8, C, s, s)``, over the 8 views;
* :func:`to_model`: one scale of a batch as the model takes it (uint8 batches normalised on the device, a
  member's own normalisation, channels-last on CUDA);
* :func:`pooled_layer`: the final linear classifier of any model (ours, timm's), whose input is the pooled
  feature vector ``member_logits(..., features=[])`` also returns (``predict --embeddings``);
* :func:`fuse` and :func:`probabilities`: member logits to the ensemble score (``mean_prob``, ``mean_logit``,
  ``temperature``), the member probabilities and their spread.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import torch

from .choices import FUSIONS
from .pipelines.options import finish


__all__ = ["FUSIONS", "amp_dtype", "autocast", "channels_last_on", "to_model", "member_logits", "pooled_layer",
           "sigmoid", "check_fusion", "fuse", "probabilities"]


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The mixed precision ``--amp`` ``mode`` (``choices.AMP_MODES``) means on ``device``: None (full precision)
    off the GPU or with ``off``; ``auto`` is bf16 where the GPU supports it, else fp16. The trainers
    (``TrainConfig.amp_dtype``) and inference (the checkpoint's ``amp``) both ask here."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision at ``dtype`` on ``device`` (None: full precision)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def channels_last_on(device: torch.device, wanted: bool) -> bool:
    """``--channels-last`` applies on the GPU only (on the CPU it is left out)."""
    return bool(wanted) and device.type == "cuda"


def to_model(x: torch.Tensor, device: torch.device, norm: tuple = (None, None), channels_last: bool = False,
             correction: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """One scale of a batch on ``device`` as the model takes it: normalised there if the loader left that to
    the model's device (uint8, ``norm`` = (mean, std)), mapped to a member's own normalisation by
    ``correction`` = (scale, shift) per band, and channels-last on CUDA if ``channels_last``."""
    x = finish(x.to(device, non_blocking=True), *norm)
    if correction is not None:
        x = x.float() * correction[0] + correction[1]
    if channels_last_on(device, channels_last) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def pooled_layer(model: torch.nn.Module) -> torch.nn.Linear:
    """The final linear classifier of ``model``, whose input is its pooled feature vector: what timm's
    ``get_classifier()`` returns (on the model or any submodule, e.g. a wrapper's timm body), else the last
    ``Linear`` under the model's ``head_prefix`` (``models.py``: ``fc.``, ``heads.``), else the last ``Linear``
    registered. ValueError when the model has none."""
    def last_linear(module):
        return next((m for m in reversed(list(module.modules())) if isinstance(m, torch.nn.Linear)), None)

    for m in model.modules():
        get = getattr(m, "get_classifier", None)
        head = get() if callable(get) else None
        found = last_linear(head) if isinstance(head, torch.nn.Module) else None
        if found is not None:
            return found
    prefix = str(getattr(model, "head_prefix", "") or "").rstrip(".")
    found = last_linear(model.get_submodule(prefix)) if prefix else None
    found = found or last_linear(model)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier whose input could be its embedding")
    return found


def member_logits(model: torch.nn.Module, images: dict[int, torch.Tensor], scales, device: torch.device, *,
                  amp: torch.dtype | None = None, norm: tuple = (None, None), channels_last: bool = False,
                  correction=None, chunks: Callable[[int, torch.Tensor], list[slice]] | None = None,
                  features: list | None = None) -> torch.Tensor:
    """Logits ``(B,)`` of ``model`` for a contract batch's ``images`` ({scale: tensor}): the mean over
    ``scales`` and, for TTA batches ``(B, 8, C, s, s)``, over the 8 views. ``chunks(scale, x)`` cuts a scale's
    batch into the slices one forward pass may take (a memory bound); default: all at once. ``features``: a
    list that receives the pooled feature vectors ``(B, D)`` float32 (the input of :func:`pooled_layer`),
    averaged like the logits over the scales and the 8 TTA views."""
    captured: list[torch.Tensor] = []
    hook = None
    if features is not None:
        hook = pooled_layer(model).register_forward_pre_hook(
            lambda _m, inp: captured.append(inp[0].detach().float().reshape(inp[0].shape[0], -1)))
    per_scale, per_scale_f = [], []
    try:
        for s in scales:
            x = images[s]
            tta = x.dim() == 5
            if tta:
                b, k = x.shape[:2]
                x = x.reshape(b * k, *x.shape[2:])
            parts = chunks(s, x) if chunks is not None else [slice(None)]
            captured.clear()
            with autocast(device, amp):
                z = torch.cat([model(to_model(x[c], device, norm, channels_last, correction)).float().reshape(-1)
                               for c in parts])
            f = torch.cat(captured) if hook is not None else None
            if tta:
                z = z.reshape(b, k).mean(1)
                f = f.reshape(b, k, -1).mean(1) if f is not None else None
            per_scale.append(z)
            per_scale_f.append(f)
    finally:
        if hook is not None:
            hook.remove()
    if features is not None:
        features.append(torch.stack(per_scale_f).mean(0))
    return torch.stack(per_scale).mean(0)


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def check_fusion(how: str) -> None:
    """The one check of a fusion name: ValueError unless it is one of ``choices.FUSIONS``."""
    if how not in FUSIONS:
        raise ValueError(f"unknown fusion {how!r}: choose from {FUSIONS}")


def fuse(logits: dict[str, np.ndarray], how: str = "mean_prob", temperatures: dict[str, float] | None = None) -> np.ndarray:
    """Ensemble lens probability from member logits: ``mean_prob``, ``mean_logit`` or ``temperature``."""
    check_fusion(how)
    zs = np.stack(list(logits.values()))
    if how == "mean_logit":
        return sigmoid(zs.mean(0))
    if how == "temperature":
        t = np.array([(temperatures or {}).get(k, 1.0) for k in logits])[:, None]
        return sigmoid(zs / t).mean(0)
    return sigmoid(zs).mean(0)


def probabilities(logits: dict[str, np.ndarray], fusion: str = "mean_prob",
                  temperatures: dict[str, float] | None = None
                  ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
    """``(ensemble score, {member: probability}, member spread)`` from member logits.

    Member probabilities are ``sigmoid(z / T)`` with the member's temperature ``T`` (from ``temperatures``,
    default 1). The ensemble score is :func:`fuse`'s. The spread is the standard deviation of the member
    probabilities (0 for a single member).
    """
    temps = temperatures or {}
    logits = {k: np.asarray(z, dtype=np.float64) for k, z in logits.items()}
    probs = {k: sigmoid(z / temps.get(k, 1.0)) for k, z in logits.items()}
    score = fuse(logits, fusion, temps or None)
    spread = np.stack(list(probs.values())).std(0)
    return score, probs, spread
