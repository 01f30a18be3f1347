"""The one description of a dataset that every loader backend consumes."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
FITS_EXTS = (".fits", ".fit", ".fts", ".fits.gz", ".fits.fz")
NPY_EXTS = (".npy",)
KINDS = ("image", "npy", "fits", "fits-bands", "shards")


class DataError(ValueError):
    """A problem with the user's data; the message names the file and the problem."""


class _NoMeta(Mapping):
    """The one empty, read-only ``meta`` shared by samples without catalogue columns (pickles as itself)."""

    __slots__ = ()

    def __getitem__(self, key):
        raise KeyError(key)

    def __iter__(self):
        return iter(())

    def __len__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self):
        return (_no_meta, ())


def _no_meta() -> "_NoMeta":
    return _NO_META


_NO_META = _NoMeta()


@dataclass(frozen=True, slots=True)
class Sample:
    """One cutout.

    ``path`` is absolute. For per-band files (one file per band) ``band_paths`` lists them in band order
    and ``path`` is the first. ``label`` is 1 for a lens, 0 for a non-lens, ``None`` when unlabelled.
    ``meta`` holds numeric catalogue columns (e.g. ``einstein_area``); samples without any share one empty
    read-only mapping. Slots keep a sample at ~280 bytes: survey-scale sets hold millions of them.
    """

    path: str
    label: int | None
    id: str
    band_paths: tuple[str, ...] = ()
    meta: Mapping[str, float] = field(default_factory=_no_meta, compare=False, hash=False)

    @property
    def files(self) -> tuple[str, ...]:
        return self.band_paths or (self.path,)


@dataclass
class Dataset:
    """A list of samples plus what a loader must know to read them.

    ``kind`` is ``'image'`` (PNG/JPEG), ``'npy'`` (float arrays shaped (bands, H, W)), ``'fits'`` (one file
    per sample, one band per HDU or one 3-D HDU) or ``'fits-bands'`` (one FITS file per band per sample), or
    ``'shards'`` (a packed set, see ``data/shards.py``: sample paths are ``<shard>.tar#<member>``).
    """

    samples: list[Sample]
    bands: int
    kind: str
    root: str
    split: str = "train"
    hdus: tuple[int | str, ...] | None = None
    shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown dataset kind {self.kind!r}; expected one of {KINDS}")

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def pixel_kind(self) -> str:
        """``'image'`` for 8-bit PNG/JPEG pixels (loose or packed), else the float kind (packed: ``'npy'``)."""
        if self.kind != "shards":
            return self.kind
        return "image" if self.samples and kind_of(self.samples[0].path) == "image" else "npy"

    @property
    def labelled(self) -> bool:
        return all(s.label is not None for s in self.samples)

    @property
    def labels(self) -> list[int]:
        return [-1 if s.label is None else int(s.label) for s in self.samples]

    def counts(self) -> dict[str, int]:
        labels = self.labels
        return {"lens": labels.count(1), "nonlens": labels.count(0), "unlabelled": labels.count(-1)}

    def subset(self, indices, split: str | None = None) -> "Dataset":
        return Dataset([self.samples[i] for i in indices], self.bands, self.kind, self.root,
                       split or self.split, self.hdus, self.shape)

    def describe(self) -> str:
        c = self.counts()
        shape = "x".join(map(str, self.shape)) if self.shape else "?"
        text = f"{self.split}: {len(self)} {self.kind} samples ({c['lens']} lens, {c['nonlens']} non-lens"
        if c["unlabelled"]:
            text += f", {c['unlabelled']} unlabelled"
        return text + f"), {self.bands} band(s), {shape} px"


def kind_of(path: str) -> str | None:
    """The dataset kind a file belongs to, by extension; None if not a supported file."""
    low = path.lower()
    if low.endswith(IMAGE_EXTS):
        return "image"
    if low.endswith(NPY_EXTS):
        return "npy"
    if low.endswith(FITS_EXTS):
        return "fits"
    return None


def sample_id(path: str) -> str:
    name = os.path.basename(path)
    for ext in sorted(IMAGE_EXTS + FITS_EXTS + NPY_EXTS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


def parse_hdus(text) -> tuple[int | str, ...] | None:
    """``--hdus`` text (``"1,2,3"`` or ``"G,R,I"``, mixed allowed) as HDU indices and EXTNAMEs; None if empty."""
    if not text:
        return None
    if isinstance(text, (list, tuple)):
        return tuple(text)
    return tuple(int(h) if h.strip().lstrip("-").isdigit() else h.strip() for h in str(text).split(","))
