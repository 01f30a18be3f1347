"""The torchvision fallback: a Dataset + DataLoader that returns the same batches as the DALI backends.

Decoding is the kind's (``Kind.decode_torch``): ``torchvision.io.decode_image`` for JPEG, Pillow for PNG
(torchvision's libpng decoder segfaults on a corrupt data stream), numpy for ``.npy``, astropy for FITS; each sample is decoded once and resized to
every scale with the same antialiased bilinear filter DALI uses. The dataset is validated once first
(``data/validate.py``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io  # noqa: F401 - imported here, before workers start, not once per worker (JPEG decoding)
from torch.utils.data import DataLoader

from ..data.dataset import DataError, Dataset
from .batch import BatchChecker
from .options import LoaderOptions, augment_params, batches_per_epoch, centre_offset, epoch_order, prescale


def decode(dataset: Dataset, index: int, allow_nonfinite: bool = False) -> np.ndarray:
    """Sample ``index`` decoded and checked by its kind (``Kind.decode_torch``)."""
    return dataset.data_kind.decode_torch(dataset, index, allow_nonfinite)


def transform(x: torch.Tensor, opts: LoaderOptions, params) -> dict[int, torch.Tensor]:
    """(C, H, W) float -> {scale: (C, s, s)}: augment once, resize to each scale, normalise."""
    fh, fv, tr, dy, dx = params
    if tr:
        x = x.transpose(-2, -1)
    if fh:
        x = x.flip(-1)
    if fv:
        x = x.flip(-2)
    if dy or dx:
        x = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
        if dy > 0:
            x[:, :dy] = 0
        elif dy < 0:
            x[:, dy:] = 0
        if dx > 0:
            x[:, :, :dx] = 0
        elif dx < 0:
            x[:, :, dx:] = 0
    mean = torch.tensor(opts.mean or [0.0] * x.shape[0]).view(-1, 1, 1)
    std = torch.tensor(opts.std or [1.0] * x.shape[0]).view(-1, 1, 1)
    out = {}
    for s in opts.scales:
        if tuple(x.shape[-2:]) == (s, s):
            y = x
        elif opts.resize_mode == "crop":
            y = _crop_or_pad(x, s)
        else:
            y = F.interpolate(x[None], size=(s, s), mode="bilinear", antialias=True, align_corners=False)[0]
        if opts.dtype == "uint8":
            out[s] = (y * 255.0).round().clamp(0, 255).to(torch.uint8)
            continue
        y = (y - mean) / std
        out[s] = y.half() if opts.dtype == "float16" else y
    return out


def _crop_or_pad(x: torch.Tensor, s: int) -> torch.Tensor:
    """Centre crop (or zero-pad) (C, H, W) to (C, s, s) with DALI's ``fn.crop`` rounding."""
    out = x.new_zeros((x.shape[0], s, s))
    oy, ox = centre_offset(x.shape[1], s), centre_offset(x.shape[2], s)
    ys, xs = max(oy, 0), max(ox, 0)
    yd, xd = max(-oy, 0), max(-ox, 0)
    h, w = min(x.shape[1] - ys, s - yd), min(x.shape[2] - xs, s - xd)
    out[:, yd:yd + h, xd:xd + w] = x[:, ys:ys + h, xs:xs + w]
    return out


class _Samples(torch.utils.data.Dataset):
    """Map-style dataset indexed by (sample index, epoch) so persistent workers see the current epoch."""

    def __init__(self, dataset: Dataset, opts: LoaderOptions):
        self.dataset, self.opts = dataset, opts

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys):
        """One worker call per batch (the DataLoader's fetcher calls it with the batch's keys): decode each
        sample; with injection, paint the batch's arcs in one batched call (native pixels, data units); then
        prescale, augment, resize, normalise each."""
        raw = [decode(self.dataset, i, self.opts.mask_value is not None) for i, _ in keys]
        flags = None
        if self.opts.inject is not None:
            from .injecting import paint_arrays

            raw, flags = paint_arrays(self.opts.inject, raw, [i for i, _ in keys], keys[0][1], self.dataset.labels)
        out = []
        for k, ((i, epoch), arr) in enumerate(zip(keys, raw)):
            x = torch.from_numpy(np.ascontiguousarray(prescale(arr, self.dataset.pixel_kind, self.opts)))
            params = (augment_params(self.opts.seed + 7919 * self.opts.shard_id, epoch, i, self.opts.max_shift)
                      if self.opts.augment else (0, 0, 0, 0, 0))
            out.append((transform(x, self.opts, params), i) + ((flags[k],) if flags is not None else ()))
        return out


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) in this shard's order for the loader's current epoch (and resume offset)."""

    def __init__(self, owner: "TorchvisionLoader"):
        self.owner = owner

    def __len__(self) -> int:
        return len(self.owner._order)

    def __iter__(self):
        epoch = self.owner.epoch
        return iter([(int(i), epoch) for i in self.owner._order])


class WorkerLoader:
    """What the torchvision-side loaders share: a DataLoader over worker processes, the batch loop, and
    epoch / resume bookkeeping (``len()``, ``set_epoch()``, ``state_dict()``/``load_state_dict()``).

    A subclass builds ``self._loader`` with :meth:`_dataloader` and implements :meth:`_begin`, which readies
    the epoch ``self.epoch`` from batch ``skip`` on and says whether any batch is left.
    """

    backend = "torchvision"

    def __init__(self, dataset: Dataset, opts: LoaderOptions, device: str, check_finite: bool = True):
        self.dataset, self.opts, self.device = dataset, opts, torch.device(device)
        self._check = BatchChecker(dataset, self.device, tta=opts.tta, check_finite=check_finite)
        self.epoch, self._done, self._skip = 0, 0, 0

    def _dataloader(self, data, workers: int, **kw) -> DataLoader:
        _refuse_in_spawned_bootstrap()
        context = _worker_context() if workers else None
        if context == "spawn" and not _main_is_guarded():
            import sys
            import warnings

            warnings.warn(f"{sys.modules['__main__'].__file__} has no `if __name__ == \"__main__\":` guard, and the "
                          f"loader's worker processes must be spawned here (this process runs DALI pipelines or "
                          "CUDA, which forked workers would crash): spawned workers re-run the whole script. "
                          f"Loading in this process instead of {workers} worker(s) (slower); put the script's "
                          "code under such a guard to use workers", stacklevel=4)
            workers, context = 0, None
        return DataLoader(data, num_workers=workers, pin_memory=self.device.type == "cuda",
                          persistent_workers=workers > 0, worker_init_fn=_one_thread,
                          prefetch_factor=2 if workers else None, multiprocessing_context=context, **kw)

    def _begin(self, skip: int) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        return batches_per_epoch(len(self.dataset), self.opts)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._done = skip
        if self._begin(skip):
            try:
                for images, index, *injected in self._loader:
                    images = {s: t.to(self.device, non_blocking=True) for s, t in images.items()}
                    batch = self._check(images, index, injected=injected[0] if injected else None)
                    self._done += 1
                    yield batch
            except DataError as exc:  # re-raised from a worker with its traceback: keep the message only
                last = str(exc).strip().splitlines()[-1]
                raise DataError(last.split("DataError: ", 1)[-1]) from None
        self.epoch += 1
        self._done = 0

    def state_dict(self) -> dict:
        return {"backend": self.backend, "epoch": self.epoch, "batches_done": self._done}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._skip = int(state.get("batches_done", 0))


class TorchvisionLoader(WorkerLoader):
    """Iterable of contract batches with ``len()``, ``set_epoch()`` and resumable ``state_dict()``.

    Workers persist across epochs. They are forked, unless this process already runs DALI pipelines or CUDA:
    forking those threads crashes workers, so then they are spawned. Spawned workers re-run the main script,
    so a script without an ``if __name__ == "__main__":`` guard gets no workers (in-process loading, with
    a warning) instead of re-running itself in every worker; a loader built while a spawned worker re-runs
    the script raises at once.
    """

    def __init__(self, dataset: Dataset, opts: LoaderOptions, device: str = "cpu"):
        if opts.validate:  # corrupt files refused by name before a decoder sees them (once)
            from ..data.validate import validate

            validate(dataset)
        super().__init__(dataset, opts, device, check_finite=not dataset.eight_bit)
        self._order: list[int] = []
        # worker processes only pay off past a few hundred samples (spawning one costs seconds)
        workers = self.opts.workers if len(dataset) >= 256 else 0
        self._loader = self._dataloader(_Samples(dataset, opts), workers, batch_size=opts.batch_size,
                                        sampler=_EpochSampler(self), drop_last=opts.train)

    def _begin(self, skip: int) -> bool:
        labels = self.dataset.labels if self.opts.sampler == "balanced" else None
        order = epoch_order(len(self.dataset), self.epoch, self.opts, labels).tolist()
        self._order = order[skip * self.opts.batch_size:]
        return bool(self._order)


def _worker_context() -> str:
    import sys

    from .dali_backend import pipelines_built

    if pipelines_built() or (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return "spawn"
    return "fork" if sys.platform.startswith("linux") else "spawn"


def _main_is_guarded() -> bool:
    """Whether spawned workers can re-import the main module without re-running the user's code: no main
    file (interactive, ``python -c``), or one with a top-level ``if __name__ == "__main__":``."""
    import ast
    import sys

    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not path.endswith(".py"):
        return True
    try:
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return True  # cannot tell: keep the workers
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare) and len(node.test.comparators) == 1:
            sides = [node.test.left, node.test.comparators[0]]
            names = {n.id for n in sides if isinstance(n, ast.Name)}
            consts = {n.value for n in sides if isinstance(n, ast.Constant)}
            if names == {"__name__"} and consts == {"__main__"}:
                return True
    return False


def _refuse_in_spawned_bootstrap() -> None:
    """A spawned worker re-running the parent's main script must not build loaders (and spawn workers of its
    own): that re-runs the user's whole job once per worker. Fail at once with what to do."""
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError("a loader was built while a spawned worker process re-ran the main script: put the "
                           "script's code under `if __name__ == \"__main__\":` (spawned workers re-import the "
                           "script; see the README's Python example)")


def _one_thread(_):
    torch.set_num_threads(1)
