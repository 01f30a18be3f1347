"""DALI backend: one pipeline definition for the CPU (``device_id=None``) and the GPU.

Per sample: read -> decode once -> (float data: mask, scaling) -> one dihedral transform and shift drawn
once -> ``fn.resize`` to each requested scale from the same decoded image -> normalise + HWC->CHW + cast.
Only the device differs between CPU and GPU: ``'mixed'`` decoding (JPEG on nvJPEG, PNG on the CPU then
moved to the GPU), the GPU numpy/FITS readers, and every later op on the GPU.
"""
from __future__ import annotations

import gc
import os
import re
import warnings

import numpy as np
import torch

from ..data.dataset import DataError, Dataset
from .batch import BatchChecker
from .options import LoaderOptions, auto_factors, base_permutation, batches_per_epoch, epoch_order, shard_bounds

try:  # DALI is optional: the package falls back to torchvision without it
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised only where DALI is missing
    HAVE_DALI = False

_SOURCE_INFO_LEN = 4096
OUT_BYTES = {"float32": 4, "float16": 2, "uint8": 1}  # bytes kept of each file name returned by readers that have no label output


_BUILT = [0]


def available() -> bool:
    return HAVE_DALI


def pipelines_built() -> int:
    """How many DALI pipelines this process has built (its threads make forking unsafe)."""
    return _BUILT[0]


def _augment(img, opts: LoaderOptions, shape_hw):
    """One element of the dihedral group (+ optional shift) per sample, on HWC data."""
    if opts.augment:
        if fn.random.coin_flip(probability=0.5):
            img = fn.transpose(img, perm=[1, 0, 2], transpose_layout=False)
        img = fn.flip(img, horizontal=fn.random.coin_flip(probability=0.5),
                      vertical=fn.random.coin_flip(probability=0.5))
        if opts.max_shift:
            k = opts.max_shift
            shift = fn.random.uniform(values=list(range(-k, k + 1)), shape=[2], dtype=types.INT32)
            img = fn.slice(img, start=-shift, shape=list(shape_hw), axis_names="HW",
                           out_of_bounds_policy="pad", fill_values=0)
    return img


def _float_steps(x, opts: LoaderOptions, bands: int):
    """Masking and flux scaling for float data (mirrors options.prescale)."""
    from nvidia.dali import math as dmath

    if opts.mask_value is not None:
        finite = (x == x) & (dmath.abs(x) < float(np.finfo(np.float32).max))
        keep = finite & (x != float(opts.mask_value))
        # NaN * 0 is NaN: first make every value finite (min then max maps NaN to 3e38), then multiply
        x = dmath.max(dmath.min(x, 3.0e38), -3.0e38) * fn.cast(keep, dtype=types.FLOAT)
    masked = None
    if opts.mask_channel:  # 1 where any band is masked
        masked = 1.0 - fn.reductions.min(fn.cast(keep, dtype=types.FLOAT), axes=[2], keep_dims=True)
    if opts.scaling == "asinh":
        x = dmath.asinh(x * float(opts.scale_a))
    elif opts.scaling == "auto":  # per band: a (1, 1, C) constant broadcast over HWC
        factors = auto_factors(opts, bands)
        x = dmath.asinh(x * types.Constant(factors.reshape(1, 1, -1)))
    elif opts.scaling == "clip":
        x = dmath.clamp(x, -float(opts.scale_a), float(opts.scale_a)) / float(opts.scale_a)
    if masked is not None:
        x = fn.cat(x, masked, axis=2)
    return x


class _PythonSource:
    """Per-sample external source for data DALI cannot read here (FITS on a machine without CUDA).

    Yields (HWC float32, index) in the same order and shards as DALI's readers; pads the last batch by
    repeating the shard's last sample (the iterator trims it).
    """

    def __init__(self, dataset: Dataset, files_order: np.ndarray, opts: LoaderOptions, first_epoch: int = 0):
        self.dataset, self.opts = dataset, opts
        self.order = files_order
        self.first_epoch = first_epoch  # the loader's epoch when the pipeline was built (DALI counts from 0)

    def shard(self, epoch: int) -> np.ndarray:
        return self.order[epoch_order(len(self.order), epoch, self.opts)]

    @staticmethod
    def epoch_samples(n: int, opts: LoaderOptions) -> int:
        """Samples of this shard the iterator returns per epoch: whole batches only when training (the
        partial one is never read), the whole shard otherwise (its last batch padded, then trimmed)."""
        lo, hi = shard_bounds(n, opts.shard_id, opts.num_shards)
        return (n // opts.num_shards) // opts.batch_size * opts.batch_size if opts.train else hi - lo

    def __call__(self, info):
        from ..data.readers import check_array, read_sample

        idx = self.shard(self.first_epoch + info.epoch_idx)
        b = self.opts.batch_size
        limit = (len(idx) // b) * b if self.opts.train else -(-len(idx) // b) * b
        if info.idx_in_epoch >= limit:  # the end of the epoch: DALI moves on to info.epoch_idx + 1
            raise StopIteration
        i = int(idx[min(info.idx_in_epoch, len(idx) - 1)])
        sample = self.dataset.samples[i]
        x = read_sample(sample, self.dataset, check=False)
        check_array(x, sample, self.dataset, allow_nonfinite=self.opts.mask_value is not None)
        return np.ascontiguousarray(x.transpose(1, 2, 0)), np.array([i], dtype=np.int64)


# reader arguments for a file list read front to back, the same on every rank: DALI's FITS readers are handed
# this rank's samples of the epoch (one per band file, which these arguments keep in lock-step)
LISTED_READER = dict(shard_id=0, num_shards=1, pad_last_batch=True, stick_to_shard=True, shuffle_after_epoch=False,
                     prefetch_queue_depth=2)


class _ListedIndex:
    """Dataset positions of the samples a reader reads front to back from ``order`` (no shuffling, one shard),
    the last one repeated for the padding of the last batch: DALI's FITS reader reports no file name."""

    def __init__(self, order: np.ndarray):
        self.order = np.asarray(order, dtype=np.int64)

    def __call__(self, info):
        return self.order[min(info.idx_in_epoch, len(self.order) - 1)].reshape(1)


def fits_hdu_numbers(dataset: Dataset) -> list[int] | None:
    """HDU numbers for DALI's FITS reader, one per band, or None where astropy reads the data instead.

    CFITSIO numbers HDUs from 1 (the primary HDU), astropy and ``--hdus`` from 0. FITS with ``--hdus`` given as
    indices: those, plus one. One file per band: the first HDU holding 2-D data (HDU 1, or HDU 2 for a
    tile-compressed ``.fits.fz``, whose image lives in an extension). The layout is read from the first file;
    HDUs that are not 2-D there (a cube of bands) and ``--hdus`` given as EXTNAMEs, which astropy looks up in
    every file, stay with astropy. So does every data set whose files DALI's GPU reader would decode wrongly
    or differently from one another (``_dali_fits_ok``). Cached on the dataset.
    """
    if not hasattr(dataset, "_dali_hdus"):
        hdus = _first_file_hdus(dataset)
        dataset._dali_hdus = hdus if hdus is not None and _dali_fits_ok(dataset, hdus) else None
    return dataset._dali_hdus


def _first_file_hdus(dataset: Dataset) -> list[int] | None:
    from ..data.readers import _fits_hdus

    def two_d(h) -> bool:
        return getattr(h, "data", None) is not None and getattr(h.data, "ndim", 0) == 2

    if not len(dataset):
        return None
    if dataset.kind == "fits" and dataset.hdus and all(isinstance(h, int) for h in dataset.hdus):
        with _fits_hdus(dataset.samples[0].path) as hdul:
            if all(0 <= h < len(hdul) and two_d(hdul[h]) for h in dataset.hdus):
                return [int(h) + 1 for h in dataset.hdus]
    if dataset.kind == "fits-bands":
        with _fits_hdus(dataset.samples[0].band_paths[0]) as hdul:
            return next(([k + 1] for k, h in enumerate(hdul) if two_d(h)), None)
    return None


def _fits_headers(path: str, count: int) -> list[dict[str, str]]:
    """The first ``count`` HDU headers of a FITS file as {keyword: value text}, read card by card, skipping the
    data (a few 2880-byte blocks per file: ~20x faster than astropy.io.fits.open, which matters when every file
    of a survey-sized set is checked)."""
    out: list[dict[str, str]] = []
    with open(path, "rb") as fh:
        while len(out) < count:
            cards: dict[str, str] = {}
            end = False
            while not end:
                block = fh.read(2880)
                if len(block) < 2880:
                    raise DataError(f"{path}: truncated FITS file (HDU {len(out)} has no complete header)")
                for i in range(0, 2880, 80):
                    card = block[i:i + 80].decode("ascii", "replace")
                    key = card[:8].strip()
                    if key == "END":
                        end = True
                        break
                    if card[8:10] == "= ":
                        value = card[10:].strip()
                        value = value[1:value.find("'", 1)].strip() if value.startswith("'") else value.split("/")[0].strip()
                        cards.setdefault(key, value)
            out.append(cards)
            naxis = int(cards.get("NAXIS", 0))
            size = 0
            if naxis:
                size = int(np.prod([int(cards.get(f"NAXIS{k}", 0)) for k in range(1, naxis + 1)], dtype=np.int64))
            size = (size + int(cards.get("PCOUNT", 0))) * int(cards.get("GCOUNT", 1)) * abs(int(cards.get("BITPIX", 8))) // 8
            fh.seek(-(-size // 2880) * 2880, 1)
    return out


def _hdu_layout(cards: dict[str, str]) -> tuple | None:
    """What DALI's GPU FITS reader would make of one HDU: a hashable description when it decodes it exactly
    (uncompressed, or RICE_1-compressed integers in row tiles with no scaling), else None.

    The reader Rice-decodes every tile-compressed HDU without looking at ``ZCMPTYPE``, ignores
    ``ZSCALE``/``ZZERO``/``BSCALE``/``BZERO`` and dithering, and assumes tiles of one row."""
    if cards.get("ZIMAGE", "F") != "T":
        return ("plain", cards.get("BITPIX"))
    bitpix = int(cards.get("ZBITPIX", 0))
    width = cards.get("ZNAXIS1")
    tiles = [cards.get(f"ZTILE{k}") for k in range(1, int(cards.get("ZNAXIS", 0)) + 1)]
    row_tiles = tiles[0] in (None, width) and all(t in (None, "1") for t in tiles[1:])
    unscaled = float(cards.get("BSCALE", 1)) == 1.0 and float(cards.get("BZERO", 0)) == 0.0 and "ZSCALE" not in cards \
        and "ZZERO" not in cards
    if cards.get("ZCMPTYPE") == "RICE_1" and bitpix > 0 and row_tiles and unscaled:
        return ("rice", bitpix)
    return None


def _dali_fits_ok(dataset: Dataset, hdu_numbers: list[int]) -> bool:
    """True when DALI's GPU reader decodes every selected HDU of every file exactly, and every file's layout
    matches the first file's (the reader takes "compressed" from the first sample of a batch). Reads the
    headers of every file (``_fits_headers``), in threads; once per dataset (``fits_hdu_numbers`` caches it)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for s in dataset.samples for p in (s.band_paths if dataset.kind == "fits-bands" else [s.path])]
    last = max(hdu_numbers)

    def layout(path: str):
        try:
            heads = _fits_headers(path, last)
        except (OSError, ValueError, DataError):
            return None  # astropy reads it and names the problem
        return tuple(_hdu_layout(heads[h - 1]) for h in hdu_numbers)

    first = layout(paths[0])
    if first is None or None in first:
        return False
    with ThreadPoolExecutor(min(8, len(paths))) as pool:
        return all(lay == first for lay in pool.map(layout, paths[1:], chunksize=256))


def _decode_images(raw, dataset: Dataset, gpu: bool):
    """PNG/JPEG bytes -> HWC uint8 with the dataset's band count. The output type follows the band count: GRAY
    for one band, RGB for three (ANY_DATA on a greyscale JPEG crashes DALI's CPU decoder with a heap corruption,
    issue 18), ANY_DATA only for other counts (PNG with 2 or 4 channels). A file with another band count is
    refused by ``data.validate`` before it gets here. Buffers sized for small cutouts, not the ImageNet-sized
    defaults (8-16 MiB per thread)."""
    h, w = dataset.shape or (0, 0)
    # jpeg_fancy_upsampling: nvJPEG upsamples chroma like libjpeg-turbo (the CPU decoders, PIL), not its cheaper default
    hint = dict(bytes_per_sample_hint=h * w * dataset.bands, jpeg_fancy_upsampling=True)
    output_type = {1: types.GRAY, 3: types.RGB}.get(dataset.bands, types.ANY_DATA)
    if gpu:  # 'mixed': JPEG on nvJPEG / the hardware decoder, PNG on the CPU then copied to the GPU
        return fn.decoders.image(raw, device="mixed", output_type=output_type, host_memory_padding=256 * 1024,
                                 device_memory_padding=1024 * 1024, **hint)
    return fn.decoders.image(raw, device="cpu", output_type=output_type, **hint)


def _decoded(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray, first_epoch: int = 0):
    """Reader + decoder: returns (HWC image node, index node).

    Images are decoded with their own channel count, so a greyscale file in an RGB dataset is an error
    rather than silently expanded to three identical bands.
    """
    train = opts.train
    common = dict(shard_id=opts.shard_id, num_shards=opts.num_shards, pad_last_batch=True, name="reader",
                  shuffle_after_epoch=train, stick_to_shard=not train, prefetch_queue_depth=2)
    if dataset.kind == "shards":
        return _decoded_shards(dataset, opts, gpu, common)
    files = [dataset.samples[i].path for i in order]
    if dataset.kind == "image":
        raw, index = fn.readers.file(files=files, labels=[int(i) for i in order], **common)
        return _decode_images(raw, dataset, gpu), index
    if dataset.kind == "npy":
        on_gpu = gpu and numpy_reader_device(opts, files[0] if files else None) == "gpu"
        x = fn.readers.numpy(files=files, device="gpu" if on_gpu else "cpu", **common)
        if gpu and not on_gpu:
            x = x.gpu()
        index = fn.pad(fn.get_property(x, key="source_info"), axes=[0], shape=[_SOURCE_INFO_LEN])
        x = fn.reshape(x, layout="CHW")  # the numpy reader sets no layout; resize would read CHW as HWC
        x = fn.transpose(x, perm=[1, 2, 0], output_layout="HWC")
        return x, index
    hdu_numbers = fits_hdu_numbers(dataset) if gpu and dataset.kind in ("fits", "fits-bands") else None
    if hdu_numbers is not None:
        # DALI's FITS reader (tile-compressed HDUs decompressed on the GPU) reads ``order``, this rank's samples
        # of this epoch (DaliLoader rebuilds the pipeline each epoch), front to back: no reader-side sharding
        # or shuffling, so that the sample positions, which the reader does not report, are known. One reader
        # per band file, in lock-step, for one file per band.
        listed = LISTED_READER
        if dataset.kind == "fits":
            sources = [([dataset.samples[i].path for i in order], hdu_numbers)]
        else:
            sources = [([dataset.samples[i].band_paths[b] for i in order], hdu_numbers) for b in range(dataset.bands)]
        planes = []
        for k, (paths, hdus) in enumerate(sources):
            out = fn.experimental.readers.fits(files=paths, hdu_indices=hdus, device="gpu",
                                               name="reader" if k == 0 else f"reader{k}", **listed)
            planes += list(out) if isinstance(out, (list, tuple)) else [out]
        planes = [fn.reshape(fn.cast(q, dtype=types.FLOAT), layout="HW") for q in planes]
        x = fn.stack(*planes, axis=2, axis_name="C") if len(planes) > 1 else fn.expand_dims(
            planes[0], axes=[2], new_axis_names="C")
        index = fn.external_source(source=_ListedIndex(order), batch=False, dtype=types.INT64)
        return x, index
    # FITS (any arrangement) without DALI's FITS reader: astropy in a per-sample external source.
    src = _PythonSource(dataset, order, opts, first_epoch)
    x, index = fn.external_source(source=src, num_outputs=2, batch=False, layout=["HWC", None],
                                  dtype=[types.FLOAT, types.INT64])
    if gpu:
        x = x.gpu()
    return x, index


def _load_cufile() -> str | None:
    """Where ``libcufile.so.0`` (cuFile / GPUDirect Storage, which DALI's GPU numpy reader opens and its wheel
    does not ship) was loaded from, or None. Looked for on the library path, then in the ``nvidia-cufile``
    wheel that CUDA builds of torch bring; found there, it is loaded globally, so that DALI's own ``dlopen`` of
    the same name finds it."""
    import ctypes
    import ctypes.util
    import glob
    import importlib.util

    names = ["libcufile.so.0", ctypes.util.find_library("cufile")]
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        names += sorted(glob.glob(os.path.join(root, "cufile", "lib", "libcufile.so*")))
    for name in filter(None, names):
        try:
            ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    return None


_CUFILE: list = []
_CUFILE_VERDICT: dict = {}  # (st_dev of a data file, GPU) -> '' when cuFile reads that filesystem, else why not


def cufile_problem(path: str | None, device_id: int = 0, probe: bool = True) -> str:
    """'' when DALI's GPU numpy reader (cuFile) can read ``path``'s filesystem on GPU ``device_id``, else why not.

    A loadable ``libcufile.so.0`` is not enough: on the first GPU machine it loaded and every read then failed
    with "CUFile import failed: ... file descriptor is not registered" (the filesystem, or cuFile's own
    configuration, refused it). So one data file is read through a one-operator GPU pipeline, once per
    filesystem and GPU. ``probe=False`` (inside a pipeline definition, where no other pipeline may run) only
    uses an earlier verdict, else the library's presence."""
    if not _CUFILE:
        _CUFILE.append(_load_cufile())
    if not _CUFILE[0]:
        return "no libcufile.so.0 for its GPU reader"
    if path is None:
        return ""
    key = (os.stat(path).st_dev, device_id)
    if key not in _CUFILE_VERDICT:
        if not probe:
            return ""
        _CUFILE_VERDICT[key] = _probe_cufile(path, device_id)
    return _CUFILE_VERDICT[key]


def _probe_cufile(path: str, device_id: int) -> str:
    """Read ``path`` once with DALI's GPU numpy reader: '' when that works, else DALI's reason."""
    from nvidia.dali.pipeline import Pipeline

    where = os.path.dirname(os.path.abspath(path))
    try:
        pipe = Pipeline(batch_size=1, num_threads=1, device_id=device_id, prefetch_queue_depth=1)
        with pipe:
            pipe.set_outputs(fn.readers.numpy(files=[path], device="gpu"))
        pipe.build()
        pipe.run()
        del pipe
        return ""
    except RuntimeError as exc:
        return f"cuFile cannot read {where}: {dali_error(exc)[1][:300]}"


def numpy_reader_device(opts: LoaderOptions, path: str | None = None, probe: bool = False) -> str:
    """Device of the numpy reader on the GPU backend: ``"gpu"`` (read straight to the GPU with cuFile) when
    ``cufile_problem`` finds none for ``path`` (a file of the data set), else ``"cpu"`` (read on the CPU, then
    moved with ``.gpu()``). ``opts.extra['numpy_reader']`` = ``"gpu"``/``"cpu"`` forces one (``"auto"``, the
    default, decides)."""
    want = opts.extra.get("numpy_reader", "auto")
    if want in ("gpu", "cpu"):
        return want
    if want != "auto":
        raise ValueError(f"numpy_reader must be 'auto', 'gpu' or 'cpu', not {want!r}")
    return "cpu" if cufile_problem(path, opts.device_id or 0, probe) else "gpu"


def _shard_files(dataset: Dataset):
    """The dataset's shard plan and the (tar, index) files DALI reads (plain Python: kept from AutoGraph)."""
    from ..data.shards import shard_plan

    plan = shard_plan(dataset)
    return plan, plan.dali_files()


if HAVE_DALI:
    from nvidia.dali.pipeline import do_not_convert

    _shard_files = do_not_convert(_shard_files)
    fits_hdu_numbers = do_not_convert(fits_hdu_numbers)
    numpy_reader_device = do_not_convert(numpy_reader_device)


def _decoded_shards(dataset: Dataset, opts: LoaderOptions, gpu: bool, common: dict):
    """Packed WebDataset shards (``data/shards.py``) through ``fn.readers.webdataset`` and their DALI indexes.

    Outputs the pixels member (PNG/JPEG decoded like loose images; ``.npy`` with DALI's numpy decoder) and the
    ``idx`` member (the sample's key number, an int64 that ``DaliLoader._indices`` maps to a position). The
    webdataset reader ignores ``shuffle_after_epoch``: training shuffles with its random buffer instead
    (``initial_fill`` samples, ``opts.extra['shuffle_buffer']``, default 1024) over shards that ``pack`` has
    already shuffled; each rank keeps its contiguous part of the samples. Files are read, not memory-mapped
    (``opts.extra['mmap'] = True`` maps them).
    """
    plan, (paths, index_paths) = _shard_files(dataset)
    # plain reads, not mmap: mapped shards would count in the process's RSS as they are read (gigabytes over a
    # survey-sized epoch, which RSS-based job limits kill), while read() data lives in buffers DALI reuses
    wds = dict(common, stick_to_shard=True, shuffle_after_epoch=False, dont_use_mmap=not opts.extra.get("mmap", False))
    if opts.train:
        fill = int(opts.extra.get("shuffle_buffer", 1024))
        wds.update(random_shuffle=True, initial_fill=max(1, min(fill, len(dataset) // opts.num_shards)))
    raw, number = fn.readers.webdataset(paths=paths, index_paths=index_paths, ext=[plan.dali_ext, "idx"],
                                        dtypes=[types.UINT8, types.INT64], missing_component_behavior="error",
                                        **wds)
    if plan.member_kind == "image":
        return _decode_images(raw, dataset, gpu), number
    x = fn.decoders.numpy(raw, dtype=types.FLOAT)  # CPU only: (bands, H, W)
    if gpu:
        x = x.gpu()
    x = fn.reshape(x, layout="CHW")
    return fn.transpose(x, perm=[1, 2, 0], output_layout="HWC"), number


def define_pipeline(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray,
                    checkpoint: str | None | bool = False, first_epoch: int = 0):
    """The loader's DALI pipeline with its graph defined but not built. Defining needs no GPU, even for
    ``gpu=True`` (only ``build()`` does): ``tests/test_gpu_graphs.py`` checks the GPU graphs on the CPU.
    ``first_epoch``: the loader's epoch when the pipeline is built (a per-sample source counts from it)."""
    images_are_uint8 = dataset.pixel_kind == "image"
    channels = dataset.bands + int(opts.mask_channel)
    mean = list(opts.mean or [0.0] * channels)
    std = list(opts.std or [1.0] * channels)
    if images_are_uint8:  # images are normalised from 0..255 directly: (x/255 - m)/s = (x - 255 m)/(255 s)
        mean = [255.0 * m for m in mean]
        std = [255.0 * s for s in std]
    out_dtype = {"float32": types.FLOAT, "float16": types.FLOAT16, "uint8": types.UINT8}[opts.dtype]
    shape_hw = dataset.shape or (max(opts.scales),) * 2

    @pipeline_def(enable_conditionals=opts.augment, enable_checkpointing=checkpoint is not False)
    def pipe():
        img, index = _decoded(dataset, opts, gpu, order, first_epoch)
        shapes = img.shape(dtype=types.INT64)
        if not images_are_uint8:
            img = _float_steps(img, opts, dataset.bands)
        img = _augment(img, opts, shape_hw)
        outs = []
        for s in opts.scales:
            # GPU (and pinned) outputs preallocated for a cutout of this scale rather than grown batch by batch
            pixels = channels * s * s
            work = pixels * (1 if images_are_uint8 else 4)
            y = img
            if tuple(shape_hw) != (s, s) and opts.resize_mode == "crop":
                y = fn.crop(img, crop=[s, s], out_of_bounds_policy="pad", fill_values=0, bytes_per_sample_hint=work)
            elif tuple(shape_hw) != (s, s):
                # 8-bit images stay 8-bit until normalisation: a quarter of the memory of float intermediates
                y = fn.resize(img, size=[s, s], antialias=True, interp_type=types.INTERP_LINEAR,
                              dtype=types.UINT8 if images_are_uint8 else types.FLOAT, bytes_per_sample_hint=work)
            if opts.dtype == "uint8":
                if not images_are_uint8:
                    raise ValueError("dtype='uint8' output is only for 8-bit images")
                outs.append(fn.transpose(y, perm=[2, 0, 1], output_layout="CHW", bytes_per_sample_hint=pixels))
            else:
                outs.append(fn.crop_mirror_normalize(y, mean=mean, std=std, dtype=out_dtype, output_layout="CHW",
                                                     bytes_per_sample_hint=pixels * OUT_BYTES[opts.dtype]))
        return (*outs, index, shapes)

    threads = max(1, opts.workers)
    kwargs = dict(batch_size=opts.batch_size, num_threads=threads, device_id=opts.device_id if gpu else None,
                  seed=(opts.seed * 1009 + opts.shard_id) % (2 ** 31),
                  # CPU: one batch in flight is as fast here and ~130 MB lighter at batch 256 x 3 scales
                  prefetch_queue_depth=int(opts.extra.get("prefetch_queue_depth", 2 if gpu else 1)))
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    return pipe(**kwargs)


def _build(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray, checkpoint: str | None,
           first_epoch: int = 0):
    p = define_pipeline(dataset, opts, gpu, order, checkpoint, first_epoch)
    _BUILT[0] += 1
    p.build()
    return p


def _validate(dataset: Dataset, opts: LoaderOptions) -> None:
    """Refuse data that DALI's decoders may crash on, hang on or decode silently into wrong pixels, naming the
    files (``data.validate.validate``: once per dataset object; skipped with ``opts.extra['validate'] = False``),
    and a split too small to give every process (rank) a sample, which DALI reports only as
    "Critical error when building pipeline"."""
    if len(dataset) < opts.num_shards:
        raise DataError(f"{dataset.root} ({dataset.split}): {len(dataset)} sample(s) cannot be shared among "
                        f"{opts.num_shards} processes, each needs at least one; run fewer processes or give the "
                        f"{dataset.split} split more samples")
    if opts.extra.get("validate", True):
        from ..data.validate import validate

        validate(dataset)


_DATA_OPS = re.compile(r"(^|\.)(readers|decoders)\.|external_source")  # ops that read or decode the files
# failures of the machine, not of the data: no scan, DALI's message says it all
_DEVICE_FAILURE = re.compile(r"cuda|driver|cufile|nvjpeg|nvimgcodec|out of memory|libcu|\.so\b", re.IGNORECASE)
_DALI_NOISE = re.compile(r"^(Critical error in pipeline:?|Current pipeline object is no longer valid\.?)$")


def dali_error(exc: BaseException) -> tuple[str, str]:
    """(operator, message) from a DALI exception: the operator named in DALI's "Error in ... operator `...`" line
    ('' when none), and DALI's own message, the part after "encountered:" (the whole text when there is none)
    without DALI's header and trailer lines, on one line."""
    text = str(exc)
    found = re.search(r"Error in \w+ operator `([^`]+)`", text)
    body = text.split("encountered:", 1)[1] if "encountered:" in text else text
    lines = [ln.strip() for ln in body.splitlines() if ln.strip() and not _DALI_NOISE.match(ln.strip())]
    detail = " ".join(lines) or text.strip()
    return (found.group(1) if found else ""), detail[:2000]


class DaliLoader:
    """Contract batches from a DALI pipeline through ``DALIGenericIterator``.

    Policies: training uses ``LastBatchPolicy.DROP`` with ``shuffle_after_epoch`` (the whole file list is
    reshuffled every epoch, identically on all ranks, so shards stay disjoint); evaluation uses
    ``LastBatchPolicy.PARTIAL`` with ``pad_last_batch`` and ``stick_to_shard`` so each sample is returned
    exactly once. ``state_dict()`` holds DALI's reader/RNG checkpoint for mid-epoch resume.
    """

    def __init__(self, dataset: Dataset, opts: LoaderOptions, device: str = "cpu"):
        if not HAVE_DALI:
            raise RuntimeError("NVIDIA DALI is not installed; use backend='torchvision' "
                               "(pip install nvidia-dali-cuda120 on Linux)")
        self.dataset, self.opts = dataset, opts
        _validate(dataset, opts)
        self.gpu = device != "cpu"
        self.backend = "dali" if self.gpu else "dali-cpu"
        self.device = torch.device(f"cuda:{opts.device_id or 0}" if self.gpu else "cpu")
        if self.gpu and dataset.kind == "npy" and len(dataset):  # settle cuFile before any pipeline is defined
            numpy_reader_device(opts, dataset.samples[0].path, probe=True)
        self.order = base_permutation(len(dataset), opts.seed) if opts.train else np.arange(len(dataset))
        self._by_name = None
        # 8-bit images normalised with a positive std cannot become NaN/inf: only float data is checked
        self._check = BatchChecker(dataset, self.device, tta=opts.tta, check_finite=dataset.kind != "image")
        self.epoch, self._done = 0, 0
        self._checkpoint = None
        self._it = None

    @property
    def reads(self) -> str:
        """How this loader reads its data on the GPU, for the run log (empty on the CPU backend)."""
        if not self.gpu:
            return ""
        kind = self.dataset.kind
        if kind == "npy":
            first = self.dataset.samples[0].path if len(self.dataset) else None
            if numpy_reader_device(self.opts, first) == "gpu":
                return "DALI reads .npy on the GPU (cuFile)"
            why = cufile_problem(first, self.opts.device_id or 0, probe=False) \
                if self.opts.extra.get("numpy_reader", "auto") == "auto" else "numpy_reader='cpu'"
            return f"DALI reads .npy on the CPU and copies them to the GPU ({why})"
        if kind in ("fits", "fits-bands"):
            if self._dali_fits:
                return "DALI's GPU FITS reader reads the FITS files"
            return "astropy reads the FITS files (layout or compression DALI's GPU reader cannot decode exactly)"
        return ""

    def _drop(self) -> None:
        """Drop the pipeline, and hand the memory its pools kept back (DALI keeps device and pinned pools past
        a pipeline's end; the DALI-FITS path builds one per epoch)."""
        if self._it is None:
            return
        self._it = None
        gc.collect()  # the iterator and its pipeline may sit in reference cycles
        try:
            from nvidia.dali import backend as dali_backend_impl

            dali_backend_impl.ReleaseUnusedMemory()
        except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - an older DALI, or no CUDA at all
            pass

    @property
    def _dali_fits(self) -> bool:
        """FITS read by DALI's own (GPU) FITS reader rather than astropy in an external source."""
        return self.gpu and self.dataset.kind in ("fits", "fits-bands") and fits_hdu_numbers(self.dataset) is not None

    @property
    def checkpointable(self) -> bool:
        return self.dataset.kind in ("image", "npy", "shards")

    def _iterator(self):
        if self._it is None:
            order = self.listed_order() if self._dali_fits else self.order
            p = _build(self.dataset, self.opts, self.gpu, order, self._checkpoint if self.checkpointable else False,
                       first_epoch=self.epoch)
            names = [f"s{s}" for s in self.opts.scales] + ["index", "shape"]
            policy = LastBatchPolicy.DROP if self.opts.train else LastBatchPolicy.PARTIAL
            if self.checkpointable or self._dali_fits:
                self._it = DALIGenericIterator(p, names, reader_name="reader", last_batch_policy=policy,
                                               auto_reset=True)
            else:
                # the samples the source yields per epoch: training, only whole batches (the source ends the
                # epoch there, so the iterator must not expect the dropped partial batch to be read)
                size = _PythonSource.epoch_samples(len(self.dataset), self.opts)
                with warnings.catch_warnings():  # the external source pads shards itself, as DALI asks
                    warnings.filterwarnings("ignore", message=".*reader_name.*")
                    self._it = DALIGenericIterator(p, names, size=size, last_batch_policy=policy,
                                                   last_batch_padded=True, auto_reset=True)
        return self._it

    def listed_order(self) -> np.ndarray:
        """Dataset positions that DALI's FITS reader is handed for this rank in this epoch (see ``_decoded``)."""
        return self.order[epoch_order(len(self.order), self.epoch, self.opts)]

    def __len__(self) -> int:
        return batches_per_epoch(len(self.dataset), self.opts)

    def set_epoch(self, epoch: int) -> None:
        """DALI reshuffles internally each epoch (identically on every rank); epochs must be consumed in order."""
        if epoch != self.epoch and self._it is not None:
            warnings.warn(f"DALI loader is at epoch {self.epoch}; set_epoch({epoch}) only renumbers it", stacklevel=2)
        self.epoch = epoch

    def _indices(self, raw: torch.Tensor) -> torch.Tensor:
        if self.dataset.kind == "shards":  # key numbers from the packed 'idx' members -> dataset positions
            from ..data.shards import shard_plan

            return torch.from_numpy(shard_plan(self.dataset).positions(raw.reshape(-1).cpu().numpy()))
        if self.dataset.kind == "image":
            return raw.reshape(-1).long()
        if self._by_name is None:
            self._by_name = {s.path: i for i, s in enumerate(self.dataset.samples)}
        if raw.dtype != torch.uint8:
            return raw.reshape(-1).long()
        rows = raw.cpu().numpy()
        out = []
        for r in rows:
            name = bytes(r[r != 0]).decode()
            if name not in self._by_name:
                raise DataError(f"DALI returned an unknown file {name!r}")
            out.append(self._by_name[name])
        return torch.tensor(out, dtype=torch.long)

    def __iter__(self):
        self._done = 0
        if self._dali_fits:
            self._drop()  # a pipeline per epoch: its reader is given the epoch's order
        try:
            it = self._iterator()
            for out in it:
                out = out[0]
                index = self._indices(out["index"])
                if len(index) == 0:
                    continue
                images = {s: out[f"s{s}"] for s in self.opts.scales}
                batch = self._check(images, index, out["shape"])
                self._done += 1
                yield batch
        except DataError:
            raise
        except RuntimeError as exc:
            raise self._explain(exc) from exc
        self.epoch += 1
        self._done = 0

    def _explain(self, exc: RuntimeError) -> Exception:
        """Turn a DALI error into one that keeps DALI's own message (``dali_error``), or, when a reader or decoder
        failed on data, one that names the bad file(s), found by scanning the data set with this loader's options
        (NaN/inf are not a problem when ``mask_value`` masks them)."""
        self._drop()
        op, detail = dali_error(exc)
        if op and _DATA_OPS.search(op) and not _DEVICE_FAILURE.search(detail):
            from ..data.validate import find_problems

            problems = find_problems(self.dataset, max_problems=5, allow_nonfinite=self.opts.mask_value is not None)
            if problems:
                return DataError(f"bad input in {self.dataset.split} data: {'; '.join(problems)}")
        where = f" in {op}" if op else ""
        return RuntimeError(f"DALI pipeline failed on {self.dataset.split} data{where}: {detail}")

    def state_dict(self) -> dict:
        state = {"backend": self.backend, "epoch": self.epoch, "batches_done": self._done}
        if self._it is not None and self.checkpointable:
            state["dali"] = self._it.checkpoints()[0]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        if "dali" in state and self.checkpointable:
            self._checkpoint = state["dali"]
            self._drop()
        elif state.get("batches_done"):
            warnings.warn(f"{self.dataset.kind} data cannot be checkpointed by DALI: restarting epoch {self.epoch} "
                          "from its beginning", stacklevel=2)
