"""The Python entry points behind ``import dali_lens`` (the same options as the command line)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from .data.dataset import Dataset
from .data.sources import discover

if TYPE_CHECKING:  # (torch and DALI load on first use: only a name that needs them imports them)
    from .checkpoint import MemberSpec


def describe(path: str, hdus: tuple[int | str, ...] | None = None, val_fraction: float = 0.15,
             seed: int = 0) -> dict[str, Dataset]:
    """Describe the dataset at ``path`` (any supported source) as ``{split: Dataset}``.

    Layouts: class folders, CSV manifests, FITS, ``.npy``, the lens-finding-challenge layout, packed shards,
    and any source added with :func:`dali_lens.register_source`. Without a ``val`` split, a seeded,
    stratified ``val_fraction`` of ``train`` is held out.
    """
    return discover(path, hdus=hdus, val_fraction=val_fraction, seed=seed)


def train(data_root: str | tuple[str, ...] | None = None, *, out: str | None = None, resume: bool = False,
          allow_config_change: bool = False, val_fraction: float = 0.15,
          hdus: tuple[int | str, ...] | None | str = None,
          skip_bad: bool = False, backend: str = "auto", workers: int | None = None, dtype: str = "auto",
          norm: str = "stats", scaling: str = "auto", scale_a: float = 1.0, mask_value: float | str | None = "auto",
          mask_channel: bool = False, resize_mode: str = "resize", max_shift: int = 2,
          batch_transforms: tuple[str, ...] | str = (),
          tta: bool = False, trainer: str = "single", arch: str = "small_cnn", img_size: int = 64,
          stem: str = "auto", scales: tuple[int, ...] | str = (48, 64, 96), schedule: str = "all",
          progressive_epochs: int = 2,
          consistency: str = "none", consistency_weight: float = 0.1, micro_batch: int = 0,
          memory_budget: str = "auto",
          members: tuple[MemberSpec, ...] | str = "small_cnn:48:0,small_cnn:64:1,resnet18:64:2",
          fusion: str = "mean_prob", weights: str | None = None, epochs: int = 6, batch_size: int = 64,
          lr: float = 0.002, weight_decay: float = 0.0001, lr_schedule: str = "cosine", patience: int = 4,
          amp: str = "auto", channels_last: bool = True, seed: int = 0, checkpoint_every: int = 0,
          threshold: float = 0.5, gallery: bool = True, progress: bool = True,
          # --- issue 24: metrics and curves ---
          at_n: tuple[int, ...] | str = (10, 100, 1000), prior: float = 0.001, tensorboard: bool = True,
          # issue 24: fine-tuning (timm, weights)
          freeze_epochs: int = 0, trainable_blocks: int | None = None, layer_decay: float | None = None,
          head_lr: float | None = None,
          # issue 24: imbalance and labels
          pos_weight: str | float | None = None, sampler: str = "shuffle",
          labels: tuple[str, ...] | None | str = None, grade1: str = "drop", grade1_weight: float = 0.5,
          label_conflict: str = "file", source_weight: str | None = None,
          # --- issue 25: injection ---
          inject: float = 0.0, inject_theta_e: tuple[float, float] | str = (0.8, 2.0),
          inject_source_re: tuple[float, float] | str = (0.1, 0.4),
          inject_sersic_n: tuple[float, float] | str = (0.5, 2.0),
          inject_snr: tuple[float, float] | str = (10.0, 50.0), inject_offset: float = 0.1,
          pixel_scale: float = 0.2, psf_fwhm: tuple[float, ...] | None | str = None, psf: str | None = None,
          inject_colours: tuple[float, ...] | None | str = None, inject_eval: bool = False) -> dict:
    """Train a lens finder like ``python -m dali_lens.train`` and return the final metrics (also written to
    ``<out>/metrics.json``).

    The parameters are :class:`dali_lens.trainers.config.TrainConfig`'s fields, one for each command-line flag
    (``img_size`` is ``--img-size``; ``python -m dali_lens.train --help`` says what each does), with the same
    defaults; ``data_root=None`` trains on the built-in synthetic set. The list options take their values
    (``scales=(64, 112)``, ``members=(MemberSpec("small_cnn", (32,), 0), ...)``, ``hdus=(1, "G")``) or the
    command line's text (``scales="64,112"``, ``members="small_cnn:32:0,resnet18:64:1"``): the same config.
    (``members``' default is written as text so that ``import dali_lens`` and :func:`describe` need not load
    the trainers to build MemberSpecs; it is TrainConfig's default, tests/test_api.py.)
    Example: ``dali_lens.train("data/", arch="resnet18", img_size=96, epochs=10, out="runs/r18")``.
    Bad input raises ``DataError`` or ``ValueError`` (``BackendError`` among them), naming the file or option.
    """
    options = dict(locals())  # the parameters, exactly TrainConfig's fields (tests/test_api.py); nothing else yet
    from .trainers.config import TrainConfig
    from .trainers.runner import run

    return run(TrainConfig(**options))


def predict(checkpoint: str | list[str], data: str | list[str], out: str, **options) -> str:
    """Score ``data`` with one checkpoint or an ensemble like ``python -m dali_lens.predict``.

    Writes ``out`` (``file,id,label,score[,member scores]``; resumable) and returns its path. ``options`` are the
    CLI flags with ``_`` for ``-`` (``backend``, ``batch_size``, ``tta``, ``fusion``, ``workers``, ``split``,
    ``hdus``, ``skip_bad``, ``limit``, ``top``, ``threads``, ``progress``, ``embeddings``, and ``shard="I/N"``,
    which writes part I's own output, ``prediction_parts.shard_path(out, I, N)``; see
    :func:`dali_lens.predictions.predict_files`). Bad input raises ``DataError`` (or ``PredictError`` /
    ``CheckpointError`` / ``BackendError``), naming the file or option.
    """
    from .cli import check_options, scoring_parser
    from .predictions import predict_files

    check_options(scoring_parser(), options)  # the ranges of the command's flags
    options.setdefault("progress", False)
    predict_files([checkpoint] if isinstance(checkpoint, str) else list(checkpoint),
                  [data] if isinstance(data, str) else list(data), out, **options)
    return os.path.abspath(out)
