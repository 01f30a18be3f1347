"""DALI backend: one pipeline definition for the CPU (``device_id=None``) and the GPU.

Per sample: read -> decode once -> (float data: mask, scaling) -> one dihedral transform and shift drawn
once -> ``fn.resize`` to each requested scale from the same decoded image -> normalise + HWC->CHW + cast.
Only the device differs between CPU and GPU: ``'mixed'`` decoding (JPEG on nvJPEG, PNG on the CPU then
moved to the GPU), the GPU numpy/FITS readers, and every later op on the GPU.
"""
from __future__ import annotations

import gc
import re
import warnings

import numpy as np
import torch

from ..dali_messages import dali_error
from ..data.dataset import DataError, Dataset
from .batch import BatchChecker
from .options import LoaderOptions, auto_factors, base_permutation, batches_per_epoch, epoch_order, shard_bounds

try:  # DALI is optional: the package falls back to torchvision without it
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

    HAVE_DALI = True
except ImportError:  # pragma: no cover - exercised only where DALI is missing
    HAVE_DALI = False

OUT_BYTES = {"float32": 4, "float16": 2, "uint8": 1}  # bytes per value of each output dtype


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
        self.labels = np.asarray(dataset.labels)[files_order] if _balanced(opts) else None

    def shard(self, epoch: int) -> np.ndarray:
        return self.order[epoch_order(len(self.order), epoch, self.opts, self.labels)]

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


def _kind_source(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray, reader_args: dict):
    """The kind's DALI reader and decoder (``Kind.dali_source``), or None (plain Python: kept from AutoGraph).
    ``--sampler balanced``: a reader that reads a list of files (images, ``.npy``) is handed this epoch's
    balanced order front to back (:func:`_orderable`); other kinds are read by the per-sample source."""
    if _balanced(opts):
        if not _orderable(dataset, gpu):
            return None
        from ..data.kinds.fits import LISTED_READER

        reader_args = dict(LISTED_READER, name="reader")
    return dataset.data_kind.dali_source(dataset, opts, gpu, order, reader_args)


def _balanced(opts: LoaderOptions) -> bool:
    return opts.train and opts.sampler == "balanced"


def _orderable(dataset: Dataset, gpu: bool) -> bool:
    """``--sampler balanced`` on DALI: the kind's reader reads a given list of files in order (``Kind.dali_ordered``:
    PNG/JPEG, .npy that DALI reads exactly, FITS where DALI's GPU reader is listed already); other kinds go
    through the per-sample source, which reads any kind by position."""
    return dataset.data_kind.dali_ordered(dataset, gpu)


if HAVE_DALI:
    from nvidia.dali.pipeline import do_not_convert

    _kind_source = do_not_convert(_kind_source)


def _decoded(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray, first_epoch: int = 0,
             skip: int = 0):
    """Reader + decoder (+ injection): returns (HWC image node, index node, injected-flag node or None).

    With ``opts.inject`` the decoded batch is painted right here, before any other step touches the pixels
    (``injecting.dali_paint``: one batched torch call per batch; ``skip``: the batches of ``first_epoch``
    already done when a checkpoint is restored).

    The dataset's kind reads and decodes (``Kind.dali_source``: images with their own channel count, so that a
    greyscale file in an RGB dataset is an error rather than silently expanded to three identical bands). A
    kind without a DALI reader (FITS on a machine without CUDA, kinds added with ``register_kind`` that only
    ``read``) is read by its ``read`` in a per-sample external source (:class:`_PythonSource`), then moved to
    the GPU on the GPU backend.
    """
    train = opts.train
    common = dict(shard_id=opts.shard_id, num_shards=opts.num_shards, pad_last_batch=True, name="reader",
                  shuffle_after_epoch=train, stick_to_shard=not train, prefetch_queue_depth=2)
    nodes = _kind_source(dataset, opts, gpu, order, common)
    python_source = nodes is None
    if python_source:
        src = _PythonSource(dataset, order, opts, first_epoch)
        x, index = fn.external_source(source=src, num_outputs=2, batch=False, layout=["HWC", None],
                                      dtype=[types.FLOAT, types.INT64])
        if gpu:
            x = x.gpu()
        nodes = x, index
    if opts.inject is None:
        return (*nodes, None)
    from .injecting import dali_paint

    x, flag = dali_paint(nodes[0], nodes[1], opts, dataset, gpu, first_epoch, skip, python_source)
    return x, nodes[1], flag


def define_pipeline(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray,
                    checkpoint: str | None | bool = False, first_epoch: int = 0, skip: int = 0):
    """The loader's DALI pipeline with its graph defined but not built. Defining needs no GPU, even for
    ``gpu=True`` (only ``build()`` does): ``tests/test_gpu_graphs.py`` checks the GPU graphs on the CPU.
    ``first_epoch``: the loader's epoch when the pipeline is built (a per-sample source counts from it)."""
    images_are_uint8 = dataset.eight_bit
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
        img, index, injected = _decoded(dataset, opts, gpu, order, first_epoch, skip)
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
        return (*outs, index, shapes) + ((injected,) if injected is not None else ())

    threads = max(1, opts.workers)
    kwargs = dict(batch_size=opts.batch_size, num_threads=threads, device_id=opts.device_id if gpu else None,
                  # --sampler balanced builds a pipeline per epoch: its augmentation seeded per epoch too
                  seed=(opts.seed * 1009 + opts.shard_id
                        + (7919 * first_epoch if _balanced(opts) and _orderable(dataset, gpu) else 0)) % (2 ** 31),
                  # CPU: one batch in flight is as fast here and ~130 MB lighter at batch 256 x 3 scales
                  # (injection on the CPU: 2, so that the one-thread painter overlaps the next batch's decoding)
                  prefetch_queue_depth=int(opts.prefetch_queue_depth or (2 if gpu or opts.inject is not None else 1)))
    if checkpoint:
        kwargs["checkpoint"] = checkpoint
    return pipe(**kwargs)


def _build(dataset: Dataset, opts: LoaderOptions, gpu: bool, order: np.ndarray, checkpoint: str | None,
           first_epoch: int = 0, skip: int = 0):
    p = define_pipeline(dataset, opts, gpu, order, checkpoint, first_epoch, skip)
    _BUILT[0] += 1
    p.build()
    return p


def _validate(dataset: Dataset, opts: LoaderOptions) -> None:
    """Refuse data that DALI's decoders may crash on, hang on or decode silently into wrong pixels, naming the
    files (``data.validate.validate``: once per dataset object; skipped with ``opts.validate = False``),
    and a split too small to give every process (rank) a sample, which DALI reports only as
    "Critical error when building pipeline"."""
    if len(dataset) < opts.num_shards:
        raise DataError(f"{dataset.root} ({dataset.split}): {len(dataset)} sample(s) cannot be shared among "
                        f"{opts.num_shards} processes, each needs at least one; run fewer processes or give the "
                        f"{dataset.split} split more samples")
    if opts.validate:
        from ..data.validate import validate

        validate(dataset)


_DATA_OPS = re.compile(r"(^|\.)(readers|decoders)\.|external_source")  # ops that read or decode the files
# failures of the machine, not of the data: no scan, DALI's message says it all
_DEVICE_FAILURE = re.compile(r"cuda|driver|cufile|nvjpeg|nvimgcodec|out of memory|libcu|\.so\b", re.IGNORECASE)
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
        if self.gpu:  # what needs a running GPU (cuFile's probe), settled before any pipeline is defined
            dataset.data_kind.dali_prepare(dataset, opts)
        self.order = (base_permutation(len(dataset), opts.seed) if opts.train and not _balanced(opts)
                      else np.arange(len(dataset)))
        self._by_name = None
        # 8-bit images normalised with a positive std cannot become NaN/inf: only float data is checked
        self._check = BatchChecker(dataset, self.device, tta=opts.tta, check_finite=not dataset.eight_bit)
        self.epoch, self._done = 0, 0
        self._checkpoint = None
        self._complete = False  # restored from a state taken at the epoch's last batch: nothing left of it
        self._restored_done = 0  # batches of the epoch done in the restored DALI state (injection's call count)
        self._it = None

    @property
    def reads(self) -> str:
        """How this loader reads its data on the GPU, for the run log (empty on the CPU backend)."""
        return self.dataset.data_kind.dali_reads(self.dataset, self.opts) if self.gpu else ""

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
    def _listed(self) -> bool:
        """The kind's DALI reader is handed this rank's samples of each epoch in order (DALI's GPU FITS reader):
        a pipeline per epoch."""
        return self.dataset.data_kind.dali_listed(self.dataset, self.gpu) or (
            _balanced(self.opts) and _orderable(self.dataset, self.gpu))

    @property
    def checkpointable(self) -> bool:
        if _balanced(self.opts) and not _orderable(self.dataset, self.gpu):
            return False  # the per-sample source (read by position, in the balanced order)
        return self.dataset.data_kind.dali_checkpointable(self.dataset)

    def _iterator(self):
        if self._it is None:
            order = self.listed_order() if self._listed else self.order
            restoring = self._checkpoint is not None and self.checkpointable
            p = _build(self.dataset, self.opts, self.gpu, order, self._checkpoint if self.checkpointable else False,
                       first_epoch=self.epoch, skip=self._restored_done if restoring else 0)
            self._checkpoint = None  # restored once: a pipeline built later starts afresh
            names = [f"s{s}" for s in self.opts.scales] + ["index", "shape"]
            if self.opts.inject is not None:
                names.append("injected")
            policy = LastBatchPolicy.DROP if self.opts.train else LastBatchPolicy.PARTIAL
            if self.checkpointable or self._listed:
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
        """Dataset positions that a listed reader (DALI's FITS reader) is handed for this rank in this epoch."""
        labels = np.asarray(self.dataset.labels)[self.order] if _balanced(self.opts) else None
        return self.order[epoch_order(len(self.order), self.epoch, self.opts, labels)]

    def __len__(self) -> int:
        return batches_per_epoch(len(self.dataset), self.opts)

    def set_epoch(self, epoch: int) -> None:
        """DALI reshuffles internally each epoch (identically on every rank); epochs must be consumed in order."""
        if epoch != self.epoch and self._it is not None:
            warnings.warn(f"DALI loader is at epoch {self.epoch}; set_epoch({epoch}) only renumbers it", stacklevel=2)
        self.epoch = epoch

    def _indices(self, raw: torch.Tensor) -> torch.Tensor:
        """Dataset positions from the index output: the kind's mapping (packed key numbers), the position itself
        (an integer), or a file name DALI's reader reports (bytes)."""
        positions = self.dataset.data_kind.dali_positions(self.dataset, raw)
        if positions is not None:
            return positions
        if raw.dtype != torch.uint8:
            return raw.reshape(-1).long()
        if self._by_name is None:
            self._by_name = {s.path: i for i, s in enumerate(self.dataset.samples)}
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
        if self._complete:  # DALI's state is already past this epoch's last batch: it starts the next epoch
            self._complete = False
            self._restored_done = 0  # the restored state starts the next epoch at its first batch
            self.epoch += 1
            return
        if self._listed:
            self._drop()  # a pipeline per epoch: its reader is given the epoch's order
        try:
            it = self._iterator()
            for out in it:
                out = out[0]
                index = self._indices(out["index"])
                if len(index) == 0:
                    continue
                images = {s: out[f"s{s}"] for s in self.opts.scales}
                batch = self._check(images, index, out["shape"], injected=out.get("injected"))
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
        elif self._checkpoint is not None:  # restored, and no pipeline built since: still that state
            state["dali"] = self._checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``: mid-epoch, at its batch; taken after an epoch's last batch (before the
        iterator saw the epoch end), this epoch yields nothing more and the next one follows."""
        self.epoch = int(state["epoch"])
        self._complete = 0 < len(self) <= int(state.get("batches_done", 0))
        if "dali" in state and self.checkpointable:
            self._checkpoint = state["dali"]
            self._restored_done = int(state.get("batches_done", 0))
            self._drop()
        elif state.get("batches_done") and not self._complete:
            warnings.warn(f"{self.dataset.kind} data cannot be checkpointed by DALI: restarting epoch {self.epoch} "
                          "from its beginning", stacklevel=2)
