"""Load trained checkpoints as an ensemble and score data with it, batch by batch.

This is the shared core of ``python -m dali_lens.predict`` and ``python -m dali_lens.evaluate``:

* :func:`load_ensemble` reads one or more checkpoints (``best.pt`` / ``last.pt`` written by the trainers, or
  a run directory, meaning its ``best.pt``), rebuilds every member (architecture, scales, temperature) in
  eval mode and collects the loader settings stored with them (per-band mean/std, flux scaling, mask value,
  FITS HDUs). Several checkpoints form one ensemble: their members are concatenated. They must agree on the
  band count and on the non-linear pixel steps (scaling, ``scale_a``, mask value, HDUs); different per-band
  mean/std are allowed and corrected exactly per member (normalisation is affine per band, so it commutes
  with the resize).
* :func:`loader_options` gives the :class:`~dali_lens.pipelines.LoaderOptions` for an evaluation loader that
  decodes every image once and produces the union of all members' scales.
* :func:`score_batches` streams a loader: per batch ``(indices, labels, {member: logits})`` with each
  member's logits averaged over its scales and over the 8 test-time-augmentation views
  (``scoring.member_logits``, as in the trainer's validation and test passes). Nothing is accumulated, so
  memory stays bounded whatever the number of cutouts.
* :meth:`Ensemble.probabilities` turns member logits into member probabilities, the fused ensemble score
  (``mean_prob``, ``mean_logit`` or ``temperature`` with the temperatures stored in the checkpoints) and the
  spread between members.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointError, MemberState, PixelSettings
from .data.dataset import DataError, Dataset, get_kind
from .pipelines.options import LoaderOptions
from .scoring import FUSIONS, amp_dtype, channels_last_on, member_logits, probabilities

__all__ = ["FUSIONS", "CheckpointError", "LoadedMember", "Ensemble", "resolve_checkpoint", "load_ensemble",
           "loader_options", "score_batches", "check_dataset"]


@dataclass
class LoadedMember:
    """One trained model ready for inference."""

    name: str
    arch: str
    scales: tuple[int, ...]
    temperature: float
    model: torch.nn.Module
    checkpoint: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    # per-band affine correction (scale, shift) from the loader's normalisation to this member's; None = same
    correction: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class Ensemble:
    """Members plus the loader settings their checkpoints were trained with."""

    members: list[LoadedMember]
    bands: int
    pixels: PixelSettings                          # the first checkpoint's (the loader's) pixel settings
    device: torch.device
    checkpoints: list[str]
    config: dict = field(default_factory=dict)   # the first checkpoint's training config
    fusion: str = "mean_prob"                      # the training run's fusion (the default at inference)
    amp_dtype: torch.dtype | None = None
    channels_last: bool = True

    @property
    def scales(self) -> tuple[int, ...]:
        """The union of every member's scales (one loader produces all of them from one decode)."""
        return tuple(sorted({s for m in self.members for s in m.scales}))

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @property
    def temperatures(self) -> dict[str, float]:
        return {m.name: m.temperature for m in self.members}

    def describe(self) -> str:
        parts = [f"{m.name} (T={m.temperature:.3g})" if m.temperature != 1.0 else m.name for m in self.members]
        return f"{len(self.members)} member(s): " + ", ".join(parts)

    def probabilities(self, logits: dict[str, np.ndarray], fusion: str = "mean_prob"
                      ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """``(ensemble score, {member: probability}, member spread)`` from member logits.

        Member probabilities are ``sigmoid(z / T)`` with the stored temperature ``T`` under ``temperature``
        fusion and ``sigmoid(z)`` otherwise. The ensemble score is their mean (``mean_prob``,
        ``temperature``) or ``sigmoid(mean z)`` (``mean_logit``). The spread is the standard deviation of
        the member probabilities (0 for a single member).
        """
        return probabilities(logits, fusion, self.temperatures if fusion == "temperature" else None)


# ---------------------------------------------------------------------------------------------------------
# loading


def resolve_checkpoint(path: str) -> str:
    """A checkpoint file, or a run directory (its ``best.pt``); a clear error when there is none."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isdir(path):
        best = os.path.join(path, "best.pt")
        if os.path.isfile(best):
            return best
        last = os.path.join(path, "last.pt")
        hint = f" (there is {last}: pass it explicitly to use the last epoch)" if os.path.isfile(last) else ""
        raise CheckpointError(f"{path}: run directory without best.pt{hint}")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: checkpoint not found")
    return path


def _unique_names(members: list[LoadedMember]) -> None:
    """Members with the same name (e.g. two single-model runs) are prefixed with their run directory."""
    names = [m.name for m in members]
    if len(set(names)) == len(names):
        return
    for m in members:
        if names.count(m.name) > 1:
            m.name = f"{os.path.basename(os.path.dirname(m.checkpoint)) or 'run'}/{m.name}"
    seen: dict[str, int] = {}
    for m in members:
        k = seen.get(m.name, 0)
        seen[m.name] = k + 1
        if k:
            m.name = f"{m.name}~{k + 1}"


def load_ensemble(checkpoints: list[str] | str, device: torch.device | str | None = None) -> Ensemble:
    """Rebuild the members of one or more checkpoints on ``device`` (default: CUDA if present, else CPU)."""
    if isinstance(checkpoints, (str, os.PathLike)):
        checkpoints = [os.fspath(checkpoints)]
    if not checkpoints:
        raise CheckpointError("no checkpoint given")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                          else "cpu")
    paths = [resolve_checkpoint(c) for c in checkpoints]
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise CheckpointError(f"{dup}: the same checkpoint is given twice")
    members: list[LoadedMember] = []
    first: Checkpoint | None = None
    fusions = []
    for path in paths:
        ck = Checkpoint.load(path)
        ck.pixels = ck.pixels.for_inference()
        if first is None:
            first = ck
        else:
            _check_same_input(path, ck, paths[0], first)
        if len(ck.members) > 1:  # the run's --fusion combined its members (whatever trainer made them)
            fusions.append(ck.config.get("fusion", "mean_prob"))
        members += [_rebuild_member(path, ck, ms, device) for ms in ck.members]
        del ck
    _unique_names(members)
    cfg = first.config
    ens = Ensemble(members=members, bands=first.bands, pixels=first.pixels, device=device, checkpoints=paths,
                   config=cfg, fusion=fusions[0] if fusions and len(set(fusions)) == 1 else "mean_prob",
                   amp_dtype=amp_dtype(cfg.get("amp", "auto"), device),
                   channels_last=bool(cfg.get("channels_last", True)))
    _set_corrections(ens)
    return ens


def _same(a, b) -> bool:
    """Equal, a NaN mask value (``--mask-value nan``) equal to itself."""
    return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def _check_same_input(path: str, ck: Checkpoint, ref_path: str, ref: Checkpoint) -> None:
    """Checkpoints of one ensemble agree on the bands and on every pixel step but the normalisation (mean/std,
    corrected per member) and the kind of float data (FITS or .npy: the same floats)."""
    mine = {"bands": ck.bands, **ck.pixels.to_dict()}
    theirs = {"bands": ref.bands, **ref.pixels.to_dict()}
    for key in ("bands", "scaling", "scale_a", "noise_sigma", "mask_value", "mask_channel", "resize_mode", "hdus"):
        if not _same(mine[key], theirs[key]):
            raise CheckpointError(f"{path}: {key} = {mine[key]!r} but {ref_path} has {theirs[key]!r}; "
                                  "checkpoints of one ensemble must be trained on the same kind of input")
    if not _kind_of(path, ck.pixels).same_pixels(_kind_of(ref_path, ref.pixels)):
        raise CheckpointError(f"{path}: trained on {mine['kind']} data but {ref_path} on {theirs['kind']} data")


def _kind_of(path: str, pixels: PixelSettings):
    """The kind object of the pixels a checkpoint (``path``) was trained on; CheckpointError naming ``path`` when
    that kind is not registered here."""
    try:
        return get_kind(pixels.kind)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None


def _rebuild_member(path: str, ck: Checkpoint, ms: MemberState, device: torch.device) -> LoadedMember:
    """One member of checkpoint ``ck`` (read from ``path``) in eval mode on ``device``."""
    from .models import build_model

    spec = ms.spec
    try:
        model = build_model(spec.arch, in_chans=ck.bands + int(ck.pixels.mask_channel), img_size=max(spec.scales),
                            stem=ck.config.get("stem", "auto"))
        model.load_state_dict(ms.model)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild member {spec.name!r} "
                              f"({str(exc).strip().splitlines()[0][:200]})") from None
    return LoadedMember(name=spec.name, arch=spec.arch, scales=spec.scales, temperature=ms.temperature,
                        model=model.to(device).eval(), checkpoint=path, mean=ck.pixels.mean, std=ck.pixels.std)


def _set_corrections(ens: Ensemble) -> None:
    """Per-member affine maps from the loader's normalisation (the first checkpoint's) to the member's own."""
    c = ens.bands + int(ens.pixels.mask_channel)
    ref_m = np.array(ens.pixels.mean or [0.0] * c, dtype=np.float64)
    ref_s = np.array(ens.pixels.std or [1.0] * c, dtype=np.float64)
    for m in ens.members:
        mm = np.array(m.mean or [0.0] * c, dtype=np.float64)
        ms = np.array(m.std or [1.0] * c, dtype=np.float64)
        if len(mm) != c or len(ms) != c:
            raise CheckpointError(f"{m.checkpoint}: normalisation has {len(mm)} band(s), expected {c}")
        if np.array_equal(mm, ref_m) and np.array_equal(ms, ref_s):
            m.correction = None
            continue
        # x_loader = (raw - ref_m) / ref_s  ->  x_member = (raw - mm) / ms = x_loader * ref_s/ms + (ref_m - mm)/ms
        scale = torch.tensor(ref_s / ms, dtype=torch.float32, device=ens.device).view(c, 1, 1)
        shift = torch.tensor((ref_m - mm) / ms, dtype=torch.float32, device=ens.device).view(c, 1, 1)
        m.correction = (scale, shift)


def check_dataset(ens: Ensemble, dataset: Dataset) -> None:
    """The data must have the band count (and the kind of pixels) the checkpoints were trained on."""
    where = dataset.samples[0].path if len(dataset) else dataset.root
    if dataset.bands != ens.bands:
        raise DataError(f"{where}: the data has {dataset.bands} band(s) but {ens.checkpoints[0]} was trained "
                        f"on {ens.bands}")
    if not dataset.data_kind.pixels(dataset).same_pixels(_kind_of(ens.checkpoints[0], ens.pixels)):  # (packed: their pixels)
        raise DataError(f"{where}: {dataset.pixel_kind} data, but {ens.checkpoints[0]} was trained on "
                        f"{ens.pixels.kind} data (8-bit images and float arrays are normalised differently)")


def loader_options(ensemble: Ensemble, batch_size: int = 64, tta: bool = False, shard_id: int = 0,
                   num_shards: int = 1, workers: int | None = None) -> LoaderOptions:
    """Evaluation-loader options: every member's scale from one decode, the checkpoint's normalisation.

    8-bit images come out of the loader as uint8 and are normalised on the model's device per scale
    (:func:`score_batches`), which keeps the loader's batches four times smaller than float32.
    """
    return LoaderOptions(scales=ensemble.scales, batch_size=int(batch_size), train=False, augment=False,
                         shard_id=shard_id, num_shards=num_shards, num_workers=workers, tta=bool(tta),
                         **ensemble.pixels.pixel_fields(),
                         dtype="uint8" if get_kind(ensemble.pixels.kind).eight_bit else "float32")


# ---------------------------------------------------------------------------------------------------------
# scoring


@torch.inference_mode()
def score_batches(ensemble: Ensemble, loader, embeddings: bool = False
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """Per batch of ``loader``: ``(indices, labels, {member name: logits})`` as numpy arrays.

    ``indices`` point into the loader's dataset; ``labels`` are -1 for unlabelled samples. A member's logits
    are the mean over its scales and, with TTA batches ``(B, 8, C, s, s)``, over the 8 views. ``embeddings``:
    each tuple has a fourth item, ``{member name: (B, D) float32}``, the member's pooled feature vectors
    (``scoring.member_logits``'s ``features``, averaged alike).
    """
    device, channels_last = ensemble.device, ensemble.channels_last
    if channels_last_on(device, channels_last):
        for m in ensemble.members:
            m.model.to(memory_format=torch.channels_last)
    for batch in loader:
        feats: dict[str, list] = {m.name: [] for m in ensemble.members} if embeddings else {}
        logits = {m.name: member_logits(m.model, batch["image"], m.scales, device, amp=ensemble.amp_dtype,
                                        norm=(ensemble.pixels.mean, ensemble.pixels.std), channels_last=channels_last,
                                        correction=m.correction, features=feats.get(m.name)).cpu().numpy()
                  for m in ensemble.members}
        out = batch["index"].cpu().numpy().astype(np.int64), batch["label"].cpu().numpy().astype(np.int64), logits
        yield (*out, {k: v[0].cpu().numpy().astype(np.float32) for k, v in feats.items()}) if embeddings else out
