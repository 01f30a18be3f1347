"""dali-lens: fast data loading (NVIDIA DALI, torchvision fallback) and trainers for strong-lens finders."""
from ._version import __version__

__all__ = ["__version__"]
