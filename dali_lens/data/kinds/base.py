"""What a data kind is: one object per kind that reads, checks, encodes and decodes its samples.

A kind is an instance of a :class:`Kind` subclass: class attributes for what the rest of the package asks
about it (file endings, 8-bit pixels, DALI checkpointing, ...) and plain methods for what it does. The
defaults describe a kind of float arrays read by :meth:`Kind.read` alone: such a kind needs nothing else to be
discovered, checked, packed (as float32 ``.npy`` members) and loaded by every backend (DALI through a
per-sample external source, which DALI cannot checkpoint).
"""
from __future__ import annotations

import numpy as np

from ..dataset import DataError, get_kind


class Kind:
    """One data kind. Override what differs from a kind of float arrays read by :meth:`read`."""

    #: the kind's name: ``Dataset.kind``, ``--kind`` in messages, the registry key
    name: str = ""
    #: file name endings (lower case) that ``discover`` reads as this kind; empty: not found by extension
    exts: tuple[str, ...] = ()
    #: 8-bit pixels, normalised from 0..255 (PNG/JPEG); else float data (NaN/inf checked, masked, scaled)
    eight_bit: bool = False
    #: a sample is one file per band (``Sample.band_paths``)
    one_file_per_band: bool = False
    #: samples are members of packed shards (checked by ``pack`` and ``check``, streamed by the torchvision
    #: backend), not loose files
    packed: bool = False
    #: ``validate`` decodes every file strictly once (and keeps content digests) instead of a header scan
    strict_check: bool = False
    #: DALI can checkpoint the reader of :meth:`dali_source` (mid-epoch resume); a per-sample external source
    #: cannot
    checkpointable: bool = False
    #: ``backend='auto'`` on a machine without CUDA
    auto_cpu_backend: str = "torchvision"
    #: a packed-member format: the member extensions (lower case) of packed shards whose pixels are stored as
    #: this kind (``data.shards.member_kind`` reads them from the registry); empty: never a member format
    member_exts: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"<kind {self.name!r}>"

    # ------------------------------------------------------------------------------------------ reading

    def read(self, sample, dataset) -> np.ndarray:
        """One sample as ``(bands, H, W)``: uint8 for 8-bit kinds, float32 otherwise; DataError naming the file."""
        raise NotImplementedError

    def pixels(self, dataset) -> "Kind":
        """The kind of the pixels of ``dataset`` (a packed set: the kind its members are stored as)."""
        return self

    def same_pixels(self, other: "Kind") -> bool:
        """A model trained on this kind's pixels takes ``other``'s as they are: both 8-bit images, or both float
        data (FITS and ``.npy`` are the same floats); 8-bit images are normalised from 0..255 instead."""
        return self.eight_bit == other.eight_bit

    def quick_problem(self, dataset, i: int, path: str, size: int) -> str | None:
        """A header-level problem of sample ``i`` (``path``, ``size`` bytes), without decoding it; the files were
        found present and not empty."""
        return None

    def sample_problem(self, dataset, i: int, allow_nonfinite: bool = False) -> tuple[str | None, str | None]:
        """(problem or None, content digest or None) of sample ``i``, read and checked in full."""
        try:
            self.checked(dataset, i, allow_nonfinite)
        except DataError as exc:
            return str(exc), None
        return None, None

    def checked(self, dataset, i: int, allow_nonfinite: bool = False) -> np.ndarray:
        """Sample ``i`` read and checked (bands, size, NaN/inf unless ``allow_nonfinite``)."""
        from ..readers import check_array, read_sample

        sample = dataset.samples[i]
        arr = read_sample(sample, dataset, check=False)  # files present, then read by this kind
        check_array(arr, sample, dataset, allow_nonfinite=allow_nonfinite)
        return arr

    # ------------------------------------------------------------------------------------------ encoding

    def encode(self, array: np.ndarray) -> bytes:
        """``(bands, H, W)`` pixels as the bytes of one file of this kind (the synthetic writer's encoder)."""
        raise NotImplementedError(f"kind {self.name!r} has no encoder")

    def packed_as(self) -> "Kind":
        """The kind of this kind's members in a packed set (``pack``): float32 ``.npy`` by default."""
        return get_kind("npy")

    def pack_member(self, dataset, i: int, allow_nonfinite: bool) -> tuple[str, bytes]:
        """(member extension, bytes) that ``pack`` stores for sample ``i``, checked; DataError when it cannot."""
        arr = self.checked(dataset, i, allow_nonfinite)
        member = self.packed_as()
        return member.exts[0].lstrip("."), member.encode(arr)

    # ------------------------------------------------------------------------------------------ loaders

    def decode_torch(self, dataset, i: int, allow_nonfinite: bool = False) -> np.ndarray:
        """Sample ``i`` as the torchvision backend decodes it, checked."""
        return self.checked(dataset, i, allow_nonfinite)

    def dali_source(self, dataset, opts, gpu: bool, order: np.ndarray, reader_args: dict):
        """(HWC pixels node, index node) of a DALI reader and decoder for ``order`` (dataset positions), with
        ``reader_args`` (sharding, shuffling, padding, ``name='reader'``); called inside the pipeline definition.

        None (the default): DALI has no reader for this kind; the loader then reads samples with :meth:`read`
        in a per-sample external source (``pipelines/dali_backend.py``), in the order and shards DALI's readers
        use, which DALI cannot checkpoint (``checkpointable = False``)."""
        return None

    def dali_checkpointable(self, dataset) -> bool:
        """DALI can checkpoint this kind's loader of ``dataset`` (``checkpointable``, unless this data set goes
        through the per-sample external source: ``.npy`` of mixed dtypes)."""
        return self.checkpointable

    def dali_listed(self, dataset, gpu: bool) -> bool:
        """DALI's reader is handed this rank's samples of each epoch in order (no reader-side shuffling or
        sharding; the loader rebuilds the pipeline per epoch and knows the positions)."""
        return False

    def dali_ordered(self, dataset, gpu: bool) -> bool:
        """:meth:`dali_source` reads a given list of samples in that order when handed one reader's arguments
        (no reader-side shuffling or sharding): ``--sampler balanced`` then gives it each epoch's order. False
        (the default): the loader reads such a kind by :meth:`read` in its per-sample source instead."""
        return self.dali_listed(dataset, gpu)

    def dali_positions(self, dataset, raw):
        """Dataset positions (an int64 tensor) from the index output of :meth:`dali_source`; None: the index is
        the position itself, or a file name DALI reports (the loader maps it)."""
        return None

    def dali_prepare(self, dataset, opts) -> None:
        """On the DALI GPU backend, before any pipeline is defined: settle what needs a running GPU (the
        ``.npy`` kind tries cuFile on one file). Nothing by default."""

    def dali_reads(self, dataset, opts) -> str:
        """How the DALI GPU backend reads this kind, for the run log ('' when there is nothing to say)."""
        return ""
