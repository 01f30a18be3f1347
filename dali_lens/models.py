"""Model zoo for lens finders: every model maps ``(B, in_chans, H, W)`` images to ``(B,)`` lens logits.

``build_model(arch, in_chans, num_classes=1, img_size=64, weights=None)`` returns a ``torch.nn.Module``
whose ``model(x)`` is a float tensor of shape ``(B,)`` -- one logit for "lens" per sample (apply
``torch.sigmoid`` for the probability; train with ``BCEWithLogitsLoss``).  With ``num_classes > 1`` the
output is ``(B, num_classes)`` instead.

Architectures (``ARCHS``)
-------------------------
``small_cnn``
    Compact VGG-style CNN for CPU training at 32-128 px: four blocks (32, 64, 128, 128 channels) of
    2 x (3x3 conv, BatchNorm, ReLU) + 2x2 max-pool, then global average pooling, dropout and a linear head.
    Fully convolutional: any input size >= 32 works (``img_size`` is not used).
``resnet18``, ``resnet34``
    torchvision ResNets built with random weights (nothing is ever downloaded), first conv taking
    ``in_chans`` bands.  ``small_input=True`` replaces the 7x7 stride-2 stem and its max-pool with a 3x3
    stride-1 conv and no pool (as for CIFAR-sized images), so a 64 px cutout ends as an 8x8 feature map
    instead of 2x2.  Default: ``small_input = img_size <= 96``.  Any input size works.  The small stem
    keeps 16x the pixels through every block: 15x the forward FLOPs at 96 px (``benchmarks/bench_stem.py``).
    ``stem="imagenet"|"small"`` (``--stem``) overrides the default.
``vit_tiny``
    torchvision ``VisionTransformer`` with hidden 192, 6 layers, 3 heads, MLP 768 (a light ViT for CPU
    tests and small data).  Patch 8 for ``img_size <= 128``, else 16.
``vit_b_16``
    torchvision ViT-B/16 (hidden 768, 12 layers, 12 heads, MLP 3072) at ``image_size=img_size``.
ViTs only accept inputs of exactly ``img_size`` x ``img_size``, a multiple of the patch size.

Weights
-------
``weights=PATH`` loads a local file saved with ``torch.save``: a plain state dict, or a dict holding it
under ``'model'``, ``'state_dict'`` or ``'model_state_dict'`` (``module.`` / ``_orig_mod.`` prefixes from
DataParallel / ``torch.compile`` are stripped). The file is read with ``weights_only=True`` and nothing else:
a file holding any object besides tensors and plain data (a pickled module, an ``argparse.Namespace``...) is
refused with a ``ValueError`` naming it, and nothing in it runs; save ``model.state_dict()`` instead.
Differences are reconciled by ``load_weights``:

* first conv with another band count: adapted by ``adapt_input_conv`` (average the source kernels over
  their input channels and repeat for ``in_chans``, rescaled so identical bands give the same activation);
* first conv with another kernel (ImageNet 7x7 stem vs the ``small_input`` 3x3 stem): left at its random
  init, with a warning;
* ViT position embeddings for another ``img_size``: bicubic resize of the patch grid;
* classifier head of another shape (e.g. 1000 ImageNet classes): skipped, with a warning naming the keys;
* any other shape mismatch: ``ValueError`` (wrong architecture).

Only long-standing torch / torchvision APIs are used (``ResNet``, ``BasicBlock``, ``VisionTransformer``
classes), so torch >= 2.4 / torchvision >= 0.19 work.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from .choices import STEMS
from .data.io import load_torch_plain

__all__ = ["ARCHS", "build_model", "load_weights", "adapt_input_conv", "SmallCNN"]

ARCHS: tuple[str, ...] = ("small_cnn", "resnet18", "resnet34", "vit_tiny", "vit_b_16")


def small_stem(arch: str, img_size: int, stem: str = "auto") -> bool | None:
    """Whether ``arch`` at ``img_size`` gets the small-input stem under ``stem``; None for non-ResNets."""
    if arch not in ("resnet18", "resnet34"):
        return None
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
    return img_size <= 96 if stem == "auto" else stem == "small"

_VIT_CONFIGS = {
    # name: (num_layers, num_heads, hidden_dim, mlp_dim)
    "vit_tiny": (6, 3, 192, 768),
    "vit_b_16": (12, 12, 768, 3072),
}


def _finish(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return y.squeeze(-1) if num_classes == 1 else y


# --------------------------------------------------------------------------------------------------------
# architectures


class SmallCNN(nn.Module):
    """Four conv blocks (16-32-64-128), global average pool, dropout, linear head (~0.3M parameters).

    Sized to train quickly on a CPU at 64 px: about 53M multiply-adds per 64 px cutout.
    """

    stem_key = "features.0.0.weight"
    head_prefix = "fc."

    def __init__(self, in_chans: int, num_classes: int = 1, widths=(16, 32, 64, 128), dropout: float = 0.0):
        super().__init__()
        blocks = []
        prev = in_chans
        for w in widths:
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(prev, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(w, w, 3, padding=1, bias=False),
                    nn.BatchNorm2d(w),
                    nn.ReLU(inplace=True),
                    nn.MaxPool2d(2),
                )
            )
            prev = w
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(prev, num_classes)
        self.num_classes = num_classes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return _finish(self.fc(self.dropout(x)), self.num_classes)


class _LensResNet(ResNet):
    """torchvision ResNet (same state-dict keys) with an ``in_chans`` stem, dropout and a (B,) output."""

    stem_key = "conv1.weight"
    head_prefix = "fc."

    def __init__(self, layers, in_chans: int, num_classes: int, small_input: bool, dropout: float):
        super().__init__(BasicBlock, layers, num_classes=num_classes)
        if small_input:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.dropout = nn.Dropout(dropout)
        self.num_classes = num_classes
        self.small_input = small_input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return _finish(self.fc(self.dropout(x)), self.num_classes)


class _LensViT(VisionTransformer):
    """torchvision VisionTransformer (same state-dict keys) with an ``in_chans`` patch embedding."""

    stem_key = "conv_proj.weight"
    head_prefix = "heads."

    def __init__(self, in_chans: int, num_classes: int, img_size: int, patch: int, cfg, dropout: float):
        num_layers, num_heads, hidden, mlp = cfg
        super().__init__(
            image_size=img_size,
            patch_size=patch,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden,
            mlp_dim=mlp,
            dropout=dropout,
            num_classes=num_classes,
        )
        self.conv_proj = nn.Conv2d(in_chans, hidden, kernel_size=patch, stride=patch)
        fan_in = in_chans * patch * patch
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _finish(super().forward(x), self.num_classes)


# --------------------------------------------------------------------------------------------------------
# factory


def build_model(
    arch: str,
    in_chans: int,
    num_classes: int = 1,
    img_size: int = 64,
    weights: str | os.PathLike | None = None,
    *,
    small_input: bool | None = None,
    stem: str = "auto",
    dropout: float = 0.0,
) -> nn.Module:
    """Build a lens finder; ``model(x)`` with ``x`` of shape ``(B, in_chans, H, W)`` returns ``(B,)`` logits.

    ``num_classes > 1`` gives ``(B, num_classes)``.  ``img_size``: the training cutout size (ViTs need
    exactly this input size, a multiple of their patch; ResNets use it for the ``small_input`` default).
    ``small_input`` (ResNets only): 3x3 stride-1 stem without max-pool; default from ``stem`` (``auto``:
    ``img_size <= 96``; ``imagenet``; ``small``), see :func:`small_stem`.
    ``dropout``: before the linear head (CNNs) or inside the encoder (ViTs).
    ``weights``: local checkpoint path, see ``load_weights``.

    The returned module carries ``arch``, ``in_chans``, ``num_classes`` and ``img_size`` attributes.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    for name, value in (("in_chans", in_chans), ("num_classes", num_classes), ("img_size", img_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")

    if arch == "small_cnn":
        model: nn.Module = SmallCNN(in_chans, num_classes, dropout=dropout)
    elif arch in ("resnet18", "resnet34"):
        layers = [2, 2, 2, 2] if arch == "resnet18" else [3, 4, 6, 3]
        if small_input is None:
            small_input = small_stem(arch, img_size, stem)
        model = _LensResNet(layers, in_chans, num_classes, bool(small_input), dropout)
    else:
        patch = 16 if arch == "vit_b_16" else (8 if img_size <= 128 else 16)
        if img_size % patch:
            raise ValueError(
                f"{arch} needs img_size to be a multiple of its patch size {patch}, got {img_size} "
                f"(e.g. {max(patch, img_size // patch * patch)} or {(img_size // patch + 1) * patch})"
            )
        model = _LensViT(in_chans, num_classes, img_size, patch, _VIT_CONFIGS[arch], dropout)

    model.arch = arch
    model.in_chans = in_chans
    model.img_size = img_size
    if weights is not None:
        load_weights(model, weights)
    return model


# --------------------------------------------------------------------------------------------------------
# weights


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a first-layer conv kernel ``(O, I, kh, kw)`` to ``in_chans`` input channels.

    Averages the kernel over its ``I`` input channels (e.g. RGB) and repeats it for every new channel,
    scaled by ``I / in_chans``: each new kernel is ``weight.sum(1) / in_chans``, so an image whose bands
    are all equal produces exactly the activation the original gave for equal RGB channels.
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a conv kernel (O, I, kh, kw), got shape {tuple(weight.shape)}")
    if weight.shape[1] == in_chans:
        return weight.clone()
    summed = weight.float().sum(dim=1, keepdim=True) / in_chans
    return summed.repeat(1, in_chans, 1, 1).to(weight.dtype)


def _resize_pos_embedding(pe: torch.Tensor, seq_len: int) -> torch.Tensor | None:
    """(1, 1 + g^2, D) class token + square grid -> (1, seq_len, D); None if not square grids."""
    g_old = math.isqrt(pe.shape[1] - 1)
    g_new = math.isqrt(seq_len - 1)
    if g_old * g_old != pe.shape[1] - 1 or g_new * g_new != seq_len - 1:
        return None
    cls_tok, grid = pe[:, :1], pe[:, 1:]
    grid = grid.reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1).to(pe.dtype)
    return torch.cat([cls_tok, grid], dim=1)


def _read_state_dict(path: str | os.PathLike) -> "OrderedDict[str, torch.Tensor]":
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    obj = load_torch_plain(path)  # tensors and plain data only: a file holding anything else is refused, unrun
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a state dict (or a dict with 'model'/'state_dict'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict, non-tensor entries: {bad[:5]}")
    sd = OrderedDict((str(k), v) for k, v in obj.items())
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
    return sd


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load a local checkpoint into a model from ``build_model``, reconciling known differences.

    Returns ``{"loaded", "adapted", "skipped", "unexpected", "missing"}`` key lists; warns (UserWarning)
    when anything was adapted, skipped, unexpected or missing.  Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` when the file does not fit the architecture.
    """
    sd = _read_state_dict(path)
    target = model.state_dict()
    stem_key = getattr(model, "stem_key", None)
    head_prefix = getattr(model, "head_prefix", None)
    new: dict[str, torch.Tensor] = {}
    adapted, skipped, unexpected, mismatched = [], [], [], []
    for k, v in sd.items():
        if k not in target:
            unexpected.append(k)
            continue
        t = target[k]
        if v.shape == t.shape:
            new[k] = v
        elif k == stem_key and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
            new[k] = adapt_input_conv(v, t.shape[1])
            adapted.append(f"{k} ({v.shape[1]} -> {t.shape[1]} bands)")
        elif k == stem_key:
            skipped.append(f"{k} {tuple(v.shape)} vs {tuple(t.shape)}: kept random init (other stem; "
                           "for ResNets try small_input=False)")
        elif head_prefix and k.startswith(head_prefix):
            skipped.append(f"{k} {tuple(v.shape)} vs {tuple(t.shape)}")
        elif k == "encoder.pos_embedding" and v.ndim == 3 and v.shape[2] == t.shape[2]:
            resized = _resize_pos_embedding(v, t.shape[1])
            if resized is None:
                mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(t.shape)}")
            else:
                new[k] = resized
                adapted.append(f"{k} ({v.shape[1]} -> {t.shape[1]} tokens)")
        else:
            mismatched.append(f"{k} {tuple(v.shape)} vs {tuple(t.shape)}")
    arch = getattr(model, "arch", type(model).__name__)
    if mismatched:
        raise ValueError(f"{os.fspath(path)} does not fit {arch}: shape mismatches {_short(mismatched)}")
    body = [k for k in target if not (head_prefix and k.startswith(head_prefix))]
    n_body = sum(1 for k in body if k in new)
    if 2 * n_body < len(body):
        raise ValueError(
            f"{os.fspath(path)} does not fit {arch}: only {n_body} of its {len(body)} non-head tensors "
            f"have a matching name (file keys: {_short(list(sd), 5)})"
        )
    handled = {s.split(" ")[0] for s in skipped}
    missing = [k for k in target if k not in new and k not in handled]
    merged = OrderedDict(target)
    merged.update(new)
    model.load_state_dict(merged, strict=True)
    notes = []
    if adapted:
        notes.append(f"adapted: {_short(adapted)}")
    if skipped:
        notes.append(f"skipped (shape mismatch, left at init): {_short(skipped)}")
    if unexpected:
        notes.append(f"unexpected keys ignored: {_short(unexpected)}")
    if missing:
        notes.append(f"missing from the file (left at init): {_short(missing)}")
    if notes:
        warnings.warn(f"loading {os.fspath(path)} into {arch}: " + "; ".join(notes), stacklevel=2)
    return {
        "loaded": sorted(new),
        "adapted": adapted,
        "skipped": skipped,
        "unexpected": unexpected,
        "missing": missing,
    }
