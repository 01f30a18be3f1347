"""The input setup ``predict`` and ``evaluate`` share: the ensemble, the data it scores and the loader backend.

:func:`load_scoring_inputs` is the one place that sets PyTorch's threads, loads the ensemble, reads DATA with
its FITS HDUs (``--hdus``, else the checkpoint's) and its hold-out split, checks the data against the
ensemble, resolves the backend and drops bad files (``--skip-bad``), in that order.
"""
from __future__ import annotations

from typing import Any, NamedTuple

from .cli import log


class ScoringInputs(NamedTuple):
    """What :func:`load_scoring_inputs` sets up."""

    ensemble: Any            # inference.Ensemble
    dataset: Any             # data.dataset.Dataset, bad files dropped with skip_bad
    backend: str             # the resolved loader backend
    device: Any              # torch.device
    hdus: tuple | None       # the FITS HDUs read: --hdus, else the checkpoint's


def load_scoring_inputs(checkpoint: list[str], data: list[str], split: str, *, backend: str = "auto",
                        threads: int | None = None, hdus: str | None = None, skip_bad: bool = False,
                        device=None, say=log, select=None) -> ScoringInputs:
    """The ensemble, dataset, backend, device and HDUs for scoring ``data``'s ``split`` with ``checkpoint``: a backend
    this machine lacks fails (BackendError) before anything is loaded; ``device`` (default: CUDA when present,
    else the CPU); ``select(dataset)`` (e.g. a ``--shard`` part) picks the cutouts to score before bad files
    are looked for; bad files are dropped and listed through ``say`` with ``skip_bad``. Raises DataError,
    CheckpointError or BackendError naming the file or option."""
    import torch

    from .data.dataset import parse_hdus
    from .data.inputs import gather_inputs
    from .inference import check_dataset, load_ensemble
    from .pipelines import resolve_backend

    resolve_backend(backend)
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if threads:
        torch.set_num_threads(threads)
    ens = load_ensemble(checkpoint, device)
    hdus = parse_hdus(hdus) or ens.pixels.hdus
    dataset = gather_inputs(data, split, hdus, float(ens.config.get("val_fraction", 0.15)),
                            int(ens.config.get("seed", 0)))
    check_dataset(ens, dataset)
    backend = resolve_backend(backend, dataset)
    if select is not None:
        dataset = select(dataset)
    if skip_bad:
        from .data.validate import drop_bad

        dataset = drop_bad(dataset, allow_nonfinite=ens.pixels.mask_value is not None, log=say)
    return ScoringInputs(ens, dataset, backend, device, hdus)
