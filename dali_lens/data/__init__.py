"""Finding samples: folders, CSV manifests, FITS, .npy, per-band files; splits; the synthetic generator."""
from .dataset import DataError, Dataset, Sample
from .sources import discover

__all__ = ["DataError", "Dataset", "Sample", "discover"]
