"""A *member* is one model being trained on one or more input scales.

The single-scale trainer trains one member on one scale, the multi-scale trainer one member on several
scales, the ensemble trainer several members each on its own scale. All of them read one loader that
produces the union of the scales from a single decode. What tells the trainers apart is ``base.Trainer``.
What a member is (``MemberSpec``) and what a checkpoint keeps of it (``MemberState``) live in the neutral
``dali_lens.checkpoint``, which inference reads too.

Fine-tuning (``--freeze-epochs``, ``--trainable-blocks``, ``--layer-decay``, ``--head-lr``): the optimizer's
parameter groups come from timm (``timm.optim.param_groups_layer_decay`` over the model's ``group_matcher``),
with the head (``models.head_names``) in groups of its own; which parameters train in an epoch
(:func:`set_trainable`) follows from the epoch's number alone, so a resumed run freezes and unfreezes at the
same epochs as an uninterrupted one. Frozen parameters get no gradient (AdamW leaves them, and their
moments, untouched); BatchNorm statistics of frozen blocks still follow the data.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch

from ..checkpoint import MemberSpec, MemberState
from ..models import block_groups, build_model, check_arch, head_names, load_weights, read_weights
from ..scoring import channels_last_on


@dataclass
class Member:
    spec: MemberSpec
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    temperature: float = 1.0
    saved_bytes: dict = field(default_factory=dict)  # --memory-budget: bytes kept for backward per sample, by scale

    @property
    def core(self) -> torch.nn.Module:
        """The model without a DistributedDataParallel wrapper."""
        return getattr(self.model, "module", self.model)


def make_member(spec: MemberSpec, in_chans: int, cfg, steps_per_epoch: int, device: torch.device,
                distributed: bool = False, weights=None) -> Member:
    """``spec``'s model (with ``weights``, a ``models.Weights`` read once for every member, else
    ``cfg.weights``), its optimizer, LR schedule and grad scaler."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.arch, in_chans=in_chans, img_size=max(spec.scales), stem=getattr(cfg, "stem", "auto"))
    source = weights if weights is not None else getattr(cfg, "weights", None)
    if source is not None:
        load_weights(model, source, member=spec)
    check_sizes(model, spec)
    model = model.to(device)
    if channels_last_on(device, cfg.channels_last):
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(model, cfg)
    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, steps_per_epoch * cfg.epochs)
    if cfg.lr_schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                    total_steps=total, pct_start=0.2)
    else:
        warm = min(total // 10, 500)

        def lr_at(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp_dtype(device) == torch.float16 else None
    return Member(spec, model, opt, sched, scaler)


def check_models(specs, cfg):
    """Before any work: every member's architecture is known (``models.check_arch``) and ``--weights`` reads
    (``models.read_weights``: tensors only), once for every member; the weights read, or None."""
    for spec in specs:
        check_arch(spec.arch)
    return read_weights(cfg.weights) if getattr(cfg, "weights", None) else None


def check_sizes(model: torch.nn.Module, spec: MemberSpec) -> None:
    """ValueError naming the member when its model cannot take one of its scales (a ViT built for another
    size, a CNN that pools a small input away): one forward pass of a blank cutout per scale, in eval mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in spec.scales:
                out = model(torch.zeros(1, model.in_chans, s, s))
                if out.shape != (1,):
                    raise ValueError(f"gives an output of shape {tuple(out.shape)}, not one logit")
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise ValueError(f"member {spec.name}: {spec.arch} cannot take {s} px inputs (built for "
                         f"{model.img_size} px): {str(exc).strip().splitlines()[0][:200]}") from None
    finally:
        model.train(was)


def param_groups(model: torch.nn.Module, cfg) -> list:
    """The optimizer's parameter groups: every parameter in one group at ``--lr`` (no fine-tuning knob), or
    timm's layer-wise groups (``param_groups_layer_decay``: the group ``k`` layers below the top at ``lr *
    layer_decay**k``; weight decay on every parameter, as without the knobs) with the head's parameters at
    ``--head-lr``. Each group carries its ``lr``."""
    layer_decay, head_lr = getattr(cfg, "layer_decay", None), getattr(cfg, "head_lr", None)
    if layer_decay is None and head_lr is None:
        return [{"params": list(model.parameters()), "lr": cfg.lr}]
    from timm.optim import param_groups_layer_decay

    with warnings.catch_warnings():  # (timm's note when all parameters fall in one layer)
        warnings.simplefilter("ignore")
        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, weight_decay_exclude_1d=False,
                                          layer_decay=1.0 if layer_decay is None else layer_decay)
    head = {id(p) for n, p in model.named_parameters() if n in head_names(model)}
    out = []
    for g in groups:
        for in_head in (False, True):
            params = [p for p in g["params"] if (id(p) in head) == in_head]
            if params:
                lr = head_lr if in_head and head_lr is not None else cfg.lr * g["lr_scale"]
                out.append({"params": params, "lr": lr, "weight_decay": g["weight_decay"], "head": in_head})
    return out


def trainable_names(model: torch.nn.Module, cfg, epoch: int) -> set[str] | None:
    """The parameters that train in ``epoch`` (0-based): the head only during ``--freeze-epochs``, then the
    head and the last ``--trainable-blocks`` blocks (``models.block_groups``); None: all of them."""
    freeze, blocks = getattr(cfg, "freeze_epochs", 0) or 0, getattr(cfg, "trainable_blocks", None)
    if epoch >= freeze and blocks is None:
        return None
    names = set(head_names(model))
    if epoch >= freeze and blocks:
        for group in block_groups(model)[-blocks:]:
            names.update(group)
    return names


def set_trainable(m: Member, cfg, epoch: int) -> str | None:
    """Freeze or unfreeze ``m``'s parameters for ``epoch`` (:func:`trainable_names`); what changed, in words
    (None: nothing). Under DistributedDataParallel the model is wrapped again, since DDP fixes the parameters
    it reduces when it wraps."""
    keep = trainable_names(m.core, cfg, epoch)
    changed = 0
    for name, p in m.core.named_parameters():
        want = keep is None or name in keep
        if p.requires_grad != want:
            p.requires_grad_(want)
            changed += 1
    if not changed:
        return None
    m.saved_bytes.clear()  # (--memory-budget: what backward keeps changes with what trains)
    if isinstance(m.model, torch.nn.parallel.DistributedDataParallel):
        m.model = torch.nn.parallel.DistributedDataParallel(m.core, device_ids=m.model.device_ids)
    n = sum(p.numel() for p in m.core.parameters() if p.requires_grad)
    total = sum(p.numel() for p in m.core.parameters())
    return f"{m.spec.name}: epoch {epoch + 1} trains {n:,} of {total:,} parameters" + (
        " (the head only)" if keep is not None and keep <= head_names(m.core) else "")


def member_state(m: Member) -> MemberState:
    """What a checkpoint keeps of a member."""
    return MemberState(spec=m.spec, model=m.core.state_dict(), optimizer=m.optimizer.state_dict(),
                       scheduler=m.scheduler.state_dict(), scaler=m.scaler.state_dict() if m.scaler else None,
                       temperature=m.temperature)


def load_member_state(m: Member, state: MemberState, weights_only: bool = False) -> None:
    """``state`` into ``m``: the weights and temperature, and (unless ``weights_only``) the optimizer's,
    scheduler's and grad scaler's states; ValueError when a state ``--resume`` needs is not kept."""
    m.core.load_state_dict(state.model)
    m.temperature = state.temperature
    if weights_only:
        return
    if state.optimizer is None or state.scheduler is None:
        raise ValueError("the checkpoint keeps no optimizer/scheduler state to resume from")
    m.optimizer.load_state_dict(state.optimizer)
    # the step reached, on this run's schedule: what depends on the run's length (OneCycleLR's total and phases)
    # stays as built for the current --epochs, so a longer resumed run stretches the schedule
    fresh = m.scheduler.state_dict()
    m.scheduler.load_state_dict({**state.scheduler,
                                 **{k: fresh[k] for k in ("total_steps", "_schedule_phases") if k in fresh}})
    with warnings.catch_warnings():  # (get_lr outside step() warns; this is the value step() set at that step)
        warnings.simplefilter("ignore")
        try:
            lrs = m.scheduler.get_lr()
        except ValueError:  # past the end of a shortened schedule: no step is left to take
            lrs = []
    for group, lr in zip(m.optimizer.param_groups, lrs):
        group["lr"] = lr
    if m.scaler is not None and state.scaler:
        m.scaler.load_state_dict(state.scaler)
