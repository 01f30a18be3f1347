"""dali-lens: fast data loading (NVIDIA DALI, torchvision fallback) and trainers for strong-lens finders.

The public surface::

    import dali_lens
    splits = dali_lens.describe("data/")                      # {split: Dataset} from any supported source
    loader = dali_lens.build_loader(splits["train"], backend="auto", scales=(64, 112), batch_size=64,
                                    train=True)               # iterable with len(), set_epoch()
    for batch in loader:                                      # {"image": {64: ..., 112: ...}, "label", "index"}
        ...
    dali_lens.train("data/", arch="resnet18", epochs=10)     # the trainers, as on the command line
    dali_lens.predict("runs/r18", "cutouts/", "scores.csv")   # streaming, resumable scoring

Everything not exported here is private and may change.
"""
from ._version import __version__

#: the public names and the module each comes from, imported on first use: ``import dali_lens`` (and so every
#: ``python -m dali_lens.<command>`` and the benchmarks' parent processes, which use ``data.io``) loads
#: neither torch nor DALI until a name that needs them is used
_EXPORTS = {"describe": ".api", "DataError": ".data.dataset", "Dataset": ".data.dataset", "Sample": ".data.dataset",
            "register_source": ".data.sources", "BACKENDS": ".choices", "LoaderOptions": ".pipelines",
            "build_loader": ".pipelines", "compute_stats": ".pipelines", "register_batch_transform": ".pipelines",
            "register_backend": ".pipelines", "train": ".api", "predict": ".api",
            "Kind": ".data.kinds", "register_kind": ".data.kinds"}


def __getattr__(name: str):
    """The public names, imported on first use (see ``_EXPORTS``).

    ``train`` and ``predict`` are the library functions of :mod:`dali_lens.api`; their commands live in
    :mod:`dali_lens.commands` (``dali_lens/train.py`` and ``predict.py`` are ``python -m`` shims).
    """
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "DataError",
    "Dataset",
    "Kind",
    "LoaderOptions",
    "Sample",
    "__version__",
    "build_loader",
    "compute_stats",
    "describe",
    "predict",
    "register_backend",
    "register_batch_transform",
    "register_kind",
    "register_source",
    "train",
]
