"""The Python entry points behind ``import dali_lens`` (the same options as the command line)."""
from __future__ import annotations

import os

from .data.dataset import Dataset
from .data.sources import discover


def describe(path: str, hdus: tuple[int | str, ...] | None = None, val_fraction: float = 0.15,
             seed: int = 0) -> dict[str, Dataset]:
    """Describe the dataset at ``path`` (any supported source) as ``{split: Dataset}``.

    Layouts: class folders, CSV manifests, FITS, ``.npy``, the lens-finding-challenge layout, packed shards,
    and any source added with :func:`dali_lens.register_source`. Without a ``val`` split, a seeded,
    stratified ``val_fraction`` of ``train`` is held out.
    """
    return discover(path, hdus=hdus, val_fraction=val_fraction, seed=seed)


def train(data_root: str | None = None, **options) -> dict:
    """Train like ``python -m dali_lens.train``; keyword names are the CLI flags with ``_`` for ``-``.

    Example: ``dali_lens.train("data/", arch="resnet18", img_size=96, epochs=10, out="runs/r18")``.
    Returns the final metrics (also written to ``<out>/metrics.json``).
    """
    from .trainers.config import TrainConfig
    from .trainers.runner import run

    return run(TrainConfig(data_root=data_root, **options))


def predict(checkpoint: str | list[str], data: str | list[str], out: str, **options) -> str:
    """Score ``data`` with one checkpoint or an ensemble like ``python -m dali_lens.predict``.

    Writes ``out`` (``file,id,label,score[,member scores]``; resumable) and returns its path. ``options`` are the
    CLI flags with ``_`` for ``-`` (``backend``, ``batch_size``, ``tta``, ``fusion``, ``workers``, ``split``,
    ``hdus``, ``skip_bad``, ``limit``, ``threads``, ``progress``; see
    :func:`dali_lens.predictions.predict_files`). Bad input raises ``DataError`` (or ``PredictError`` /
    ``CheckpointError``), naming the file.
    """
    from .cli import check_options, scoring_parser
    from .predictions import predict_files

    check_options(scoring_parser(), options)  # the ranges of the command's flags
    options.setdefault("progress", False)
    predict_files([checkpoint] if isinstance(checkpoint, str) else list(checkpoint),
                  [data] if isinstance(data, str) else list(data), out, **options)
    return os.path.abspath(out)


def _callable_module(name: str, fn) -> None:
    """Let ``dali_lens.train(...)`` / ``dali_lens.predict(...)`` keep working after ``import dali_lens.train``.

    Importing a submodule sets it as an attribute of the package, replacing the function of the same name;
    making the module object callable (delegating to the function) keeps the public API intact.
    """
    import sys
    import types

    class _Module(types.ModuleType):
        __call__ = staticmethod(fn)

    sys.modules[name].__class__ = _Module
