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
from .api import describe
from .data.dataset import DataError, Dataset, Sample
from .data.kinds import Kind, register_kind
from .data.sources import register_source
from .pipelines import BACKENDS, LoaderOptions, build_loader, compute_stats, register_batch_transform



def __getattr__(name: str):
    """``train`` and ``predict`` are the CLI modules made callable, imported on first use.

    ``dali_lens.train(...)`` runs :func:`dali_lens.api.train` and ``dali_lens.train.main(argv)`` is the
    command line: one name whatever was imported first, and ``python -m dali_lens.train`` stays clean.
    """
    if name in ("train", "predict"):
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
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
    "register_batch_transform",
    "register_kind",
    "register_source",
    "train",
]
