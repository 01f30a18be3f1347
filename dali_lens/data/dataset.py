"""The one description of a dataset that every loader backend consumes."""
from __future__ import annotations

import os
import re
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..choices import HDUS

#: The registry's table, ``{name: kind object}``: filled by ``dali_lens.data.kinds`` (``register_kind``), which
#: the ``dali_lens.data`` package imports first. It lives here so that a Dataset resolves its kind without
#: importing the kinds, which import this module.
KINDS: dict = {}


_TRUE = {"1", "lens", "true", "yes", "1.0"}
_FALSE = {"0", "nonlens", "non-lens", "non_lens", "false", "no", "0.0"}


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
    return NO_META


#: The one empty, read-only ``meta`` of samples without catalogue columns.
NO_META = _NoMeta()


@dataclass(frozen=True, slots=True)
class Sample:
    """One cutout.

    ``path`` is absolute. For per-band files (one file per band) ``band_paths`` lists them in band order
    and ``path`` is the first. ``label`` is 1 for a lens, 0 for a non-lens, ``None`` when unlabelled.
    ``meta`` holds the catalogue columns (e.g. ``einstein_area``, ``ra``, ``tile``): numbers where the cell parses
    as one (``int`` for an integer, so object IDs stay exact; ``float`` otherwise), else the text
    (:func:`catalogue_value`); samples without any share one empty read-only mapping. Slots keep a sample at
    ~280 bytes: survey-scale sets hold millions of them.
    """

    path: str
    label: int | None
    id: str
    band_paths: tuple[str, ...] = ()
    meta: Mapping[str, int | float | str] = field(default_factory=_no_meta, compare=False, hash=False)

    @property
    def files(self) -> tuple[str, ...]:
        return self.band_paths or (self.path,)


@dataclass
class Dataset:
    """A list of samples plus what a loader must know to read them (for a packed set, a compact read-only
    sequence of them: ``data/shards.PackedSamples``).

    ``kind`` names a registered data kind (``dali_lens.data.kinds``): ``'image'`` (PNG/JPEG), ``'npy'`` (float
    arrays shaped (bands, H, W)), ``'fits'`` (one file per sample, one band per HDU or one 3-D HDU),
    ``'fits-bands'`` (one FITS file per band per sample), ``'shards'`` (a packed set, see ``data/shards.py``:
    sample paths are ``<shard>.tar#<member>``), or one added with ``register_kind``. :attr:`data_kind` is its
    object, which knows how to read, check, pack and decode the samples.
    """

    samples: list[Sample]
    bands: int
    kind: str
    root: str
    split: str = "train"
    hdus: tuple[int | str, ...] | None = None
    shape: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        get_kind(self.kind)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def data_kind(self):
        """The kind object of this dataset (``dali_lens.data.kinds.Kind``)."""
        return get_kind(self.kind)

    @property
    def pixel_kind(self) -> str:
        """The kind of the pixels: this dataset's kind, or for a packed set the kind its members are stored as
        (``'image'`` for PNG/JPEG, ``'npy'`` for float arrays)."""
        return self.data_kind.pixels(self).name

    @property
    def eight_bit(self) -> bool:
        """8-bit pixels (PNG/JPEG, loose or packed), normalised from 0..255; float data otherwise."""
        return self.data_kind.pixels(self).eight_bit

    @property
    def labelled(self) -> bool:
        return -1 not in self.labels

    @property
    def labels(self) -> list[int]:
        fast = getattr(self.samples, "labels", None)  # a packed listing (data/shards.PackedSamples) has them as an array
        if fast is not None:
            return fast()
        return [-1 if s.label is None else int(s.label) for s in self.samples]

    def counts(self) -> dict[str, int]:
        labels = self.labels
        return {"lens": labels.count(1), "nonlens": labels.count(0), "unlabelled": labels.count(-1)}

    def subset(self, indices, split: str | None = None) -> "Dataset":
        take = getattr(self.samples, "take", None)  # a packed listing's view stays a compact view
        samples = take(indices) if take is not None else [self.samples[i] for i in indices]
        return Dataset(samples, self.bands, self.kind, self.root, split or self.split, self.hdus, self.shape)

    def describe(self) -> str:
        c = self.counts()
        shape = "x".join(map(str, self.shape)) if self.shape else "?"
        text = f"{self.split}: {len(self)} {self.kind} samples ({c['lens']} lens, {c['nonlens']} non-lens"
        if c["unlabelled"]:
            text += f", {c['unlabelled']} unlabelled"
        return text + f"), {self.bands} band(s), {shape} px"


def get_kind(name: str):
    """The registered kind object called ``name``; ValueError naming the registered ones otherwise."""
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset kind {name!r}; expected one of {tuple(KINDS)}") from None


_EXTENSIONS: list[tuple[str, str]] = []  # built from KINDS on first use, emptied by kinds_changed()


def kinds_changed() -> None:
    """Called by the registry (``register_kind``/``unregister_kind``) after it changes ``KINDS``."""
    _EXTENSIONS.clear()


def _extensions() -> list[tuple[str, str]]:
    """(file name ending, kind name) of every registered kind, longest ending first (built once per registry
    change, not per file: ``kind_of`` and ``sample_id`` run for every file ``discover`` finds)."""
    if not _EXTENSIONS:
        _EXTENSIONS.extend(sorted(((e, k.name) for k in KINDS.values() for e in k.exts), key=lambda t: -len(t[0])))
    return _EXTENSIONS


def kind_of(path: str) -> str | None:
    """The dataset kind a file belongs to, by extension (``Kind.exts``); None if not a supported file."""
    low = path.lower()
    return next((name for ext, name in _extensions() if low.endswith(ext)), None)


def supported_files() -> str:
    """The file endings every registered kind reads, for messages: '.png, .jpg, ... or .f32'."""
    exts = sorted({e for k in KINDS.values() for e in k.exts})
    return ", ".join(exts[:-1]) + f" or {exts[-1]}" if len(exts) > 1 else "".join(exts)


def sample_id(path: str) -> str:
    name = os.path.basename(path)
    for ext, _ in _extensions():
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return name


_CACHES: dict[tuple[int, str], dict] = {}


def dataset_cache(dataset: "Dataset", owner: str) -> dict:
    """A dict for what module ``owner`` computes once per dataset object (scan results, shard plans, DALI's
    FITS HDUs): kept off the object, so that it is not pickled into loader worker processes, dropped with
    the dataset, and emptied when the dataset's length changes."""
    key = (id(dataset), owner)
    entry = _CACHES.get(key)
    if entry is None or entry["n"] != len(dataset):
        entry = _CACHES[key] = {"n": len(dataset)}
        weakref.finalize(dataset, _CACHES.pop, key, None)
    return entry


def parse_label(value: str, where: str, binary: bool = False) -> int | None:
    """A label cell: 1 for a lens, 0 for a non-lens, None when empty (unlabelled). Words (``lens``, ``yes``,
    ``-1`` for unlabelled, ...) are accepted unless ``binary``: then only 0 and 1 (``0.0``/``1.0``) are, as in the
    challenge catalogue's ``is_lens`` column. Anything else is a DataError naming ``where``."""
    v = str(value).strip().lower()
    if binary:
        if v == "":
            return None
        try:
            number = float(v)
        except ValueError:
            number = None
        if number in (0.0, 1.0):
            return int(number)
        raise DataError(f"{where}: label {value!r} is not 0 or 1")
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    if v in ("", "-1", "none", "nan"):
        return None
    raise DataError(f"{where}: unknown label {value!r} (use 1 for lens, 0 for non-lens)")


_INTEGER = re.compile(r"[+-]?[0-9]+")


def catalogue_value(text) -> int | float | str | None:
    """A catalogue cell of a manifest or ``classifications.csv`` as ``Sample.meta`` keeps it: None when empty
    (the column is left out of that sample's meta), an ``int`` for an integer (exact: 64-bit object IDs), a
    ``float`` for another number (``nan``/``inf`` included), else the text itself (stripped)."""
    v = "" if text is None else str(text).strip()
    if not v:
        return None
    if _INTEGER.fullmatch(v):
        return int(v)
    try:
        return float(v)
    except ValueError:
        return v


def parse_hdus(text) -> tuple[int | str, ...] | None:
    """``--hdus`` text (``"1,2,3"`` or ``"G,R,I"``, mixed allowed) or a sequence of them as HDU indices and
    EXTNAMEs (``choices.HDUS``, the option's range: ValueError for a negative index); None if empty."""
    return HDUS.parse(text) if text else None
