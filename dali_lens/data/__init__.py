"""Finding samples: folders, CSV manifests, FITS, .npy, per-band files; splits; the synthetic generator.

The data kinds (``kinds/``) are registered on import of this package, before any dataset is made."""
from . import kinds  # noqa: F401 - registers the built-in kinds
from .dataset import DataError, Dataset, Sample
from .sources import discover

__all__ = ["DataError", "Dataset", "Sample", "discover"]
