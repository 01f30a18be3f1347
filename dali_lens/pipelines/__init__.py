"""Every loader backend behind one factory and one batch contract (see ``batch.py``).

``build_loader(dataset, backend=..., scales=..., batch_size=..., train=...)`` returns an iterable with
``len()``, ``set_epoch()``, ``state_dict()``/``load_state_dict()``; iterating yields
``{"image": {scale: (B, C, s, s)}, "label": (B,), "index": (B,)}``. Trainers never import a backend.
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Callable

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
        self.loader, self.fns = loader, [_TRANSFORMS[n] for n in names]

    @staticmethod
    def check(names) -> None:
        missing = [n for n in names if n not in _TRANSFORMS]
        if missing:
            raise ValueError(f"unknown batch transform(s) {missing}; registered: {sorted(_TRANSFORMS)}")

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


@dataclass(frozen=True)
class Backend:
    """One loader backend: ``available()`` (True, or False / a one-line reason when this machine cannot run
    it) and ``factory(dataset, options)``, which returns the backend's loader (see the module docstring)."""

    name: str
    available: Callable[[], bool | str]
    factory: Callable[[Dataset, LoaderOptions], object]


#: every loader backend by name, fed by :func:`register_backend` (``backend="auto"`` is not one of them)
_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, available: Callable[[], bool | str], factory) -> Backend:
    """Add (or replace) the loader backend ``name``: ``build_loader(dataset, backend=name)`` then calls
    ``factory(dataset, options)`` when ``available()`` is True (a string or False: the backend is refused with
    that reason). ``factory`` gets its own copy of the :class:`LoaderOptions`, already settled (device, batch
    size, auto scaling checked), and returns an iterable with ``len()``, ``set_epoch()`` and
    ``state_dict()``/``load_state_dict()`` yielding contract batches (``batch.BatchChecker`` makes them);
    batch transforms are applied by ``build_loader`` around every backend. Returns the entry."""
    if not name or name == "auto" or not callable(available) or not callable(factory):
        raise TypeError(f"register_backend needs a name other than 'auto' and two callables, not {name!r}")
    _BACKENDS[name] = entry = Backend(name, available, factory)
    return entry


def unregister_backend(name: str) -> None:
    """Remove a registered backend (tests)."""
    _BACKENDS.pop(name, None)


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, in registration order (the built-in ones are ``BACKENDS[1:]``)."""
    return tuple(_BACKENDS)


def _unavailable(name: str) -> str:
    """Why backend ``name`` cannot run here ('' when it can)."""
    verdict = _BACKENDS[name].available()
    if verdict is True:
        return ""
    return f"backend {name!r} {verdict or 'is not available on this machine'}"


def _torchvision(dataset: Dataset, opts: LoaderOptions):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # packed shards: streamed with the webdataset library (--sampler balanced: read by position, in its order)
    if dataset.data_kind.packed and not (opts.train and opts.sampler == "balanced"):
        from .shards_torch import ShardsLoader

        return ShardsLoader(dataset, opts, device=device)
    from .torchvision_backend import TorchvisionLoader

    return TorchvisionLoader(dataset, opts, device=device)


_NO_DALI = "needs NVIDIA DALI (pip install nvidia-dali-cuda120, Linux only); use --backend torchvision"
register_backend("dali", lambda: _NO_DALI if not dali_backend.available() else (
    torch.cuda.is_available() or "needs a CUDA GPU; use 'dali-cpu' or 'torchvision' on this machine"),
    lambda dataset, opts: dali_backend.DaliLoader(dataset, opts, device="gpu"))
register_backend("dali-cpu", lambda: dali_backend.available() or _NO_DALI,
                 lambda dataset, opts: dali_backend.DaliLoader(dataset, opts, device="cpu"))
register_backend("torchvision", lambda: True, _torchvision)


def resolve_backend(backend: str = "auto", dataset: Dataset | None = None) -> str:
    """The one place that turns ``--backend`` into the backend that runs (every command and build_loader).

    ``auto``: DALI on the GPU when CUDA and DALI are there, else DALI's CPU backend, else torchvision; given
    the ``dataset``, its kind's ``auto_cpu_backend`` on a machine without CUDA: torchvision for FITS (DALI then
    reads FITS through astropy in one Python thread, torchvision's worker processes read them in parallel and
    were faster: benchmarks/results/challenge-fits-vm.json) and for other kinds without a DALI reader. An
    explicit backend (any registered one) is checked against its ``available()`` and kept.
    """
    if backend != "auto" and backend not in _BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose from {('auto', *_BACKENDS)}")
    if backend == "auto":
        if not _unavailable("dali"):
            return "dali"
        if _unavailable("dali-cpu"):
            return "torchvision"
        return dataset.data_kind.auto_cpu_backend if dataset is not None else "dali-cpu"
    problem = _unavailable(backend)
    if problem:
        raise BackendError(problem)
    return backend


def build_loader(dataset: Dataset, backend: str = "auto", options: LoaderOptions | None = None, **kwargs):
    """The one loader factory. ``kwargs`` are :class:`LoaderOptions` fields (scales, batch_size, train, ...);
    ``options`` is copied, never changed."""
    if options is not None and kwargs:
        raise TypeError("pass either options= or keyword options, not both")
    opts = copy.copy(options) if options is not None else LoaderOptions(**kwargs)
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
    _Transformed.check(opts.transforms)  # unknown names fail before a backend starts workers or pipelines
    loader = _BACKENDS[name].factory(dataset, opts)
    return _Transformed(loader, opts.transforms) if opts.transforms else loader  # the one place, every backend


__all__ = ["BACKENDS", "Backend", "BackendError", "LoaderOptions", "backend_names", "build_loader", "compute_stats",
           "estimate_noise", "finish", "register_backend", "register_batch_transform", "resolve_backend",
           "unregister_backend"]
