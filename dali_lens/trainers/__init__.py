"""The trainers, a registry, sharing one loop (``runner.run``).

A trainer is an object with the hooks of :class:`~dali_lens.trainers.base.Trainer` (its members, the scales
active in an epoch, an extra loss term, an after-fit step, the default run name). The built-in ones are
``single``, ``multiscale`` and ``ensemble`` (``single.py``, ``multiscale.py``, ``ensemble.py``). Adding one is
one module plus its test: subclass :class:`Trainer` and :func:`register_trainer` an instance; ``--trainer``
(``TrainConfig.trainer``) then accepts its name (see ``docs/extending.md``). Nothing outside the trainer
modules compares trainer names.
"""
from __future__ import annotations

from ..checkpoint import MemberSpec
from .base import TRAINERS, Trainer, get_trainer
from .config import TrainConfig
from .ensemble import TRAINER as ENSEMBLE
from .multiscale import TRAINER as MULTISCALE
from .runner import run
from .single import TRAINER as SINGLE


def register_trainer(name: str, trainer: Trainer) -> Trainer:
    """Add (or replace) the trainer ``name``: ``--trainer name`` / ``dali_lens.train(trainer=name)`` then train
    with it, and ``--help`` lists it. Returns ``trainer``."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise TypeError(f"register_trainer needs a name (a non-empty word), not {name!r}")
    if not isinstance(trainer, Trainer):
        raise TypeError(f"register_trainer needs a Trainer (dali_lens.trainers.Trainer's hooks), not {trainer!r}")
    TRAINERS[name] = trainer
    return trainer


def unregister_trainer(name: str) -> None:
    """Remove a registered trainer (tests)."""
    TRAINERS.pop(name, None)


def trainer_names() -> tuple[str, ...]:
    """The registered trainers' names, in registration order."""
    return tuple(TRAINERS)


for _name, _trainer in (("single", SINGLE), ("multiscale", MULTISCALE), ("ensemble", ENSEMBLE)):
    register_trainer(_name, _trainer)

__all__ = ["MemberSpec", "TRAINERS", "TrainConfig", "Trainer", "get_trainer", "register_trainer", "run", "trainer_names",
           "unregister_trainer"]
