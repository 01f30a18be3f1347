"""Model zoo for lens finders: every model maps ``(B, in_chans, H, W)`` images to ``(B,)`` lens logits.

``build_model(arch, in_chans, num_classes=1, img_size=64, weights=None)`` returns a ``torch.nn.Module``
whose ``model(x)`` is a float tensor of shape ``(B,)`` -- one logit for "lens" per sample (apply
``torch.sigmoid`` for the probability; train with ``BCEWithLogitsLoss``).  With ``num_classes > 1`` the
output is ``(B, num_classes)`` instead.

Architectures
-------------
``small_cnn``
    Ours: a compact VGG-style CNN for CPU training at 32-128 px: four blocks (16, 32, 64, 128 channels) of
    2 x (3x3 conv, BatchNorm, ReLU) + 2x2 max-pool, then global average pooling, dropout and a linear head.
    Fully convolutional: any input size >= 16 works (``img_size`` is not used).
any timm model name (``timm.list_models()``: ``efficientnet_b0``, ``convnext_nano``, ``resnet18``, ``vit_tiny_patch16_224``...)
    ``timm.create_model(name, pretrained=False, in_chans=..., num_classes=..., drop_rate=dropout)``, with
    ``img_size=`` for the models that take it (ViTs, Swin...: they then need inputs of exactly that size).
    Random weights: nothing is ever downloaded (``weights=`` loads a local file).  ``resnet18`` and
    ``resnet34`` are timm's ResNets, whose state-dict keys are torchvision's (runs made before timm load), with
    ``small_input=True`` (``--stem``) replacing the 7x7 stride-2 stem and its max-pool by a 3x3 stride-1 conv
    (a 64 px cutout ends as an 8x8 feature map instead of 2x2; 15x the forward FLOPs at 96 px,
    ``benchmarks/bench_stem.py``). Default: ``small_input = img_size <= 96``.
``vit_tiny``, ``vit_b_16``
    torchvision ViTs (hidden 192, 6 layers, 3 heads, patch 8 for ``img_size <= 128`` else 16; ViT-B/16), kept
    so that runs made with them load and score as before. New runs: timm's ``vit_tiny_patch16_224``,
    ``vit_base_patch16_224``... at any ``img_size``.

Weights
-------
``read_weights(path)`` reads tensors only, never code: a ``.safetensors`` file (safetensors), or a
``torch.save`` file read with ``weights_only=True`` (``data.io.load_torch_plain``: a file holding any other
object is refused naming it, with no fallback): a timm or torchvision state dict, a dict holding it under
``'state_dict'`` (Lightning, Zoobot), ``'model'`` or ``'model_state_dict'``, or a dali-lens checkpoint
(``best.pt``/``last.pt``, or the run directory: its members' weights).  ``load_weights(model, source)`` finds
the model's tensors under the file's prefix (Lightning's ``model.``/``encoder.``, Zoobot's ``encoder.``:
the prefix under which most names match; ``module.``/``_orig_mod.`` go by ``timm.models.clean_state_dict``)
and reconciles, with timm's functions:

* a first conv with another band count: ``timm.models.adapt_input_conv`` (from 3-band RGB or 1-band kernels;
  a kernel of another shape, e.g. the 7x7 ImageNet stem into the small stem, stays at its random init, with
  a warning);
* absolute position embeddings for another grid: ``timm.layers.resample_abs_pos_embed``;
* a classifier head of another shape (``pretrained_cfg['classifier']``; e.g. 1000 ImageNet classes, as
  ``timm``'s own loader drops it): skipped, with a warning; a head missing from the file (Zoobot's encoders
  have none) stays at init;
* any other shape mismatch, or fewer than half the model's tensors found: ``ValueError`` (wrong
  architecture).

Parts (for fine-tuning, ``trainers.members``): ``head_names(model)`` (the classifier's parameters) and
``block_groups(model)`` (the encoder's parameter names in timm's coarse ``group_matcher`` groups, input to
output: ResNet/EfficientNet/ConvNeXt stages, ViT blocks; small_cnn's four conv blocks).
"""

from __future__ import annotations

import difflib
import math
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from .choices import STEMS
from .data.io import load_torch_plain

__all__ = ["ARCHS", "build_model", "check_arch", "read_weights", "load_weights", "Weights", "head_names",
           "block_groups", "SmallCNN"]

#: the names dali-lens has always had (``--arch`` also takes any timm model name)
ARCHS: tuple[str, ...] = ("small_cnn", "resnet18", "resnet34", "vit_tiny", "vit_b_16")
_STEM_RESNETS = ("resnet18", "resnet34")
_LEGACY_VITS = {  # name: (num_layers, num_heads, hidden_dim, mlp_dim)
    "vit_tiny": (6, 3, 192, 768),
    "vit_b_16": (12, 12, 768, 3072),
}


def small_stem(arch: str, img_size: int, stem: str = "auto") -> bool | None:
    """Whether ``arch`` at ``img_size`` gets the small-input stem under ``stem``; None for other models."""
    if arch not in _STEM_RESNETS:
        return None
    if stem not in STEMS:
        raise ValueError(f"unknown stem {stem!r}; valid: {', '.join(STEMS)}")
    return img_size <= 96 if stem == "auto" else stem == "small"


def check_arch(arch) -> None:
    """ValueError (one line, naming the options and the closest timm names) unless ``arch`` is ours or timm's."""
    if arch in ARCHS:
        return
    import timm

    if isinstance(arch, str) and timm.is_model(arch):
        return
    text = str(arch)
    names = timm.list_models()
    close = difflib.get_close_matches(text, names, n=5, cutoff=0.6)
    close += [n for n in timm.list_models(f"*{text}*")[:5] if n not in close]
    raise ValueError(f"unknown architecture {text!r} (--arch / --members): not small_cnn, vit_tiny, vit_b_16 or a "
                     f"timm model name" + (f"; close timm names: {', '.join(close[:6])}" if close else "")
                     + f" (timm.list_models('*{text}*') lists more)")


def _finish(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    return y.squeeze(-1) if num_classes == 1 else y


def _one_logit(module, args, output):  # forward hook of timm models: (B, 1) -> (B,)
    return output.squeeze(-1)


# --------------------------------------------------------------------------------------------------------
# architectures


class SmallCNN(nn.Module):
    """Four conv blocks (16-32-64-128), global average pool, dropout, linear head (~0.3M parameters).

    Sized to train quickly on a CPU at 64 px: about 53M multiply-adds per 64 px cutout. Its blocks (timm's
    ``group_matcher``) are the four conv blocks; its head (``get_classifier``) is ``fc``.
    """

    pretrained_cfg = {"first_conv": "features.0.0", "classifier": "fc"}

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

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"blocks": r"^features\.(\d+)\."}

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return _finish(self.fc(self.dropout(x)), self.num_classes)


class _LensViT(VisionTransformer):
    """torchvision VisionTransformer (same state-dict keys) with an ``in_chans`` patch embedding."""

    pretrained_cfg = {"first_conv": "conv_proj", "classifier": "heads"}
    num_prefix_tokens = 1

    def __init__(self, in_chans: int, num_classes: int, img_size: int, patch: int, cfg, dropout: float):
        num_layers, num_heads, hidden, mlp = cfg
        super().__init__(image_size=img_size, patch_size=patch, num_layers=num_layers, num_heads=num_heads,
                         hidden_dim=hidden, mlp_dim=mlp, dropout=dropout, num_classes=num_classes)
        self.conv_proj = nn.Conv2d(in_chans, hidden, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / (in_chans * patch * patch)))
        nn.init.zeros_(self.conv_proj.bias)
        self.num_classes = num_classes

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^conv_proj|^class_token|^encoder\.pos_embedding",
                "blocks": [(r"^encoder\.layers\.encoder_layer_(\d+)\.", None), (r"^encoder\.ln\.", (99999,))]}

    def get_classifier(self) -> nn.Module:
        return self.heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _finish(super().forward(x), self.num_classes)


def _timm_model(arch: str, in_chans: int, num_classes: int, img_size: int, dropout: float) -> nn.Module:
    import timm

    kw = dict(pretrained=False, in_chans=in_chans, num_classes=num_classes, drop_rate=dropout)
    try:
        try:
            model = timm.create_model(arch, img_size=img_size, **kw)
        except TypeError as exc:  # a model without an input size (CNNs)
            if "img_size" not in str(exc):
                raise
            model = timm.create_model(arch, **kw)
    except (TypeError, ValueError, AssertionError, RuntimeError, NotImplementedError) as exc:
        raise ValueError(f"{arch}: timm cannot build it for {in_chans} bands at {img_size} px "
                         f"({str(exc).strip()[:200]})") from None
    if num_classes == 1:
        model.register_forward_hook(_one_logit)
    return model


# --------------------------------------------------------------------------------------------------------
# factory


def build_model(
    arch: str,
    in_chans: int,
    num_classes: int = 1,
    img_size: int = 64,
    weights=None,
    *,
    small_input: bool | None = None,
    stem: str = "auto",
    dropout: float = 0.0,
) -> nn.Module:
    """Build a lens finder; ``model(x)`` with ``x`` of shape ``(B, in_chans, H, W)`` returns ``(B,)`` logits.

    ``arch``: ``small_cnn``, ``vit_tiny``, ``vit_b_16`` or any timm model name. ``num_classes > 1`` gives
    ``(B, num_classes)``.  ``img_size``: the training cutout size (ViTs need exactly this input size; the
    ResNets ``resnet18``/``resnet34`` use it for the ``small_input`` default). ``small_input`` (those ResNets):
    3x3 stride-1 stem without max-pool; default from ``stem`` (``auto``: ``img_size <= 96``; ``imagenet``;
    ``small``), see :func:`small_stem`.  ``dropout``: before the head (timm's ``drop_rate``; inside the
    encoder for the torchvision ViTs).  ``weights``: a local file or run, see :func:`load_weights`.

    The returned module carries ``arch``, ``in_chans``, ``num_classes`` and ``img_size`` attributes.
    """
    for name, value in (("in_chans", in_chans), ("num_classes", num_classes), ("img_size", img_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    check_arch(arch)

    if arch == "small_cnn":
        model: nn.Module = SmallCNN(in_chans, num_classes, dropout=dropout)
    elif arch in _LEGACY_VITS:
        patch = 16 if arch == "vit_b_16" else (8 if img_size <= 128 else 16)
        if img_size % patch:
            raise ValueError(
                f"{arch} needs img_size to be a multiple of its patch size {patch}, got {img_size} "
                f"(e.g. {max(patch, img_size // patch * patch)} or {(img_size // patch + 1) * patch})"
            )
        model = _LensViT(in_chans, num_classes, img_size, patch, _LEGACY_VITS[arch], dropout)
    else:
        model = _timm_model(arch, in_chans, num_classes, img_size, dropout)
        if arch in _STEM_RESNETS:
            small = small_stem(arch, img_size, stem) if small_input is None else bool(small_input)
            if small:
                model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
                nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
                model.maxpool = nn.Identity()
            model.small_input = small

    model.arch = arch
    model.in_chans = in_chans
    model.img_size = img_size
    model.num_classes = num_classes
    if weights is not None:
        load_weights(model, weights)
    return model


# --------------------------------------------------------------------------------------------------------
# parts: the head and the encoder's blocks


def head_names(model: nn.Module) -> set[str]:
    """The names of the classifier head's parameters (``get_classifier()``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    ids = {id(p) for p in head.parameters()} if isinstance(head, nn.Module) else set()
    return {n for n, p in model.named_parameters() if id(p) in ids}


def block_groups(model: nn.Module) -> list[list[str]]:
    """The encoder's parameter names (the head's excluded) in timm's coarse ``group_matcher`` groups, from
    the input to the output; ValueError for a model without a ``group_matcher``."""
    from timm.models import group_parameters

    if not hasattr(model, "group_matcher"):
        raise ValueError(f"{getattr(model, 'arch', type(model).__name__)} has no group_matcher: its blocks are not "
                         "known (--trainable-blocks)")
    head = head_names(model)
    layer_of = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    groups: dict[int, list[str]] = {}
    for name, _ in model.named_parameters():
        if name not in head:
            groups.setdefault(layer_of.get(name, 1 << 30), []).append(name)
    return [groups[k] for k in sorted(groups)]


# --------------------------------------------------------------------------------------------------------
# weights


@dataclass(frozen=True)
class Weights:
    """What a ``--weights`` source holds: ``states`` by member name (``""`` for a plain state dict) and, for a
    dali-lens run, each member's ``archs``."""

    path: str
    states: dict
    archs: dict

    def state_for(self, name: str = "", arch: str | None = None) -> "OrderedDict[str, torch.Tensor]":
        """The state dict for a member ``name`` of ``arch``: the only one, the member of that name, or the only
        member of that arch; ValueError naming the members otherwise."""
        if len(self.states) == 1:
            return next(iter(self.states.values()))
        if name in self.states:
            return self.states[name]
        same = [n for n, a in self.archs.items() if a == arch]
        if len(same) == 1:
            return self.states[same[0]]
        raise ValueError(f"{self.path}: a run of {len(self.states)} members ({', '.join(self.states)}): none is "
                         f"named {name!r} and {len(same)} are {arch}; give one member's run or weights")


def _state_dict_in(obj, path: str) -> "OrderedDict[str, torch.Tensor]":
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict") if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: expected a state dict (or a dict with 'state_dict'/'model'), got "
                         f"{type(obj).__name__}")
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{path}: not a state dict, non-tensor entries: {bad[:5]}")
    from timm.models import clean_state_dict

    return OrderedDict(clean_state_dict({str(k): v for k, v in obj.items()}))


def read_weights(path: str | os.PathLike) -> Weights:
    """Read a ``--weights`` source (tensors only: safetensors or ``weights_only``; see the module's docstring):
    FileNotFoundError / ValueError naming it when it is missing, unreadable or holds anything else."""
    path = os.fspath(path)
    if os.path.isdir(path):
        found = [os.path.join(path, n) for n in ("best.pt", "last.pt") if os.path.isfile(os.path.join(path, n))]
        if not found:
            raise FileNotFoundError(f"weights: {path} is a folder without best.pt or last.pt (not a dali-lens run)")
        path = found[0]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj = load_file(path)
        except Exception as exc:  # safetensors' own errors: a header or size that does not parse
            raise ValueError(f"{path}: not a readable safetensors file ({str(exc).strip()[:200]})") from None
    else:
        obj = load_torch_plain(path)  # tensors and plain data only: a file holding anything else is refused, unrun
    if isinstance(obj, Mapping) and isinstance(obj.get("members"), list):  # a dali-lens checkpoint
        from .checkpoint import Checkpoint

        ck = Checkpoint.from_dict(obj, path)
        return Weights(path, {m.spec.name: OrderedDict(m.model) for m in ck.members},
                       {m.spec.name: m.spec.arch for m in ck.members})
    return Weights(path, {"": _state_dict_in(obj, path)}, {})


def _short(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def _under_prefix(sd: Mapping, target: Mapping) -> tuple[str, "OrderedDict[str, torch.Tensor]"]:
    """The prefix (``""``, ``encoder.``, ``model.``...: up to three dotted levels) under which most of ``sd``'s
    names are ``target``'s, and the tensors under it with the prefix taken off."""
    best, best_n = "", sum(1 for k in sd if k in target)
    prefixes = {".".join(k.split(".")[:i]) + "." for k in sd for i in range(1, min(4, k.count(".") + 1))}
    for p in sorted(prefixes):
        n = sum(1 for k in sd if k.startswith(p) and k[len(p):] in target)
        if n > best_n:
            best, best_n = p, n
    return best, OrderedDict((k[len(best):], v) for k, v in sd.items() if k.startswith(best))


def load_weights(model: nn.Module, source, member=None) -> dict[str, list[str]]:
    """Load a local file, run or :class:`Weights` (``source``) into a model from ``build_model``, reconciling
    known differences (see the module's docstring). ``member``: the ``MemberSpec`` whose weights to take from a
    run of several.

    Returns ``{"loaded", "adapted", "skipped", "unexpected", "missing", "prefix"}``; warns (UserWarning) when
    anything was adapted, skipped, unexpected or missing.  Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` when the file does not fit the architecture.
    """
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    src = source if isinstance(source, Weights) else read_weights(source)
    path = src.path
    target = model.state_dict()
    raw = src.state_for(getattr(member, "name", ""), getattr(member, "arch", None))
    prefix, sd = _under_prefix(raw, target)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    first = cfg.get("first_conv")
    stem_key = (first[0] if isinstance(first, (list, tuple)) else first or "") + ".weight"
    heads = cfg.get("classifier") or ()
    heads = tuple(h + "." for h in ((heads,) if isinstance(heads, str) else heads))
    prefix_tokens = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    new: dict[str, torch.Tensor] = {}
    adapted, skipped, unexpected, mismatched = [], [], [], []
    for k, v in sd.items():
        if k not in target:
            unexpected.append(k)
            continue
        t = target[k]
        shapes = f"{k} {tuple(v.shape)} vs {tuple(t.shape)}"
        if v.shape == t.shape:
            new[k] = v
        elif k == stem_key and v.ndim == 4 and v.shape[0] == t.shape[0] and v.shape[2:] == t.shape[2:]:
            try:
                new[k] = adapt_input_conv(t.shape[1], v)
                adapted.append(f"{k} ({v.shape[1]} -> {t.shape[1]} bands)")
            except NotImplementedError:  # timm adapts RGB (or one band) kernels only
                skipped.append(f"{shapes}: kept random init (timm adapts 3- or 1-band kernels to other band counts)")
        elif k == stem_key:
            skipped.append(f"{shapes}: kept random init (other stem; for ResNets try small_input=False)")
        elif k.startswith(heads):
            skipped.append(shapes)
        elif k.endswith(("pos_embed", "pos_embedding")) and v.ndim == t.ndim == 3 and v.shape[2] == t.shape[2]:
            grid = math.isqrt(t.shape[1] - prefix_tokens)
            try:
                if grid * grid != t.shape[1] - prefix_tokens:
                    raise ValueError("not a square grid")
                new[k] = resample_abs_pos_embed(v.float(), [grid, grid], num_prefix_tokens=prefix_tokens).to(v.dtype)
                adapted.append(f"{k} ({v.shape[1]} -> {t.shape[1]} tokens)")
            except (ValueError, RuntimeError):
                mismatched.append(shapes)
        else:
            mismatched.append(shapes)
    arch = getattr(model, "arch", type(model).__name__)
    if mismatched:
        raise ValueError(f"{path} does not fit {arch}: shape mismatches {_short(mismatched)}")
    body = [k for k in target if not k.startswith(heads)]
    n_body = sum(1 for k in body if k in new)
    if 2 * n_body < len(body):
        raise ValueError(
            f"{path} does not fit {arch}: only {n_body} of its {len(body)} non-head tensors have a matching "
            f"name (file keys: {_short(list(raw), 5)})"
        )
    handled = {s.split(" ")[0] for s in skipped}
    missing = [k for k in target if k not in new and k not in handled]
    merged = OrderedDict(target)
    merged.update(new)
    model.load_state_dict(merged, strict=True)
    outside = len(raw) - len(sd)
    notes = [f"the model's tensors found under {prefix!r}" + (f" ({outside} others ignored)" if outside else "")] \
        if prefix else []
    if adapted:
        notes.append(f"adapted: {_short(adapted)}")
    if skipped:
        notes.append(f"skipped (shape mismatch, left at init): {_short(skipped)}")
    if unexpected:
        notes.append(f"unexpected keys ignored: {_short(unexpected)}")
    if missing:
        notes.append(f"missing from the file (left at init): {_short(missing)}")
    if adapted or skipped or unexpected or missing:
        warnings.warn(f"loading {path} into {arch}: " + "; ".join(notes), stacklevel=2)
    return {"loaded": sorted(new), "adapted": adapted, "skipped": skipped, "unexpected": unexpected,
            "missing": missing, "prefix": prefix}
