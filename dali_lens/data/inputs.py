"""What a scoring command reads: one :class:`Dataset` from every DATA argument it is given.

Files, folders, CSV manifests, list files (``.txt``/``.lst``/``.list``, one path per line) and dataset roots
(any layout ``sources.discover`` knows), concatenated in the order given; ``predict``, ``evaluate`` and
``inspect`` use it.
"""
from __future__ import annotations

import os

from ..cli import log
from .dataset import DataError, Dataset, Sample, kind_of, sample_id, supported_files
from .io import open_text
from .shards import PackedSamples

SPLIT_ORDER = ("train", "val", "test", "predict")


def ordered_splits(splits) -> list[str]:
    """The names of ``splits`` in ``SPLIT_ORDER``, then any others in their own order."""
    return [s for s in SPLIT_ORDER if s in splits] + [s for s in splits if s not in SPLIT_ORDER]
LIST_EXTS = (".txt", ".lst", ".list")


def _from_list_file(path: str) -> list[Sample]:
    base = os.path.dirname(os.path.abspath(path))
    samples = []
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            full = os.path.abspath(os.path.join(base, os.path.expanduser(entry)))
            if not os.path.isfile(full):
                raise DataError(f"{path}, line {lineno}: file not found: {full}")
            if kind_of(full) is None:
                raise DataError(f"{path}, line {lineno}: {full}: unsupported file type "
                                f"(dali-lens reads {supported_files()})")
            samples.append(Sample(full, None, sample_id(full)))
    if not samples:
        raise DataError(f"{path}: the list names no files")
    return samples


def _concat(parts: list[Dataset], root: str, split: str) -> Dataset:
    ref = parts[0]
    for d in parts:
        if d.bands != ref.bands or d.kind != ref.kind:
            raise DataError(f"{d.samples[0].path}: {d.bands} band(s) of {d.kind} data, but "
                            f"{ref.samples[0].path} has {ref.bands} band(s) of {ref.kind} data")
        if d.shape and ref.shape and d.shape != ref.shape:
            raise DataError(f"{d.samples[0].path}: {d.shape[0]}x{d.shape[1]} px, but {ref.samples[0].path} is "
                            f"{ref.shape[0]}x{ref.shape[1]} px; score differently sized cutouts separately")
    listings = {id(getattr(d.samples, "listing", None)) for d in parts}
    if len(listings) == 1 and isinstance(ref.samples, PackedSamples):  # the splits of one packed set: stays compact
        samples, dups = PackedSamples.concat([d.samples for d in parts])
    else:
        samples, dups = _concat_lists(parts)
    if dups:
        log(f"note: {dups} file(s) given more than once are scored once")
    return Dataset(samples, ref.bands, ref.kind, root, split, ref.hdus, ref.shape)


def _concat_lists(parts: list[Dataset]) -> tuple[list[Sample], int]:
    samples, seen, dups = [], set(), 0
    for d in parts:
        for s in d.samples:
            if s.path in seen:
                dups += 1
                continue
            seen.add(s.path)
            samples.append(s)
    return samples, dups


def gather_inputs(data: list[str], split: str = "all", hdus=None, val_fraction: float = 0.0,
                  seed: int = 0) -> Dataset:
    """One :class:`Dataset` from every DATA argument (files, folders, manifests, list files, dataset roots)."""
    from .sources import discover, explicit_splits, make_dataset

    parts: list[Dataset] = []
    whole = []  # parts used whole because their data has no splits of its own
    loose: list[Sample] = []
    for arg in data:
        path = os.path.abspath(os.path.expanduser(arg))
        if not os.path.exists(path):
            raise DataError(f"{path}: no such file or directory")
        if os.path.isfile(path) and path.lower().endswith(LIST_EXTS):
            loose.extend(_from_list_file(path))
            continue
        if os.path.isfile(path) and not path.lower().endswith(".csv"):
            if kind_of(path) is None:
                raise DataError(f"{path}: not a dataset folder, CSV manifest, list file or supported image file")
            loose.append(Sample(path, None, sample_id(path)))
            continue
        splits = discover(path, hdus=hdus, val_fraction=val_fraction if split not in ("all", "predict") else 0.0,
                          seed=seed)
        if split == "all":
            parts.extend(splits[s] for s in ordered_splits(splits))
        elif split in splits:
            parts.append(splits[split])
        elif len(splits) == 1 and "predict" in splits:
            parts.append(splits["predict"])  # unlabelled files have no splits: --split does not apply
        elif not explicit_splits(path):  # class folders, the challenge layout: 'val' is only a training hold-out
            every = discover(path, hdus=hdus, val_fraction=0.0, seed=seed)
            got = [every[s] for s in ordered_splits(every)]
            parts += got
            whole += got
            log(f"note: {path} has no splits of its own (no train/val/test folders or manifests): using all "
                f"{sum(len(d) for d in every.values())} samples, not a '{split}' split")
        else:
            raise DataError(f"{path}: no '{split}' split (found: {', '.join(splits)}); use --split all for every one")
    if loose:
        kinds = {kind_of(s.path) for s in loose}
        if len(kinds) > 1:
            raise DataError(f"{loose[0].path}: mixed file types {sorted(kinds)}; score one format at a time")
        parts.append(make_dataset(loose, os.path.commonpath([os.path.dirname(s.path) for s in loose]), "predict", hdus))
    if not parts:
        raise DataError("no input data given")
    root = parts[0].root if len(parts) == 1 else os.path.commonpath([p.root for p in parts])
    return _concat(parts, root, "all" if len(whole) == len(parts) else split)
