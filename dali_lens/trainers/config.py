"""Every training knob, with its default and its help text (the CLI is generated from this).

The fields are typed (``scales`` a tuple of ints, ``members`` a tuple of ``MemberSpec``, ``hdus`` a tuple of
indices and names, ``batch_transforms`` a tuple of names). Each value is read by its field's ``type`` (a
``choices`` range type with a ``parse``): the command line's parser calls it on the text, and
``TrainConfig.__post_init__`` calls it on whatever came in (the typed value, or for compatibility the same text:
``TrainConfig(scales="64,112") == TrainConfig(scales=(64, 112))``), so there is one parse and one value.
:meth:`TrainConfig.to_dict` is strict JSON (tuples become lists, a member ``{"arch", "scales", "seed",
"name"}``); :meth:`TrainConfig.from_dict` reads that and the text form that config.json and checkpoints held
before (``"scales": "48,64,96"``), to the same config.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields

import torch

from ..choices import AT_N, FRACTION_OPEN
from ..metrics import DEFAULT_AT_N
from ..choices import (AMP_MODES, BACKENDS, CONSISTENCIES, COUNT, DTYPES, FUSIONS, HDUS, HOLD_OUT, LR_SCHEDULES,
                       NON_NEGATIVE, NON_NEGATIVE_NUMBER, NORMS, PIXELS, POSITIVE, PROBABILITY, RESIZE_MODES,
                       PIXELS, SCALE_SCHEDULES, SCALES, SCALINGS, SEED, STEMS, THREADS, LOADER_WORKERS, Parsed)
from ..choices import LAYER_DECAY  # (issue 24: fine-tuning)
from .base import TRAINERS
from ..data.labels import parse_data_roots, parse_label_files, parse_pos_weight, parse_source_weights
from ..checkpoint import MemberSpec
from ..injection import OPTIONS as _INJECTION_OPTIONS


def parse_mask_value(text) -> float | str | None:
    """``--mask-value``: a number, ``nan`` (mask NaN/inf only), ``none`` (no masking) or ``auto`` (the data
    layout's sentinel, if any). ``nan`` stays the string "nan": a float NaN would equal nothing (``--resume``
    would find the option changed) and is not JSON (config.json)."""
    if isinstance(text, float) and math.isnan(text):
        return "nan"
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    t = str(text).strip().lower()
    if t in ("none", "off", ""):
        return None
    if t in ("auto", "nan"):
        return t
    try:
        return float(t)
    except ValueError:
        raise ValueError(f"expected a number, nan, none or auto, got {text!r}") from None


MASK_VALUE = Parsed(parse_mask_value, "a number, nan, none or auto", ("x", "1e999x"))


def parse_members(value) -> tuple[MemberSpec, ...]:
    """``--members``: ``"ARCH:SCALE[:SEED],..."`` (``MemberSpec.parse``), or a sequence of ``MemberSpec``s, of
    such texts, or of config.json's ``{"arch", "scales", "seed"[, "name"]}``: a tuple of new ``MemberSpec``s
    (sizes >= 8 px, seeds in numpy's range); ValueError saying which member is wrong."""
    items = [t for t in str(value).split(",") if t.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"expected ARCH:SCALE[:SEED] members, got {type(value).__name__}")
    out = []
    for item in items:
        if isinstance(item, str):
            spec = MemberSpec.parse(item)
        elif isinstance(item, MemberSpec):
            spec = item
        elif isinstance(item, dict) and {"arch", "scales"} <= set(item) <= {"arch", "scales", "seed", "name"}:
            if not isinstance(item["scales"], (list, tuple)) or not isinstance(item.get("name", ""), str):
                raise ValueError(f"member {item!r}: scales must be a list and the name a string")
            spec = MemberSpec(item["arch"], tuple(item["scales"]), item.get("seed", 0), item.get("name", ""))
        else:
            raise ValueError(f"member {item!r}: expected ARCH:SCALE[:SEED]")
        if not isinstance(spec.arch, str) or not spec.arch.strip() or not spec.scales \
                or not all(PIXELS.contains(v) for v in spec.scales) or not SEED.contains(spec.seed):
            raise ValueError(f"member {spec.name}: needs an architecture, sizes >= 8 and a seed in [0, 2**32)")
        out.append(MemberSpec(spec.arch, spec.scales, int(spec.seed), spec.name))
    return tuple(out)


MEMBERS = Parsed(parse_members, "comma-separated ARCH:SCALE[:SEED] members, sizes >= 8",
                 ("x", "small_cnn:7:0", "small_cnn:48:-1", "small_cnn:48:0:1", "small_cnn:x"))


def parse_names(value) -> tuple[str, ...]:
    """``--batch-transforms``: ``"a,b"`` or a sequence of names, as ``("a", "b")`` (empty entries dropped; the
    names are checked against the registry when the loader is built)."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(t, str) for t in items):
        raise ValueError("expected comma-separated names")
    return tuple(t.strip() for t in items if t.strip())


NAMES = Parsed(parse_names, "comma-separated names", ())
POS_WEIGHT = Parsed(parse_pos_weight, "auto or a positive number", ("0", "-1", "x", "inf"))
SOURCE_WEIGHTS = Parsed(parse_source_weights, "comma-separated NAME=WEIGHT, weights >= 0", ("x", "a=-1", "a=x", "=1"))
LABEL_FILES = Parsed(parse_label_files, "file paths", ())
DATA_ROOTS = Parsed(parse_data_roots, "paths (PATH or NAME=PATH)", ())
SAMPLERS = ("shuffle", "balanced")
GRADE1 = ("drop", "weak")
LABEL_CONFLICTS = ("file", "data")
DEFAULT_MEMBERS = (MemberSpec("small_cnn", (48,), 0), MemberSpec("small_cnn", (64,), 1),
                   MemberSpec("resnet18", (64,), 2))

# --- issue 25: injection --- (the ranges are the injector's own: dali_lens.injection.OPTIONS)
INJECT_THETA_E, INJECT_SOURCE_RE, INJECT_SERSIC_N, INJECT_SNR, INJECT_FWHM, INJECT_COLOURS = (
    _INJECTION_OPTIONS[k][1] for k in ("theta_e", "source_re", "sersic_n", "snr", "psf_fwhm", "colours"))


def _f(default, help: str, **kw):
    meta = {"help": help, **kw}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    data_root: str | tuple[str, ...] | None = _f(
        None, "dataset root: class folders, CSV manifests (train.csv/val.csv/test.csv), FITS, .npy or the "
              "lens-finding-challenge layout; repeatable (or a comma list) to mix roots, each PATH or NAME=PATH, "
              "their splits concatenated. Default: the built-in synthetic set, generated once and cached",
        flag="--data-root", type=DATA_ROOTS, action="append")
    out: str | None = _f(None, "run directory for checkpoints, metrics.json, predictions.csv, roc.png "
                               "(default: runs/<trainer>-<arch>-<time>)")
    resume: bool = _f(False, "continue the run in --out from its last checkpoint (mid-epoch if saved mid-epoch); "
                             "with no checkpoint there yet, start from scratch in it")
    allow_config_change: bool = _f(False, "--resume with options that differ from the run's config.json (data, "
                                          "model, optimisation...); without it such a resume stops and lists "
                                          "them. --epochs, --patience, --workers, --backend and the like may "
                                          "always change")
    val_fraction: float = _f(0.15, "fraction of train held out (stratified, seeded) when there is no val split", type=HOLD_OUT)
    hdus: tuple[int | str, ...] | None = _f(None, "FITS: comma-separated HDU indices or EXTNAMEs, one per band "
                                                 "(default: all image HDUs)", type=HDUS)
    skip_bad: bool = _f(False, "scan the data first and skip unreadable/bad samples (listed), instead of stopping")
    # loading
    backend: str = _f("auto", "loader: auto (DALI GPU if CUDA+DALI; without CUDA DALI CPU, but torchvision for "
                              "FITS; torchvision without DALI), dali, dali-cpu, torchvision", choices=BACKENDS)
    workers: int | None = _f(None, "loader threads/workers; 0: torchvision loads in the training process, DALI "
                                   "uses 1 thread (default: all cores)", type=LOADER_WORKERS)
    dtype: str = _f("auto", "loader output: auto (uint8 for 8-bit images, normalised on the training device just "
                            "before each scale's forward pass, so one scale at a time is float; float32 for float "
                            "data or with --batch-transforms), float32, float16 or uint8",
                    choices=("auto",) + DTYPES)
    norm: str = _f("stats", "per-band normalisation: stats (mean/std of the training set) or none",
                   choices=NORMS)
    scaling: str = _f("auto", "float data (FITS/.npy) before normalisation: auto (arcsinh(x / noise) per band, the "
                              "noise estimated on the training set and stored in the checkpoint: any flux unit "
                              "works), none, asinh (arcsinh(a*x)), clip (+-a). 8-bit images are always /255",
                      choices=SCALINGS)
    scale_a: float = _f(1.0, "the 'a' of --scaling", type=POSITIVE)
    mask_value: float | str | None = _f("auto", "pixels with this value (and NaN/inf) are masked to 0: a number, "
                                               "nan (NaN/inf only), none, or auto (the layout's sentinel: 100 for the lens-finding "
                                               "challenge layout, none otherwise)", type=MASK_VALUE)
    mask_channel: bool = _f(False, "add a channel marking masked pixels (needs --mask-value)")
    resize_mode: str = _f("resize", "how cutouts reach each scale: resize (antialiased bilinear) or crop "
                                    "(centre crop / zero-pad, no resampling)", choices=RESIZE_MODES)
    max_shift: int = _f(2, "training augmentation: random shifts up to this many pixels (0 = off); "
                           "random 90-degree rotations and flips are always on", type=NON_NEGATIVE)
    batch_transforms: tuple[str, ...] = _f((), "training: comma-separated batch transforms added with "
                                               "dali_lens.register_batch_transform (run on the loader's device)",
                                           type=NAMES)
    tta: bool = _f(False, "evaluate with the mean over the 8 rotations/flips (test-time augmentation)")
    # model and trainer
    trainer: str = _f("single", "single: one model, one scale; multiscale: one model on several scales; "
                                "ensemble: several members, each its own architecture/scale/seed; or a trainer "
                                "added with dali_lens.trainers.register_trainer",
                      choices=TRAINERS.keys())  # the registry's live names: one registered later is a choice too
    arch: str = _f("small_cnn", "single/multiscale model: small_cnn, or any timm model name (efficientnet_b0, "
                                "convnext_nano, resnet18, vit_tiny_patch16_224...: timm.list_models()), built for "
                                "the data's band count and --img-size with random weights; vit_tiny and vit_b_16 "
                                "are the torchvision ViTs of earlier runs")
    img_size: int = _f(64, "single trainer: input size in pixels (images are resized on the loader's device)", type=PIXELS)
    stem: str = _f("auto", "ResNets: auto (the small-input stem, 3x3 stride 1 without max-pool, for inputs <= 96 "
                           "px: 16x the pixels through every block, 15x the forward FLOPs of the ImageNet stem at "
                           "96 px, see benchmarks/bench_stem.py; the ImageNet stem above), imagenet (7x7 stride 2 "
                           "+ max-pool) or small",
                   choices=STEMS)
    scales: tuple[int, ...] = _f((48, 64, 96), "multiscale trainer: comma-separated input sizes from one decode",
                                 type=SCALES)
    schedule: str = _f("all", "multiscale: all (every scale every step) or progressive (low to high resolution)",
                       choices=SCALE_SCHEDULES)
    progressive_epochs: int = _f(2, "multiscale progressive: epochs per scale before switching up", type=COUNT)
    consistency: str = _f("none", "multiscale: per-sample consistency between scales: none, kl (symmetric "
                                  "Bernoulli KL) or mse", choices=CONSISTENCIES)
    consistency_weight: float = _f(0.1, "weight of the consistency term", type=NON_NEGATIVE_NUMBER)
    micro_batch: int = _f(0, "memory bound: forward/backward at most N samples at a time, gradients accumulated "
                             "over the batch (same update; BatchNorm then normalises over N samples); 0 = whole "
                             "batch", type=NON_NEGATIVE)
    memory_budget: str = _f("auto", "memory bound per forward/backward: each scale's batch is cut into the largest "
                                    "chunks whose activations (the tensors autograd keeps for backward, measured "
                                    "on the first batch) fit, gradients accumulated (the same update; BatchNorm "
                                    "then normalises over a chunk). A size (2GB, 512MB), off, or auto (half the "
                                    "GPU memory still free; off on CPU)")
    members: tuple[MemberSpec, ...] = _f(DEFAULT_MEMBERS, "ensemble: comma-separated ARCH:SCALE[:SEED] members",
                                         type=MEMBERS)
    fusion: str = _f("mean_prob", "ensemble fusion: mean_prob, mean_logit, temperature (fitted on validation)",
                     choices=FUSIONS)
    weights: str | None = _f(None, "initial weights, from a local file (nothing is downloaded; tensors only, never "
                                   "code): a timm or torchvision state dict, a Lightning or Zoobot checkpoint (the "
                                   "encoder found under its prefix), a .safetensors file, or a dali-lens run "
                                   "(its folder or best.pt); band count, position embeddings and a head of "
                                   "another shape are adapted by timm")
    # optimisation
    epochs: int = _f(6, "training epochs", type=COUNT)
    batch_size: int = _f(64, "batch size per process", type=COUNT)
    lr: float = _f(2e-3, "AdamW learning rate", type=POSITIVE)
    weight_decay: float = _f(1e-4, "AdamW weight decay", type=NON_NEGATIVE_NUMBER)
    lr_schedule: str = _f("cosine", "cosine (with warm-up) or onecycle", choices=LR_SCHEDULES)
    patience: int = _f(4, "early stopping: epochs without a better validation AUC (0 = off)", type=NON_NEGATIVE)
    amp: str = _f("auto", "mixed precision on GPU: auto (bf16 if supported, else fp16), bf16, fp16, off",
                  choices=AMP_MODES)
    channels_last: bool = _f(True, "channels-last memory format on GPU")
    seed: int = _f(0, "random seed (data order, augmentation, initialisation)", type=SEED)
    checkpoint_every: int = _f(0, "also checkpoint every N training steps (mid-epoch resume); 0 = per epoch only", type=NON_NEGATIVE)
    threshold: float = _f(0.5, "score threshold for accuracy/precision/recall/F1", type=PROBABILITY)
    gallery: bool = _f(True, "write gallery/ in the run directory: gallery.png and index.html (grading page) of the "
                             "test split's 50 highest-scoring non-lenses and 50 lowest-scoring lenses")
    progress: bool = _f(True, "progress bars")
    # --- issue 24: metrics and curves ---
    at_n: tuple[int, ...] = _f(DEFAULT_AT_N, "test pass: purity@N and completeness@N at these N, each capped at "
                                             "the split's size", type=AT_N, metavar="N,...")
    prior: float = _f(1e-3, "test pass: the survey's lens fraction at which purity@N, completeness@N and "
                            "completeness at purity are also given", type=FRACTION_OPEN)
    tensorboard: bool = _f(True, "per-epoch curves also as TensorBoard event files in <out>/tensorboard/ "
                                 "(curves.csv and curves.png are always written)")
    # --- issue 24: fine-tuning (timm, weights) ---
    freeze_epochs: int = _f(0, "fine-tuning: train only the head for the first N epochs, the encoder frozen "
                               "(then what --trainable-blocks allows); 0 = off", type=NON_NEGATIVE)
    trainable_blocks: int | None = _f(None, "fine-tuning: train only the last N blocks of the encoder and the head "
                                            "(Zoobot's n_blocks; blocks are timm's coarse group_matcher groups: "
                                            "ResNet/EfficientNet/ConvNeXt stages, ViT blocks, small_cnn's 4 conv "
                                            "blocks); 0 = the head only. Default: all", type=NON_NEGATIVE)
    layer_decay: float | None = _f(None, "fine-tuning: layer-wise learning-rate decay (timm's layer_decay): the "
                                         "top layer trains at --lr, each one below at X times the one above. "
                                         "Default: off", type=LAYER_DECAY)
    head_lr: float | None = _f(None, "fine-tuning: the classifier head's learning rate. Default: --lr",
                               type=POSITIVE)
    # --- issue 24: imbalance and labels ---
    pos_weight: str | float | None = _f(None, "weight of the lens class in the BCE loss: auto (the training split's "
                                              "non-lens/lens ratio, e.g. 100 at 1:100) or a positive number "
                                              "(default: 1)", type=POS_WEIGHT)
    sampler: str = _f("shuffle", "training order: shuffle (every sample once per epoch) or balanced (each epoch "
                                 "draws lenses and non-lenses equally, the rarer class repeated; deterministic per "
                                 "seed, epoch and rank)", choices=SAMPLERS)
    labels: tuple[str, ...] | None = _f(None, "a label file joined by id onto the data (repeatable): the grading "
                                              "page's grades.csv (id,grade[,score]: 2-3 lens, 0 non-lens, 1 see "
                                              "--grade1) or id,label", type=LABEL_FILES, action="append",
                                        flag="--labels")
    grade1: str = _f("drop", "grade 1 (possible) in --labels: drop (left out of training) or weak (a lens with loss "
                             "weight --grade1-weight)", choices=GRADE1)
    grade1_weight: float = _f(0.5, "loss weight of a grade-1 lens with --grade1 weak", type=PROBABILITY)
    label_conflict: str = _f("file", "a --labels label that contradicts the data's own: file (the file wins) or "
                                     "data (the data's label is kept); counted in the log either way",
                             choices=LABEL_CONFLICTS)
    source_weight: str | None = _f(None, "per-source loss weights NAME=W,... (names: the data roots' folder names "
                                         "or NAME=PATH names, the label files' stems); weights multiply",
                                   type=SOURCE_WEIGHTS)
    # --- issue 25: injection ---
    inject: float = _f(0.0, "simulated lensed arcs painted onto the training non-lenses (and unlabelled cutouts): "
                            "each becomes an injected lens with this probability, drawn per sample and per "
                            "epoch; real lenses stay lenses; 0 = off. Painted at native resolution in the data's "
                            "units, before any resize, scaling or normalisation (README: Inject into your own "
                            "cutouts)", type=PROBABILITY)
    inject_theta_e: tuple[float, float] = _f((0.8, 2.0), "injection: Einstein radius range MIN,MAX in arcsec "
                                                       "(>= 0; --pixel-scale converts)", type=INJECT_THETA_E)
    inject_source_re: tuple[float, float] = _f((0.1, 0.4), "injection: the source's effective radius range "
                                                         "MIN,MAX in arcsec", type=INJECT_SOURCE_RE)
    inject_sersic_n: tuple[float, float] = _f((0.5, 2.0), "injection: the source's Sersic index range MIN,MAX",
                                              type=INJECT_SERSIC_N)
    inject_snr: tuple[float, float] = _f((10.0, 50.0), "injection: S/N range MIN,MAX of the lensed image over all "
                                                     "bands, against each band's noise (estimated as --scaling "
                                                     "auto does, on the training set)", type=INJECT_SNR)
    inject_offset: float = _f(0.1, "injection: largest offset (arcsec) of the lens centre from the cutout centre",
                              type=NON_NEGATIVE_NUMBER)
    pixel_scale: float = _f(0.2, "injection: the data's pixel scale in arcsec per pixel", type=POSITIVE)
    psf_fwhm: tuple[float, ...] | None = _f(None, "injection: Gaussian PSF FWHM in arcsec, one per band or one for "
                                                 "all (default 1.0)", type=INJECT_FWHM)
    psf: str | None = _f(None, "injection: PSF images, one per band (or one for all): a FITS file (one image HDU per "
                               "band, or a cube) or a .npy array (bands, k, k); instead of --psf-fwhm")
    inject_colours: tuple[float, ...] | None = _f(None, "injection: the source's flux ratio per band (default: the "
                                                       "generator's blue source; one value: all bands alike)",
                                         type=INJECT_COLOURS)
    inject_eval: bool = _f(False, "inject into val/test too (fixed seeds: the same injected sets every epoch and "
                                  "in evaluate; their draws go to injected_catalogue.csv)")

    def __post_init__(self) -> None:
        """Every option is held to the range its field declares (the CLI's ``type=``), whichever door it came
        in by (``python -m dali_lens.train``, ``dali_lens.train(...)``, a --resume's config.json), before any
        work: ``choices.OptionRangeError`` (a ValueError) naming the flag. A field whose type parses (lists,
        ``--mask-value``) holds the parsed value, from the text or from the value itself."""
        for f in fields(self):
            typ, value = f.metadata.get("type"), getattr(self, f.name)
            check = getattr(typ, "check", None)
            if check is not None:
                check(f.metadata.get("flag", "--" + f.name.replace("_", "-")), value)
            if hasattr(typ, "parse") and value is not None:
                setattr(self, f.name, typ.parse(value))

    def amp_dtype(self, device: torch.device):
        from ..scoring import amp_dtype

        return amp_dtype(self.amp, device)

    def to_dict(self) -> dict:
        """Strict JSON (config.json, the checkpoint's ``config``): tuples as lists, members as dicts."""
        return _json(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The config of ``to_dict``, or of a config.json / checkpoint written before the fields were typed
        (lists as comma-separated text): the same config. Keys that are not fields are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _json(value):
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


def as_text(value):
    """A list option's value as the command line writes it (``48,64,96``, ``small_cnn:48:0,...``), from the
    typed value or its JSON form (``--help``'s defaults, which argparse then parses; --resume's listing of what
    changed); any other value as it is."""
    if isinstance(value, MemberSpec):
        value = vars(value)
    if isinstance(value, dict) and {"arch", "scales", "seed"} <= set(value):
        return f"{value['arch']}:{'-'.join(map(str, value['scales']))}:{value['seed']}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(as_text(v)) for v in value)
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, named --field-name, documented by the field's help text."""
    for f in fields(TrainConfig):
        meta = dict(f.metadata)
        flag = meta.pop("flag", "--" + f.name.replace("_", "-"))
        helptext = meta.pop("help")
        default = as_text(f.default)
        if f.type in ("bool",) or isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=helptext)
            continue
        typ = meta.pop("type", None) or {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], None)
        if typ is None:
            typ = type(default) if default is not None else (float if "float" in str(f.type) else
                                                           int if "int" in str(f.type) else str)
        parser.add_argument(flag, dest=f.name, type=typ, default=default,
                            help=helptext if default is None else f"{helptext} (default: {default})", **meta)


def from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
