"""What tells the trainers apart: the :class:`Trainer` protocol, and the registry's table (``TRAINERS``).

A trainer is an object with the hooks below; the loop around them (``runner.py``, ``loop.py``) is shared and
never asks a trainer's name. ``single.py``, ``multiscale.py`` and ``ensemble.py`` subclass :class:`Trainer`
and override what they need; ``trainers.register_trainer`` adds one (``--trainer NAME`` then chooses it, and
``--help`` lists it). A trainer defined elsewhere may also implement every hook itself (duck typing).

The hooks, with what the shared loop does with them:

* ``member_specs(cfg)``: the members to train (``members.MemberSpec``: architecture, scales, seed), checked;
  a bad combination of options raises ``ValueError`` before any data is read.
* ``active_scales(cfg, epoch)``: the scales the training loader produces in ``epoch`` (each member trains on
  those of its own scales that are active); when it changes, the training loader is rebuilt.
* ``extra_loss(cfg, scales)``: a term added to every forward/backward pass's loss of a member training on
  ``scales``, or None. It is called as ``term(logits, k, labels)``: ``logits`` holds the pass's logits at each
  of ``scales``, ``logits[k]`` with its gradient, the others computed beforehand without one (so that one
  scale's graph is in memory at a time); the loop adds ``term(...) * share`` (the pass's share of the batch
  mean, as for the classification loss).
* ``after_fit(cfg, members, val_loader, device, say)``: a step once training ended, on the members holding
  ``best.pt``'s weights (``val_loader`` is None without a validation split). It returns the temperatures it
  set on the members (then written to ``best.pt`` and ``metrics.json``), or None for nothing changed.
* ``run_name(cfg)``: the default run directory's name before its time stamp (``runs/<name>-<time>``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # (members imports torch and the models; the table and the protocol need neither)
    import torch

    from ..checkpoint import MemberSpec
    from .members import Member

#: ``(logits at each scale, index of the one with its gradient, labels) -> loss``: see ``extra_loss``
LossTerm = Callable[[list, int, "torch.Tensor"], "torch.Tensor"]


@runtime_checkable
class Trainer(Protocol):
    """The hooks the trainers differ in (see the module's docstring); subclasses get the defaults below."""

    def member_specs(self, cfg) -> list[MemberSpec]:
        ...

    def active_scales(self, cfg, epoch: int) -> tuple[int, ...]:
        """Default: every scale of every member, every epoch."""
        return tuple(sorted({s for sp in self.member_specs(cfg) for s in sp.scales}))

    def extra_loss(self, cfg, scales: tuple[int, ...]) -> Optional[LossTerm]:
        """Default: none."""
        return None

    def after_fit(self, cfg, members: list[Member], val_loader, device, say) -> Optional[dict]:
        """Default: nothing."""
        return None

    def run_name(self, cfg) -> str:
        """Default: ``<trainer>-<arch>``, the trainer's name as ``--trainer`` gave it."""
        return f"{cfg.trainer}-{cfg.arch}"


#: the registered trainers by name, in registration order (``trainers.register_trainer`` fills it); the
#: ``--trainer`` option's choices are this table itself, so a trainer registered later is a valid choice too
TRAINERS: dict[str, Trainer] = {}


def get_trainer(name: str) -> Trainer:
    """The trainer registered as ``name``; a ``ValueError`` listing the registered ones otherwise."""
    try:
        return TRAINERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown trainer {name!r}: choose from {', '.join(TRAINERS)}") from None
