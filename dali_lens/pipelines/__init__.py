"""Every loader backend behind one factory and one batch contract (see ``batch.py``).

``build_loader(dataset, backend=..., scales=..., batch_size=..., train=...)`` returns an iterable with
``len()``, ``set_epoch()``, ``state_dict()``/``load_state_dict()``; iterating yields
``{"image": {scale: (B, C, s, s)}, "label": (B,), "index": (B,)}``. Trainers never import a backend.
"""
from __future__ import annotations

import warnings

import torch

from ..choices import BACKENDS
from ..data.dataset import Dataset
from . import dali_backend
from .options import LoaderOptions, auto_factors, compute_stats, estimate_noise, finish

_TRANSFORMS: dict = {}


def register_batch_transform(name: str, fn) -> None:
    """Add a batch-level augmentation usable by name (``LoaderOptions.transforms``, ``--batch-transforms``).

    ``fn(batch) -> batch`` receives a contract batch on the loader's device (so it runs on the GPU with the
    DALI GPU backend) and returns it, e.g. with extra noise added to ``batch["image"][scale]``.
    """
    _TRANSFORMS[name] = fn


class _Transformed:
    """A loader whose batches pass through registered batch transforms (same interface as the loader)."""

    def __init__(self, loader, names):
        missing = [n for n in names if n not in _TRANSFORMS]
        if missing:
            raise ValueError(f"unknown batch transform(s) {missing}; registered: {sorted(_TRANSFORMS)}")
        self.loader, self.fns = loader, [_TRANSFORMS[n] for n in names]

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            for fn in self.fns:
                batch = fn(batch)
            yield batch


class BackendError(ValueError, RuntimeError):
    """A backend this machine cannot run (an option error: every command reports it in one line, status 2)."""


def resolve_backend(backend: str = "auto", dataset: Dataset | None = None) -> str:
    """The one place that turns ``--backend`` into the backend that runs (every command and build_loader).

    ``auto``: DALI on the GPU when CUDA and DALI are there, else DALI's CPU backend, else torchvision; given
    the ``dataset``, its kind's ``auto_cpu_backend`` on a machine without CUDA: torchvision for FITS (DALI then
    reads FITS through astropy in one Python thread, torchvision's worker processes read them in parallel and
    were faster: benchmarks/results/challenge-fits-vm.json) and for other kinds without a DALI reader. An explicit backend is checked and kept.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        if not dali_backend.available():
            return "torchvision"
        if torch.cuda.is_available():
            return "dali"
        return dataset.data_kind.auto_cpu_backend if dataset is not None else "dali-cpu"
    if backend in ("dali", "dali-cpu") and not dali_backend.available():
        raise BackendError(f"backend {backend!r} needs NVIDIA DALI (pip install nvidia-dali-cuda120, Linux only); "
                           "use --backend torchvision")
    if backend == "dali" and not torch.cuda.is_available():
        raise BackendError("backend 'dali' needs a CUDA GPU; use 'dali-cpu' or 'torchvision' on this machine")
    return backend


def build_loader(dataset: Dataset, backend: str = "auto", options: LoaderOptions | None = None, **kwargs):
    """The one loader factory. ``kwargs`` are :class:`LoaderOptions` fields (scales, batch_size, train, ...)."""
    opts = options or LoaderOptions(**kwargs)
    if options is not None and kwargs:
        raise TypeError("pass either options= or keyword options, not both")
    if len(dataset) == 0:
        raise ValueError(f"{dataset.root} ({dataset.split}): no samples to load")
    name = resolve_backend(backend, dataset)
    if name == "dali" and opts.device_id is None:
        opts.device_id = torch.cuda.current_device()
    if opts.scaling == "auto" and not dataset.eight_bit:
        auto_factors(opts, dataset.bands)  # a missing or mismatched noise estimate fails here, not in a worker
    if opts.dtype == "uint8" and not dataset.eight_bit:
        raise ValueError("dtype='uint8' output is only for 8-bit images; use float32 or float16")
    if opts.train and len(dataset) // opts.num_shards < opts.batch_size:
        warnings.warn(f"{dataset.split}: {len(dataset)} samples over {opts.num_shards} shard(s) do not fill one "
                      f"batch of {opts.batch_size}; the training loader would be empty, using a smaller batch",
                      stacklevel=2)
        opts.batch_size = max(1, len(dataset) // opts.num_shards)
    if name == "torchvision" and dataset.data_kind.packed:  # packed shards: streamed with the webdataset library
        from .shards_torch import ShardsLoader

        return ShardsLoader(dataset, opts, device="cuda" if torch.cuda.is_available() else "cpu")
    if name == "torchvision":
        from .torchvision_backend import TorchvisionLoader

        loader = TorchvisionLoader(dataset, opts, device="cuda" if torch.cuda.is_available() else "cpu")
    else:
        loader = dali_backend.DaliLoader(dataset, opts, device="gpu" if name == "dali" else "cpu")
    return _Transformed(loader, opts.transforms) if opts.transforms else loader


__all__ = ["BACKENDS", "BackendError", "LoaderOptions", "build_loader", "compute_stats", "estimate_noise", "finish", "register_batch_transform",
           "resolve_backend"]
