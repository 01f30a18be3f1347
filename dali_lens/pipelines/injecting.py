"""Simulated arcs painted onto the loader's own pixels (issue 25): the wiring around ``dali_lens.injection``.

Where: on the decoded sample, at native resolution and in the data's units, before masking, scaling,
augmentation, resizing and normalisation (``options.prescale`` and everything after it), so every scale sees
the same arc and a resize can never blur an arc differently from the galaxy under it. ``compute_stats`` and
``estimate_noise`` read the files themselves: the statistics and the noise come from real pixels only.

What: each background sample (a non-lens, or an unlabelled cutout: ``label != 1``) gets the arc of
``injection.arcs(settings, bands, size, index, epoch, noise)`` when that draw says ``inject`` (probability
``settings.probability``), deterministic in (seed, epoch, dataset index): the same on every backend, on a
resumed run and on every rank. Real lenses are never painted. Evaluation sets (``--inject-eval``) use a
fixed epoch and their own seed, so val/test are the same injected sets every epoch and in ``evaluate``.

8-bit images (PNG/JPEG): the arc is added to the 8-bit values (the stretched space), with its S/N against the
noise measured in the same 8-bit units, then clipped to 0..255 and rounded, as if the arc had been in the file.
The stretch of a user's PNGs is not known (and clipping at 0/255 cannot be undone), so it cannot be undone
in general; at the S/N of injected arcs most arc pixels are within a few noise levels, where an asinh
stretch is close to linear (see README "Inject into your own cutouts").

Per backend: torchvision and packed shards paint a whole batch per worker call
(:func:`paint_arrays`); DALI (CPU and GPU) paints inside the pipeline, right after the decoder, with
``fn.dl_tensor_python_function(batch_processing=True)`` running :class:`DaliPainter` (one batched torch call
per batch, on the GPU for the GPU backend; no per-sample Python).
"""
from __future__ import annotations

import math
import numpy as np
import torch

#: the fixed epoch of injected evaluation sets, and the seed offset of each split (train uses cfg.seed)
EVAL_EPOCH = 0
EVAL_SEEDS = {"val": 0x7a1, "test": 0x7e57}
#: catalogue columns (the draws of ``injection.arcs``) written per sample; completeness bins by the first two
CATALOGUE = ("theta_e", "snr", "magnification", "source_re", "sersic_n", "x0", "y0")


class Injector:
    """What a loader needs to paint arcs: the settings, the per-band noise in the data's units (the S/N
    reference), and, for evaluation sets, the fixed epoch. Picklable (torchvision's worker processes)."""

    def __init__(self, settings, noise_sigma, *, fixed_epoch: int | None = None, mask_value=None,
                 eight_bit: bool = False):
        self.settings = settings
        self.noise_sigma = tuple(float(v) for v in noise_sigma)
        self.fixed_epoch = fixed_epoch
        self.mask_value = mask_value
        self.eight_bit = eight_bit

    def epoch(self, loader_epoch: int) -> int:
        return int(self.fixed_epoch if self.fixed_epoch is not None else loader_epoch)

    def arcs(self, index: torch.Tensor, epoch: int, size: int, device=None, eligible=None):
        """(arcs (B, C, size, size) float32, inject mask (B,), catalogue) for dataset positions ``index``;
        ``eligible`` (B,) bool: only those may be injected (and rendered)."""
        from .. import injection

        return injection.arcs(self.settings, len(self.noise_sigma), size, index, self.epoch(epoch),
                              torch.tensor(self.noise_sigma, dtype=torch.float32), device=device,
                              eligible=eligible)

    def paint(self, x: torch.Tensor, index: torch.Tensor, epoch: int, background: torch.Tensor):
        """``x`` (B, C, H, W) in the data's units (any dtype) plus the arcs of the samples drawn for injection
        among ``background`` (B,) bool; returns (painted float32 tensor, injected (B,) bool)."""
        b, c, h, w = x.shape
        if h != w:
            raise ValueError(f"injection needs square cutouts, got {h}x{w} px")
        if c != len(self.noise_sigma):
            raise ValueError(f"injection: the data has {c} band(s), the noise estimate {len(self.noise_sigma)}")
        background = background.to(x.device)
        arcs, inject, _ = self.arcs(index.to(x.device), epoch, h, device=x.device, eligible=background)
        inject = inject.to(x.device) & background
        y = x.float()
        if not bool(inject.any()):
            return y, inject
        add = arcs.to(x.device, torch.float32) * inject.view(-1, 1, 1, 1)
        if self.mask_value is not None:  # masked pixels (NaN/inf, the sentinel) stay masked
            keep = torch.isfinite(y) & (y != float(self.mask_value))
            add = torch.where(keep, add, torch.zeros_like(add))
        y = y + add
        if self.eight_bit:  # as if the arc had been in the 8-bit file
            y = y.clamp_(0, 255).round_()
        return y, inject


def background_mask(labels) -> torch.Tensor:
    """Samples that may be painted: non-lenses (0) and unlabelled cutouts (-1); real lenses (1) never."""
    return torch.as_tensor(np.asarray(labels)) != 1


def paint_arrays(injector: Injector, arrays: list, index: list[int], epoch: int, labels) -> tuple[list, list]:
    """Torchvision/shards workers: decoded (C, H, W) arrays of one batch, painted in one batched call per
    shape; returns (arrays, injected flags)."""
    out, flags = list(arrays), [False] * len(arrays)
    groups: dict[tuple, list[int]] = {}
    for k, a in enumerate(arrays):
        groups.setdefault(tuple(a.shape), []).append(k)
    lab = np.asarray(labels)
    for ks in groups.values():
        x = torch.from_numpy(np.stack([np.asarray(arrays[k], dtype=np.float32) for k in ks]))
        idx = torch.tensor([index[k] for k in ks], dtype=torch.long)
        y, inj = injector.paint(x, idx, epoch, torch.from_numpy(lab[idx.numpy()] != 1))
        for j, k in enumerate(ks):
            out[k], flags[k] = y[j].numpy(), bool(inj[j])
    return out, flags


class DaliPainter:
    """The ``fn.dl_tensor_python_function`` of the DALI pipeline (``batch_processing=True``): a batch of decoded
    HWC samples and their dataset positions in, the painted batch (same dtype) and an ``injected`` flag per
    sample out, in one batched torch call (on the GPU for the GPU backend).

    DALI's readers shuffle internally, so the painter cannot be told the epoch of each batch; it counts its
    calls instead: the pipeline runs exactly ``calls_per_epoch`` iterations per epoch (its readers pad the last
    batch), in order, so call k is epoch ``first_epoch + (skip + k) // calls_per_epoch``. A pipeline restored
    from a mid-epoch DALI checkpoint starts with ``skip`` = the batches done."""

    def __init__(self, injector: Injector, labels, calls_per_epoch: int, first_epoch: int = 0, skip: int = 0,
                 gpu: bool = False, dataset=None):
        self.injector, self.cpe = injector, max(1, int(calls_per_epoch))
        self.first_epoch, self.calls = int(first_epoch), int(skip)
        self.labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
        self.gpu = gpu
        self._keep = None  # the last outputs, alive until DALI has copied them
        self.dataset, self._names = dataset, None

    def positions(self, raw: torch.Tensor) -> torch.Tensor:
        """Dataset positions of the reader's index output, as ``DaliLoader._indices`` maps it, batched: the
        kind's mapping (packed key numbers), the position itself, or the file name a reader reports (bytes),
        looked up by a random linear hash of its padded bytes in a sorted table (torch, on the batch's device)."""
        if self.dataset is not None:
            mapped = self.dataset.data_kind.dali_positions(self.dataset, raw)
            if mapped is not None:
                return mapped.to(raw.device).long()
        if raw.dtype != torch.uint8:
            return raw[:, 0].long()
        width = raw.shape[1]
        if self._names is None or self._names[0] != width or self._names[1].device != raw.device:
            gen = torch.Generator().manual_seed(0x1e25)
            weights = torch.randint(0, 2 ** 40, (width,), generator=gen, dtype=torch.int64)
            w = weights.numpy()  # the table once per pipeline: one dot product per name, no (N, width) array
            keys = torch.from_numpy(np.array(
                [int(np.frombuffer(p, np.uint8).astype(np.int64) @ w[:len(p)])
                 for p in (sample.path.encode()[:width] for sample in self.dataset.samples)], dtype=np.int64))
            order = torch.argsort(keys)
            if len(keys) > 1 and bool((keys[order][1:] == keys[order][:-1]).any()):
                raise ValueError("injection: two file names of the data set hash alike; use --backend torchvision")
            self._names = (width, weights.to(raw.device), keys[order].to(raw.device), order.to(raw.device))
        _, weights, keys, order = self._names
        # names are short: the zero padding adds nothing to the hash (numpy on the CPU: torch's any() over the
        # padded (B, 4096) bytes took 27 ms per batch on the 2-core VM, numpy's well under 1)
        used = np.flatnonzero(raw.numpy().any(0)) if raw.device.type == "cpu" else raw.any(0).nonzero().flatten()
        n = int(used[-1]) + 1 if len(used) else 1
        h = raw[:, :n].long() @ weights[:n]
        at = torch.searchsorted(keys, h).clamp_(max=len(keys) - 1)
        if not bool((keys[at] == h).all()):
            raise ValueError("injection: the DALI reader reported a file name that is not in the data set")
        return order[at]

    def __call__(self, images, index):
        epoch = self.first_epoch + self.calls // self.cpe
        self.calls += 1
        xs = [torch.from_dlpack(t) for t in images]
        idx = self.positions(torch.stack([torch.from_dlpack(t).reshape(-1) for t in index]))
        dtype = xs[0].dtype
        painted, flags = list(xs), torch.zeros(len(xs), dtype=torch.bool, device=idx.device)
        groups: dict[tuple, list[int]] = {}
        for k, t in enumerate(xs):
            groups.setdefault(tuple(t.shape), []).append(k)
        for ks in groups.values():
            x = torch.stack([xs[k] for k in ks]).permute(0, 3, 1, 2)
            sel = idx[ks]
            with _torch_threads(None if self.gpu else 1):
                y, inj = self.injector.paint(x, sel, epoch, self.labels.to(sel.device)[sel] != 1)
            y = y.permute(0, 2, 3, 1).to(dtype).contiguous()
            for j, k in enumerate(ks):
                painted[k] = y[j]
            flags[torch.tensor(ks, device=flags.device)] = inj.to(flags.device)
        flag_out = [f.reshape(1).to(torch.uint8) for f in flags.unbind(0)]
        if self.gpu:
            torch.cuda.current_stream().synchronize()  # DALI reads the outputs on its own stream
        self._keep = (painted, flag_out)
        return ([torch.utils.dlpack.to_dlpack(t.contiguous()) for t in painted],
                [torch.utils.dlpack.to_dlpack(t) for t in flag_out])


class _torch_threads:
    """PyTorch's intra-op threads set to ``n`` for a block (None: unchanged). The CPU painter runs in one of
    DALI's worker threads, next to DALI's others: a torch pool as wide as the machine on top of them
    oversubscribes the cores (measured: 24x slower arcs on a loaded 2-core VM), so each call paints on one."""

    def __init__(self, n: int | None):
        self.n, self.before = n, None

    def __enter__(self):
        if self.n is not None and torch.get_num_threads() != self.n:
            self.before = torch.get_num_threads()
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.before is not None:
            torch.set_num_threads(self.before)


def dali_calls_per_epoch(n: int, opts, python_source: bool) -> int:
    """Pipeline iterations per epoch for this shard: DALI's readers pad the shard's last batch (one more
    iteration when it is partial); the per-sample Python source of a training loader stops at whole batches.
    Training shards of unequal iteration counts (DALI rotates them between epochs) are refused."""
    from .options import shard_bounds

    sizes = [shard_bounds(n, s, opts.num_shards) for s in range(opts.num_shards)]
    sizes = [hi - lo for lo, hi in sizes]
    b = opts.batch_size
    if python_source:
        own = sizes[opts.shard_id] if not opts.train else n // opts.num_shards
        return max(1, own // b if opts.train else math.ceil(own / b))
    counts = {math.ceil(s / b) for s in (sizes if opts.train else [sizes[opts.shard_id]])}
    if len(counts) > 1:
        raise ValueError(f"injection on the DALI backends: {n} training samples over {opts.num_shards} processes "
                         f"give shards of unequal batch counts ({sorted(counts)}); use a number of samples "
                         "divisible by the process count, or --backend torchvision")
    return max(1, counts.pop())


def dali_paint(img, index, opts, dataset, gpu: bool, first_epoch: int, skip: int, python_source: bool):
    """The DALI pipeline's painting step (nodes in, nodes out): (painted HWC image, injected flag)."""
    from nvidia.dali import fn

    painter = DaliPainter(opts.inject, dataset.labels, dali_calls_per_epoch(len(dataset), opts, python_source),
                          first_epoch, skip, gpu, dataset)
    if gpu:
        index = index.gpu()
    img, flag = fn.dl_tensor_python_function(img, index, function=painter, batch_processing=True, num_outputs=2,
                                             synchronize_stream=True, device="gpu" if gpu else "cpu")
    return fn.reshape(img, layout="HWC"), flag


# --- backgrounds; settings from a run's options; the catalogue of an injected evaluation set ---

def discover_backgrounds(root: str, *, hdus=None, val_fraction: float = 0.15, seed: int = 0,
                         inject: bool = True) -> dict:
    """``data.discover`` for an injected run: with ``inject``, a training split of non-lenses only is valid,
    and unlabelled cutouts (a folder without classes, empty labels) are non-lens backgrounds of the training
    splits: label 0 there (a flat folder's samples become the training split, a validation split held out of
    it). Without ``inject``: ``discover`` itself."""
    import dataclasses

    from ..data.sources import ONE_CLASS_OK, _with_val, discover

    if not inject:
        return discover(root, hdus=hdus, val_fraction=val_fraction, seed=seed)
    token = ONE_CLASS_OK.set(True)
    try:
        splits = discover(root, hdus=hdus, val_fraction=val_fraction, seed=seed)
        if "train" not in splits and "predict" in splits:  # unlabelled cutouts only: they are the training set
            splits = {"train": dataclasses.replace(splits.pop("predict"), split="train"), **splits}
            splits = _with_val(_as_background(splits), val_fraction, seed)
        return _as_background(splits)
    finally:
        ONE_CLASS_OK.reset(token)


def _as_background(splits: dict) -> dict:
    import dataclasses

    out = dict(splits)
    for name in ("train", "val"):
        ds = out.get(name)
        if ds is not None and any(s.label is None for s in ds.samples):
            samples = [s if s.label is not None else dataclasses.replace(s, label=0) for s in ds.samples]
            out[name] = dataclasses.replace(ds, samples=samples)
    return out


def settings_from_config(cfg, split: str = "train", bands: int | None = None):
    """``injection.InjectionSettings`` of a TrainConfig (or its dict form) for ``split``: training uses the run's
    seed (per epoch); val/test their own fixed seeds (:data:`EVAL_SEEDS`). One ``--inject-colours`` value is
    every band's (``bands``: the data's band count)."""
    from ..injection import InjectionSettings

    get = (lambda k: cfg.get(k)) if isinstance(cfg, dict) else (lambda k: getattr(cfg, k))
    psf = get("injection_psf")
    seed = int(get("seed") or 0) + (EVAL_SEEDS[split] if split in EVAL_SEEDS else 0)
    return InjectionSettings(
        probability=float(get("inject")), theta_e=tuple(get("inject_theta_e")),
        source_re=tuple(get("inject_source_re")), sersic_n=tuple(get("inject_sersic_n")),
        snr=tuple(get("inject_snr")), offset=float(get("inject_offset")), pixel_scale=float(get("pixel_scale")),
        psf_fwhm=tuple(get("psf_fwhm")) if get("psf_fwhm") else None,
        psf=np.asarray(psf, dtype=np.float32) if psf is not None else None,
        colours=_colours(get("inject_colours"), bands), seed=seed % (2 ** 32))


def _colours(values, bands: int | None):
    if not values:
        return None
    return tuple(values) * bands if len(values) == 1 and bands else tuple(values)


def injector_for(config: dict, split: str, train: bool, eight_bit: bool, mask_value=None) -> Injector | None:
    """The Injector of a loader of ``split`` from a run's config (``config.json``/the checkpoint's config with
    its ``injection`` record): training always when ``--inject`` > 0; val/test only with ``--inject-eval``."""
    record = config.get("injection")
    if not record or not float(config.get("inject") or 0) > 0:
        return None
    if not train and not config.get("inject_eval"):
        return None
    settings = settings_from_config({**config, "injection_psf": record.get("psf")}, "train" if train else split,
                                    bands=len(record["noise"]))
    return Injector(settings, record["noise"], fixed_epoch=None if train else EVAL_EPOCH, mask_value=mask_value,
                    eight_bit=eight_bit)


def catalogue(injector: Injector, dataset, chunk: int = 256) -> dict[str, np.ndarray]:
    """The injected evaluation set's per-sample record: ``injected`` (bool) and the draws (:data:`CATALOGUE`,
    NaN where not injected) for every sample of ``dataset`` (in its order); needs square cutouts."""
    n = len(dataset)
    size = dataset.shape[0] if dataset.shape else None
    if size is None:
        from ..data.readers import read_sample

        size = read_sample(dataset.samples[0], dataset, check=False).shape[-1]
    background = background_mask(dataset.labels)
    out = {"injected": np.zeros(n, dtype=bool), **{k: np.full(n, np.nan) for k in CATALOGUE}}
    for lo in range(0, n, chunk):
        idx = torch.arange(lo, min(n, lo + chunk))
        _, inject, cat = injector.arcs(idx, EVAL_EPOCH, size, eligible=background[idx])
        inject = inject.cpu() & background[idx]
        out["injected"][idx.numpy()] = inject.numpy()
        for k in CATALOGUE:
            if k in cat:
                v = cat[k].detach().cpu().double().numpy()
                out[k][idx.numpy()] = np.where(inject.numpy(), v, np.nan)
    return out


def injected_labels(labels, record: dict) -> np.ndarray:
    """The labels of an injected evaluation set: 1 where an arc was painted."""
    y = np.asarray(labels, dtype=np.int64).copy()
    y[record["injected"]] = 1
    return y


def write_catalogue(path: str, parts: dict) -> None:
    """``injected_catalogue.csv``: one row per sample of each ``{split: (dataset, record)}`` (split, file, id,
    injected, the draws; empty where not injected)."""
    from ..data.io import atomic_write_csv

    rows = [[split, s.path, s.id, int(rec["injected"][j])]
            + [("" if not math.isfinite(rec[k][j]) else f"{rec[k][j]:.6g}") for k in CATALOGUE]
            for split, (dataset, rec) in parts.items() for j, s in enumerate(dataset.samples)]
    atomic_write_csv(path, ["split", "file", "id", "injected", *CATALOGUE], rows)


def for_evaluation(config: dict, dataset, labels, mask_value=None, say=None):
    """``evaluate`` on a checkpoint trained with ``--inject-eval``: (the Injector that repeats the run's injected
    ``dataset`` split exactly, its labels with the injected samples as lenses, completeness columns
    ``injected_<draw>`` (NaN where not injected)); (None, labels, {}) otherwise. ``predict`` never injects."""
    inj = injector_for(config, dataset.split, False, dataset.eight_bit, mask_value)
    if inj is None:
        return None, labels, {}
    rec = catalogue(inj, dataset)
    if say is not None:
        say(f"injection: {int(rec['injected'].sum())} of {len(dataset)} {dataset.split} samples get the run's "
            "fixed-seed arcs (--inject-eval); completeness by injected_theta_e, injected_snr, injected_magnification")
    return inj, injected_labels(labels, rec), {f"injected_{k}": rec[k] for k in ("theta_e", "snr", "magnification")}


try:  # the painting step is plain Python: kept from DALI's AutoGraph (pipelines with conditionals convert
    # every function they call, and the converted painter's helpers failed), as dali_backend's kind source is
    from nvidia.dali.pipeline import do_not_convert

    dali_paint = do_not_convert(dali_paint)
except ImportError:  # pragma: no cover - without DALI
    pass
