"""Data kinds as objects, and their registry.

One module per kind (``image``, ``npy``, ``fits``, ``fits_bands``, ``shards``), each an instance of a
:class:`~dali_lens.data.kinds.base.Kind` subclass that owns everything kind-specific: reading one sample, the
quick validity check, the member ``pack`` stores, the torchvision decode, the DALI reader and decoder, and
flags (8-bit pixels, DALI checkpointing, ...). Nothing outside this package compares kind names: it asks
the kind object (``dataset.data_kind``, :func:`get_kind`).

Adding a format is one module plus a test: subclass :class:`Kind`, set ``name`` and ``exts``, implement
``read`` (and ``encode`` for writers), and :func:`register_kind` an instance (see ``docs/extending.md``).
"""
from __future__ import annotations

from ..dataset import KINDS, get_kind, kinds_changed
from .base import Kind
from .fits import FITS
from .fits_bands import FITS_BANDS
from .image import IMAGE
from .npy import NPY
from .shards import SHARDS


def register_kind(kind: Kind) -> Kind:
    """Add (or replace) the kind ``kind.name``: datasets of that kind, and files ending in ``kind.exts`` (found
    by ``discover``), are then read, checked, packed and loaded through it. Returns ``kind``."""
    if not isinstance(kind, Kind) or not kind.name:
        raise TypeError(f"register_kind needs a named Kind instance, not {kind!r}")
    KINDS[kind.name] = kind
    kinds_changed()
    return kind


def unregister_kind(name: str) -> None:
    """Remove a registered kind (tests)."""
    KINDS.pop(name, None)
    kinds_changed()


def kind_names() -> tuple[str, ...]:
    """The registered kinds' names, in registration order."""
    return tuple(KINDS)


for _kind in (IMAGE, NPY, FITS, FITS_BANDS, SHARDS):
    register_kind(_kind)

__all__ = ["Kind", "get_kind", "kind_names", "register_kind", "unregister_kind"]
