"""Single-scale, multi-scale and ensemble trainers sharing one loop (``runner.run``)."""
from .config import TRAINERS, TrainConfig
from .runner import run

__all__ = ["TRAINERS", "TrainConfig", "run"]
