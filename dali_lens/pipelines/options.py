"""Loader options shared by every backend, sample order, and normalisation statistics."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from ..choices import DTYPES, NUMPY_READERS, RESIZE_MODES, SCALINGS

#: ``scaling='auto'``: arcsinh(x / (AUTO_K * noise)) per band, ``noise`` the band's noise level (estimate_noise):
#: linear within the noise, logarithmic for sources brighter than a few noise levels, whatever the flux unit.
AUTO_K = 1.0


@dataclass
class PixelOptions:
    """How a loader turns a file's pixels into a model's input: scaling, masking, resizing, normalisation
    (``LoaderOptions`` documents each step). The part of the loader's options that a trained model fixes:
    ``checkpoint.PixelSettings`` stores them with the checkpoint and hands them back through
    :meth:`pixel_fields`. Defined once, here; ``LoaderOptions`` and ``PixelSettings`` both extend it."""

    scaling: str = "none"
    scale_a: float = 1.0
    noise_sigma: tuple[float, ...] | None = None
    mask_value: float | None = None
    mask_channel: bool = False
    resize_mode: str = "resize"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def pixel_fields(self) -> dict:
        """These options as ``LoaderOptions`` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(PixelOptions)}


@dataclass
class LoaderOptions(PixelOptions):
    """Everything a backend needs besides the dataset. The defaults suit 64 px cutouts.

    ``train=True`` means shuffle (classes mixed from the first batch), random dihedral augmentation (the 8
    rotations/flips of the square, drawn once per sample and applied identically at every scale), optional
    integer shifts up to ``max_shift`` pixels, and dropping the last partial batch. ``train=False`` keeps file
    order and yields every sample exactly once across all shards.

    Normalisation: images are first divided by 255; float data first goes through ``scaling`` (``asinh``:
    arcsinh(scale_a * x); ``clip``: clip to +-scale_a then divide by scale_a; ``auto``: arcsinh(x / (AUTO_K *
    noise_sigma)) per band, ``noise_sigma`` from :func:`estimate_noise` on the training set, the same for every
    loader of a run). Then ``(x - mean) / std`` per band. ``mask_value``: pixels equal to it, and NaN/inf, are set to 0 before scaling (without it, NaN/inf
    in the data is an error naming the file).
    ``dtype='uint8'`` (images only) skips normalisation so that it can be done later on the GPU.
    ``mask_channel``: append one channel that is 1 where any band was masked (needs ``mask_value``).
    ``resize_mode``: ``resize`` (antialiased bilinear) or ``crop`` (centre crop, or zero-pad when the scale
    is larger than the cutout; e.g. 101 px challenge cutouts at 64 px without resampling).
    ``transforms``: names of batch transforms added with ``register_batch_transform``, applied in order.

    Reading: ``validate`` (refuse corrupt files by name before a decoder sees them, once per dataset object;
    False skips it), ``shuffle_buffer`` (packed shards, training: samples mixed in DALI's random buffer and in
    the torchvision stream's windows), ``mmap`` (packed shards: memory-map them instead of reading),
    ``numpy_reader`` (DALI GPU backend: ``auto``, ``gpu`` or ``cpu`` for ``.npy``), ``prefetch_queue_depth``
    (DALI pipeline batches in flight; None: 2 on the GPU, 1 on the CPU).

    ``inject``: a ``pipelines.injecting.Injector``: simulated arcs painted onto background samples right
    after decoding, before everything above (issue 25); batches then carry ``injected``.
    """

    scales: tuple[int, ...] = (64,)
    batch_size: int = 64
    train: bool = False
    augment: bool | None = None
    max_shift: int = 0
    seed: int = 0
    shard_id: int = 0
    num_shards: int = 1
    num_workers: int | None = None
    dtype: str = "float32"
    tta: bool = False
    device_id: int | None = None
    transforms: tuple[str, ...] = ()
    validate: bool = True
    shuffle_buffer: int = 1024
    mmap: bool = False
    numpy_reader: str = "auto"
    prefetch_queue_depth: int | None = None
    sampler: str = "shuffle"  # training order: shuffle, or balanced (classes drawn equally: balanced_order)
    inject: object | None = None  # issue 25: a pipelines.injecting.Injector (arcs painted before prescale)

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        self.transforms = tuple(self.transforms)
        if not self.scales or min(self.scales) < 8:
            raise ValueError(f"scales must be a non-empty list of sizes >= 8 px, got {self.scales}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {self.scaling!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {self.resize_mode!r}")
        if self.noise_sigma is not None:
            self.noise_sigma = tuple(float(v) for v in self.noise_sigma)
            if not all(math.isfinite(v) and v > 0 for v in self.noise_sigma):
                raise ValueError(f"noise_sigma must be positive and finite for every band, got {self.noise_sigma}")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive for every band, got {self.std}")
        if self.mask_channel and self.mask_value is None:
            raise ValueError("mask_channel needs mask_value (the value of masked pixels)")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id {self.shard_id} out of range for num_shards {self.num_shards}")
        if self.augment is None:
            self.augment = self.train
        if self.numpy_reader not in NUMPY_READERS:
            raise ValueError(f"numpy_reader must be one of {NUMPY_READERS}, not {self.numpy_reader!r}")

    @property
    def workers(self) -> int:
        """Loader threads/workers: ``num_workers`` or the CPUs this process may use."""
        if self.num_workers is not None:
            return self.num_workers
        try:
            return len(os.sched_getaffinity(0)) or 1
        except AttributeError:  # not on Linux
            return os.cpu_count() or 1

    def to_dict(self) -> dict:
        return asdict(self)


def shard_bounds(n: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """DALI's sharding rule: shard i covers [floor(i*n/S), floor((i+1)*n/S))."""
    return n * shard_id // num_shards, n * (shard_id + 1) // num_shards


def base_permutation(n: int, seed: int) -> np.ndarray:
    """The seeded order in which training samples are handed to a backend (the same on every rank)."""
    return np.random.default_rng([seed, 0x1e25]).permutation(n)


def epoch_order(n: int, epoch: int, opts: LoaderOptions, labels=None) -> np.ndarray:
    """Sample indices this shard visits in ``epoch`` (torchvision backend, and DALI pipelines that are handed
    their order: FITS through astropy or DALI's FITS reader, and every kind with ``sampler='balanced'``; DALI's
    other readers shuffle internally).

    Train: a permutation that depends on (seed, epoch), identical on all ranks, cut into equal shards of
    floor(n / S) samples (like DistributedSampler with drop_last); with ``opts.sampler == 'balanced'`` the
    :func:`balanced_order` of ``labels`` (one per index) instead of the permutation. Eval: contiguous shards,
    every sample once.
    """
    if not opts.train:
        lo, hi = shard_bounds(n, opts.shard_id, opts.num_shards)
        return np.arange(lo, hi)
    if opts.sampler == "balanced":
        if labels is None or len(labels) != n:
            raise ValueError("sampler='balanced' needs the label of every training sample")
        perm = balanced_order(labels, epoch, opts.seed)
    else:
        perm = np.random.default_rng([opts.seed, epoch, 0x5eed]).permutation(n)
    per = n // opts.num_shards
    return perm[opts.shard_id * per:(opts.shard_id + 1) * per]


def balanced_order(labels, epoch: int, seed: int) -> np.ndarray:
    """``--sampler balanced``: ``len(labels)`` indices for ``epoch``, half lenses (label 1) and half non-lenses
    (label 0), shuffled together. Each class is drawn as consecutive seeded permutations of its members (the
    rarer class repeated, each member equally often up to one; the commoner one a different subset each
    epoch). Depends on (seed, epoch) only: identical on every rank, which then cut it into their shards."""
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, epoch, 0xba1a])
    n = len(labels)
    groups = [np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)]
    if not len(groups[0]) or not len(groups[1]):
        raise ValueError("sampler='balanced' needs both lenses and non-lenses in the training split")
    parts = []
    for idx, k in zip(groups, (n // 2, n - n // 2)):
        reps = -(-k // len(idx))
        parts.append(np.concatenate([rng.permutation(idx) for _ in range(reps)])[:k])
    return rng.permutation(np.concatenate(parts))


def batches_per_epoch(n: int, opts: LoaderOptions) -> int:
    if opts.train:
        return (n // opts.num_shards) // opts.batch_size
    lo, hi = shard_bounds(n, opts.shard_id, opts.num_shards)
    return math.ceil((hi - lo) / opts.batch_size)


def augment_params(seed: int, epoch: int, index: int, max_shift: int) -> tuple[int, int, int, int, int]:
    """(flip_h, flip_v, transpose, shift_y, shift_x) for one sample: one element of the dihedral group."""
    r = np.random.default_rng([seed, epoch, index, 0xa06])
    fh, fv, tr = (int(v) for v in r.integers(0, 2, size=3))
    dy, dx = (int(v) for v in r.integers(-max_shift, max_shift + 1, size=2)) if max_shift else (0, 0)
    return fh, fv, tr, dy, dx


def compute_stats(dataset, opts: LoaderOptions, max_samples: int = 512) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-band mean and std of the training data after the options' scaling (images in [0, 1]).

    Every sample read is checked first (band count, size, and NaN/inf unless ``mask_value`` masks them), so a
    bad file is named here rather than turning the statistics into NaN or a broadcast error."""
    from ..data.readers import check_array, read_sample

    n = len(dataset)
    idx = np.random.default_rng(opts.seed).choice(n, size=min(n, max_samples), replace=False)
    acc = np.zeros((dataset.bands + int(opts.mask_channel), 3), dtype=np.float64)  # the mask channel too
    for i in sorted(idx):
        sample = dataset.samples[i]
        raw = read_sample(sample, dataset, check=False)
        check_array(raw, sample, dataset, allow_nonfinite=opts.mask_value is not None)
        x = prescale(raw, dataset.pixel_kind, opts)
        x = x.reshape(x.shape[0], -1).astype(np.float64)
        acc[:, 0] += x.shape[1]
        acc[:, 1] += x.sum(1)
        acc[:, 2] += (x * x).sum(1)
    mean = acc[:, 1] / acc[:, 0]
    std = np.sqrt(np.maximum(acc[:, 2] / acc[:, 0] - mean ** 2, 0))
    std = np.where(std < 1e-12, 1.0, std)
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def prescale(x: np.ndarray, kind: str, opts: LoaderOptions) -> np.ndarray:
    """Reference numpy version of the per-pixel steps before normalisation (both backends match it); ``kind``
    names the kind of the pixels (8-bit kinds are divided by 255, float kinds masked and scaled)."""
    from ..data.dataset import get_kind

    if get_kind(kind).eight_bit:
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32, copy=True)
    masked = None
    if opts.mask_value is not None:
        bad = ~np.isfinite(x) | (x == np.float32(opts.mask_value))
        x[bad] = 0.0
        masked = bad.any(0, keepdims=True).astype(np.float32)
    if opts.scaling == "asinh":
        x = np.arcsinh(opts.scale_a * x)
    elif opts.scaling == "auto":
        x = np.arcsinh(x * auto_factors(opts, x.shape[0])[:, None, None])
    elif opts.scaling == "clip":
        x = np.clip(x, -opts.scale_a, opts.scale_a) / opts.scale_a
    if opts.mask_channel:
        x = np.concatenate([x, masked])
    return x


def auto_factors(opts: LoaderOptions, bands: int) -> np.ndarray:
    """``scaling='auto'``: the float32 factor 1 / (AUTO_K * noise) of each band (every backend multiplies by it)."""
    if opts.noise_sigma is None:
        raise ValueError("scaling='auto' needs noise_sigma, the per-band noise of the training set: "
                         "opts.noise_sigma = estimate_noise(train_dataset, opts)")
    if len(opts.noise_sigma) != bands:
        raise ValueError(f"noise_sigma has {len(opts.noise_sigma)} band(s) but the data has {bands}")
    return (1.0 / (AUTO_K * np.asarray(opts.noise_sigma, dtype=np.float64))).astype(np.float32)


def estimate_noise(dataset, opts: LoaderOptions, max_samples: int = 64) -> tuple[float, ...]:
    """Per-band noise level of float data, for ``scaling='auto'``: robust, unit-free in the sense that scaling
    the fluxes by c scales the estimate by c.

    Over a seeded sample of up to ``max_samples`` cutouts, the differences between horizontally adjacent
    pixels (both finite and not equal to ``opts.mask_value``) are pooled per band; sigma = 1.4826 * MAD / sqrt(2)
    (the MAD of a difference of two independent pixels is sqrt(2) times a pixel's). Smooth, noise-free data
    whose MAD is 0 falls back to the differences' standard deviation, then to the pixels' own, then 1.
    """
    from ..data.readers import read_sample

    n = len(dataset)
    idx = np.random.default_rng([opts.seed, 0x5161]).choice(n, size=min(n, max_samples), replace=False)
    diffs: list[list[np.ndarray]] = [[] for _ in range(dataset.bands)]
    values: list[list[np.ndarray]] = [[] for _ in range(dataset.bands)]
    for i in sorted(idx):
        x = read_sample(dataset.samples[i], dataset, check=False).astype(np.float32)
        ok = np.isfinite(x)
        if opts.mask_value is not None:  # as prescale masks: compared in float32
            ok &= x != np.float32(opts.mask_value)
        x = x.astype(np.float64)
        pair = ok[:, :, 1:] & ok[:, :, :-1]
        d = x[:, :, 1:] - x[:, :, :-1]
        for b in range(dataset.bands):
            diffs[b].append(d[b][pair[b]])
            values[b].append(x[b][ok[b]])
    out = []
    for b in range(dataset.bands):
        d, v = np.concatenate(diffs[b]), np.concatenate(values[b])
        sigma = 0.0
        if d.size:
            sigma = 1.4826 * float(np.median(np.abs(d - np.median(d)))) / math.sqrt(2)
            if not sigma > 0:
                sigma = float(d.std()) / math.sqrt(2)
        if not sigma > 0 and v.size:
            sigma = float(v.std())
        out.append(sigma if math.isfinite(sigma) and sigma > 0 else 1.0)
    return tuple(out)


def finish(x, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
    """Complete the normalisation of a ``dtype='uint8'`` batch tensor on its own device (a no-op otherwise).

    uint8 batches become ``(x / 255 - mean) / std`` per band in float32, exactly what the loader computes for
    ``dtype='float32'``; float batches were normalised by the loader and are returned unchanged. Works for
    ``(B, C, s, s)`` and TTA ``(B, 8, C, s, s)`` batches. Call it per scale, just before the forward pass,
    so that at most one scale exists in float at a time.
    """
    if x.dtype != torch.uint8:
        return x
    x = x.float().div_(255.0)
    if mean is not None:
        c = x.shape[-3]
        x.sub_(x.new_tensor(mean).view(c, 1, 1))
    if std is not None:
        c = x.shape[-3]
        x.div_(x.new_tensor(std).view(c, 1, 1))
    return x


def centre_offset(size: int, target: int) -> int:
    """Where a centred ``target`` window starts in ``size`` pixels (negative: padding), as DALI rounds it."""
    a = size - target
    return int(np.sign(a) * np.floor(abs(a) / 2 + 0.5))
