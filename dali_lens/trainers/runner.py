"""Run a training job: data -> loaders -> members -> epochs -> checkpoints -> test metrics and outputs.

The trainers (``base.Trainer``: ``single.py``, ``multiscale.py``, ``ensemble.py`` and any registered one) differ
only in their hooks: members, the scales active in an epoch, an extra loss term, an after-fit step, the run's
default name. This module is the loop around them, and never asks a trainer's name.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist

from ..data import DataError
from ..data.io import atomic_write_json
from ..data.labels import class_line, class_record, gather, resolve_pos_weight, sample_weights
from ..data.sources import leave_out_unlabelled
from ..distributed import init as init_distributed
from ..pipelines import build_loader, compute_stats, estimate_noise, resolve_backend
from ..pipelines.options import AUTO_K, LoaderOptions
from ..scoring import fuse, sigmoid
from .budget import parse_budget
from .base import Trainer, get_trainer
from ..checkpoint import Checkpoint, CheckpointError, PixelSettings
from .config import TrainConfig, parse_mask_value
from . import inject
from .curves import Curves, learning_rate
from .loop import LossWeights, dist_info, predict, train_epoch
from .members import check_models, load_member_state, make_member, member_state, set_trainable
from .outputs import write_outputs
from .rundir import RunDir, check_resume_config, data_record

DEFAULT_N = 4000
DEFAULT_SIZE = 64


def cache_dir() -> str:
    return os.environ.get("DALI_LENS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dali-lens"))


def output_dtype(cfg: TrainConfig, dataset) -> str:
    """The loader's output dtype for ``--dtype``: ``auto`` is uint8 for 8-bit images, float32 otherwise.

    With ``--batch-transforms`` ``auto`` stays float32: batch transforms see normalised float batches.
    """
    if cfg.dtype == "auto":
        return "uint8" if dataset.eight_bit and not cfg.batch_transforms else "float32"
    return cfg.dtype


def default_dataset(log=print) -> str:
    """The built-in synthetic set, generated once into the cache (atomically: a temp folder renamed)."""
    root = os.path.join(cache_dir(), f"synthetic-v1-n{DEFAULT_N}-{DEFAULT_SIZE}px-seed0")
    if os.path.exists(os.path.join(root, "train.csv")):
        return root
    from ..data.synthetic import generate_dataset

    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    log(f"generating the default synthetic dataset ({DEFAULT_N} cutouts, {DEFAULT_SIZE} px, g,r,i PNG) in {root}")
    generate_dataset(tmp, n=DEFAULT_N, size=DEFAULT_SIZE, fmt="png", seed=0)
    try:
        os.replace(tmp, root)
    except OSError:  # another process generated it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _out_dir(cfg: TrainConfig, kind: Trainer) -> str:
    out = cfg.out or os.path.join("runs", f"{kind.run_name(cfg)}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    return os.path.abspath(out)


def layout_defaults(cfg: TrainConfig, train, say) -> TrainConfig:
    """``--mask-value auto``: the sentinel the data's layout implies (the challenge's 100, logged), else none.
    The resolved value is what the checkpoint records (predict/evaluate reuse it)."""
    mask = parse_mask_value(cfg.mask_value)
    if mask == "auto":
        from ..data.challenge import default_mask_value

        mask = default_mask_value(train)
        if mask is not None:
            say(f"challenge layout recognised: pixels equal to {mask:g} are masked (--mask-value none turns it off)")
    return dataclasses.replace(cfg, mask_value=mask)


def run(cfg: TrainConfig, log=print) -> dict:
    """Train and evaluate as ``cfg`` says; returns the final metrics (also written to ``metrics.json``).

    The run directory is locked for the whole run (``rundir.py``: one run at a time per ``--out``)."""
    with RunDir() as rundir:
        return _run(cfg, log, rundir)


def _run(cfg: TrainConfig, log, rundir: RunDir) -> dict:
    device = init_distributed()[3]
    rank, world, _ = dist_info()
    is_main = rank == 0
    say = log if is_main else (lambda *a, **k: None)
    kind = get_trainer(cfg.trainer)
    specs = kind.member_specs(cfg)
    parse_budget(cfg.memory_budget)  # a bad value fails here, before any data is touched
    weights = check_models(specs, cfg)  # (issue 24: unknown --arch/--members, unreadable --weights: before any work)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    out = _out_dir(cfg, kind)
    resume = rundir.claim(out, cfg.resume, is_main, world, say)
    cfg, data_root, splits, config_extra = _prepare_data(cfg, out, resume, world, say)
    config_extra["class_ratio"], loss_weights = _class_balance(cfg, splits["train"], config_extra.pop("_weights"),
                                                               device, say)
    psf = inject.check(cfg, splits, say)  # issue 25: --inject's checks that need the data, before any work
    backend = resolve_backend(cfg.backend, splits["train"])
    job = _Job(cfg, splits, backend, specs, device, out, say, psf)
    job.loss_weights = loss_weights
    say(f"backend {backend} on {device}; trainer {cfg.trainer}: "
        + ", ".join(f"{s.name}" for s in specs) + f"; {world} process(es)")
    _say_stems(specs, cfg, say)
    active = kind.active_scales(cfg, 0)
    job.train_loader = job.loader("train", True, active)
    if getattr(job.train_loader, "reads", ""):  # the GPU read path taken (DALI backend): cuFile or not, DALI or astropy
        say(job.train_loader.reads)
    in_chans = splits["train"].bands + int(cfg.mask_channel)
    job.members = [make_member(sp, in_chans, cfg, len(job.train_loader), device, distributed=world > 1,
                               weights=weights) for sp in specs]
    if resume:
        _restore(job.ck, job.members, job.last, device, say)
    if is_main:
        atomic_write_json(os.path.join(out, "config.json"), {**job.run_config, "data_root": data_root,
                                                             "backend_resolved": backend, "world_size": world,
                                                             **config_extra})
        inject.write_eval_catalogue(out, job.run_config, splits, job.base.mask_value)
    val_loader = job.loader("val", False) if "val" in splits else None
    select = "AUC" if inject.val_has_lenses(cfg, splits) else selection_metric(splits.get("val"), say)
    t_start = time.perf_counter()
    job.curves = Curves(out, cfg.tensorboard, is_main, job.ck.history, say)  # curves.csv, tensorboard/, curves.png
    _train(job, kind, active, val_loader, select)
    job.curves.close(job.ck.history)
    if is_main and not os.path.exists(job.best) and job.ck.history:
        say(f"warning: no epoch had a finite validation {select}; best.pt holds the last epoch")
        job.save(job.best, len(job.ck.history))
    train_seconds = time.perf_counter() - t_start
    job.train_loader = None  # evaluation needs neither the training pipeline's buffers nor its threads

    if os.path.exists(job.best) or world > 1:
        if world > 1:
            dist.barrier()
        for m, ms in zip(job.members, Checkpoint.load(job.best, map_location=device).members):
            load_member_state(m, ms, weights_only=True)  # (the optimizer states are not kept through evaluation)
    temperatures = kind.after_fit(cfg, job.members, val_loader, device, say)  # e.g. the ensemble's temperatures
    if temperatures is not None:
        job.save(job.best, best_epoch(job.ck.history))
    val_loader = None
    gc.collect()
    return _test(job, out, temperatures, {"history": job.ck.history, "train_seconds": round(train_seconds, 1),
                                          "backend": backend, "device": str(device), "world_size": world,
                                          "data_root": data_root})


class _Job:
    """A run's moving parts once its data is known: its loaders, its members, and the record of where training
    stands that best.pt/last.pt hold (``ck``)."""

    def __init__(self, cfg: TrainConfig, splits: dict, backend: str, specs, device, out: str, say, psf=None):
        rank, self.world, _ = dist_info()
        self.is_main = rank == 0
        self.cfg, self.splits, self.backend, self.device, self.say = cfg, splits, backend, device, say
        self.show_progress = cfg.progress and self.is_main
        self.scales = tuple(sorted({s for sp in specs for s in sp.scales}))
        pixels = measure_pixels(cfg, splits, say)
        self.base = LoaderOptions(scales=self.scales, batch_size=cfg.batch_size, seed=cfg.seed, shard_id=rank,
                                  num_shards=self.world, num_workers=cfg.workers, max_shift=cfg.max_shift,
                                  dtype=output_dtype(cfg, splits["train"]), sampler=cfg.sampler,
                                  **pixels.pixel_fields())
        # issue 25: the options plus the injection record (noise, PSF): what evaluate needs to repeat --inject-eval
        self.run_config = inject.run_config(cfg, inject.record(cfg, splits["train"], pixels, psf, say))
        self.ck = Checkpoint(members=[], bands=splits["train"].bands, pixels=pixels, config=self.run_config)
        self.last, self.best = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
        self.members: list = []
        self.train_loader = None
        self.loss_weights = None  # LossWeights of --pos-weight / --source-weight / --grade1 weak, or None

    def loader(self, split: str, train: bool, scales=None, tta: bool = False):
        """A loader of ``split`` at ``scales`` (default: every member's), training or evaluation."""
        transforms = self.cfg.batch_transforms if train else ()
        opts = LoaderOptions(**{**self.base.to_dict(), "scales": scales or self.scales, "train": train,
                                "augment": train, "tta": tta, "transforms": transforms,
                                "inject": inject.injector(self.run_config, self.splits[split], train,
                                                          self.base.mask_value)})
        return build_loader(self.splits[split], backend=self.backend, options=opts)

    def save(self, path: str, epoch: int, loader_state=None, progress=None) -> None:
        """Checkpoint the members at ``epoch`` (rank 0 writes); mid-epoch, with the loader's state and the
        epoch's ``progress`` (``loop.train_epoch``)."""
        if self.is_main:
            ck = self.ck
            ck.members, ck.epoch, ck.loader = [member_state(m) for m in self.members], epoch, loader_state
            ck.progress = progress
            ck.save(path)


def _train(job: _Job, kind: Trainer, active: tuple, val_loader, select: str) -> None:
    """The epochs from where ``job.ck`` stands (0, or a resumed run's) to ``--epochs`` or early stopping."""
    cfg = job.cfg
    loader_state, chunks_said = job.ck.loader, {}
    for epoch in range(job.ck.epoch, cfg.epochs):
        scales_now = kind.active_scales(cfg, epoch)
        if scales_now != active:
            active = scales_now
            job.train_loader = None  # the previous pipeline's buffers go before the next one is built
            gc.collect()
            job.train_loader = job.loader("train", True, active)
            job.say(f"epoch {epoch + 1}: training scales now {active}")
        job.train_loader.set_epoch(epoch)
        for said in filter(None, (set_trainable(m, cfg, epoch) for m in job.members)):  # --freeze-epochs...
            job.say(said)
        progress = {"steps": 0, "loss_sums": {}}
        if loader_state is not None and loader_state.get("epoch", epoch) == epoch:
            job.train_loader.load_state_dict(loader_state)
            progress = _resumed_progress(job.train_loader, loader_state, job.ck.progress, progress)
        loader_state = None

        def on_step(step: int, epoch=epoch, progress=progress) -> None:
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                job.save(job.last, epoch, job.train_loader.state_dict(), progress)

        stats = train_epoch(job.members, job.train_loader, cfg, job.device, epoch, active_scales=active,
                            on_step=on_step, show_progress=job.show_progress, progress=progress, trainer=kind,
                            loss_weights=job.loss_weights)
        chunks_said = _note_chunks(stats, cfg.batch_size, chunks_said, job.say)
        # the loader's state at the epoch's end goes into last.pt: DALI's readers shuffle from their own state,
        # which a fresh pipeline would restart at its first epoch's order. (A new loader is built for the next
        # epoch when its scales change: then a fresh one, as in an uninterrupted run.)
        after = job.train_loader.state_dict() if kind.active_scales(cfg, epoch + 1) == active else None
        if _end_epoch(job, epoch, stats, val_loader, select, after):
            break


def _resumed_progress(loader, state: dict, saved, fresh: dict) -> dict:
    """Where a resumed epoch stands: the checkpoint's steps and loss sums when the loader continues at its step
    (a DALI source that cannot be checkpointed restarts the epoch: then from nothing)."""
    done = int(state.get("batches_done", 0))
    if not saved or int(saved.get("steps", -1)) != done:
        return fresh
    if done < len(loader) and not getattr(loader, "checkpointable", True):
        return fresh
    return {"steps": done, "loss_sums": dict(saved.get("loss_sums", {}))}


def _end_epoch(job: _Job, epoch: int, stats: dict, val_loader, select: str, loader_state=None) -> bool:
    """Validate, log, checkpoint (best.pt when better; last.pt with ``loader_state``, the train loader's at the
    epoch's end); whether to stop early."""
    cfg, ck = job.cfg, job.ck
    line = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_images_per_s": round(stats["images_per_s"], 1),
            "data_wait_fraction": round(stats["data_wait_fraction"], 3), "lr": learning_rate(job.members)}
    if val_loader is not None:
        line.update(_validate(job.members, val_loader, cfg, job.device, select, job.show_progress))
        auc = line["val_select"]
    else:
        auc = -stats["loss"][job.members[0].spec.name]
    ck.history.append(line)
    improved = bool(auc > ck.best_auc)  # a NaN score never improves
    if improved:
        ck.best_auc, ck.bad_epochs = float(auc), 0
    else:
        ck.bad_epochs += 1
    job.say(_epoch_line(line, stats, cfg.epochs, improved))
    if improved:
        job.save(job.best, epoch + 1)
    job.save(job.last, epoch + 1, loader_state)
    job.curves.epoch(ck.history)
    if cfg.patience and ck.bad_epochs >= cfg.patience:
        job.say(f"early stopping: no better validation {select} for {cfg.patience} epoch(s)")
        return True
    return False


def _test(job: _Job, out: str, temperatures, extra: dict) -> dict:
    """The final pass over the test split (else val), with ``--tta``, and the run's outputs (rank 0)."""
    cfg, say = job.cfg, job.say
    eval_split = "test" if "test" in job.splits else "val"
    eval_loader = job.loader(eval_split, False, tta=cfg.tta)
    index, y, logits = predict(job.members, eval_loader, cfg, job.device, desc=eval_split,
                               show_progress=job.show_progress)
    result = {}
    if job.is_main:
        result = write_outputs(out, job.splits[eval_split], index, y, logits, cfg, temperatures,
                               extra={**extra, "eval_split": eval_split})
        say(summary_line(result, eval_split))
        say(f"outputs in {out}")
    if job.world > 1:
        dist.barrier()
    return result


def _prepare_data(cfg: TrainConfig, out: str, resume: bool, world: int, say):
    """``(cfg with the layout's defaults, data root, splits, what config.json adds on a resume)``: the data found
    (the default synthetic set generated on rank 0 when none is given), checked, described."""
    is_main = dist_info()[0] == 0
    data_root = cfg.data_root or (default_dataset(say) if is_main else None)
    if world > 1:
        holder = [data_root]
        dist.broadcast_object_list(holder, src=0)
        data_root = holder[0]
    # issue 24: several roots, --labels joined by id, per-sample loss weights (data/labels.py); issue 25: with
    # --inject, unlabelled or one-class data are backgrounds (inject.discover_for)
    got = gather(data_root, inject.discover_for(cfg), hdus=cfg.hdus, val_fraction=cfg.val_fraction, seed=cfg.seed,
                 label_paths=cfg.labels, grade1=cfg.grade1, grade1_weight=cfg.grade1_weight,
                 conflict=cfg.label_conflict, weights_text=cfg.source_weight, log=say)
    splits = leave_out_unlabelled(got.splits, say)
    if "train" not in splits:
        raise DataError(f"{got.root}: no training data (labelled train split) found")
    cfg = layout_defaults(cfg, splits["train"], say)
    # compared once the defaults are resolved, as config.json records them (--mask-value auto -> 100); what the
    # run trains on (files, labels, sizes, mtimes) is recorded and compared too
    record = data_record(splits, got.root)
    label_files = [f.record() for f in got.label_files]
    now = {**cfg.to_dict(), "data_root": data_root, "label_files": label_files}
    config_extra = (check_resume_config(out, now, cfg.allow_config_change, say, data=record) if resume
                    else {"data": record})
    config_extra["label_files"], config_extra["_weights"] = label_files, got.weights
    if cfg.skip_bad:
        from ..data.validate import drop_bad

        splits = {k: drop_bad(v, allow_nonfinite=cfg.mask_value is not None, log=say) for k, v in splits.items()}
    for ds in splits.values():
        say(ds.describe())
    if is_main:  # warn (not refuse) about the same file twice or identical files, above all across splits
        from ..data.validate import report_duplicates

        report_duplicates(splits, log=say)
    return cfg, data_root, splits, config_extra


def _class_balance(cfg: TrainConfig, train, weights: dict, device, say) -> tuple:
    """(config.json's ``class_ratio``, the loop's ``LossWeights`` or None): what the run trains on, logged."""
    pos_weight = resolve_pos_weight(cfg.pos_weight, train)
    record = class_record(train, pos_weight, cfg.sampler)
    say(class_line(record))
    if cfg.sampler == "balanced" and cfg.pos_weight is not None:
        say("warning: --sampler balanced already trains on equal classes; --pos-weight then weighs lenses again")
    sample = sample_weights(train, weights)
    if sample is not None:
        say(f"loss weights: {int((sample != 1).sum())} of {len(sample)} training samples weighted "
            f"(--source-weight, --grade1 weak), from {sample.min():g} to {sample.max():g}")
    return record, (LossWeights(sample, pos_weight, device) if sample is not None or pos_weight != 1.0 else None)


def measure_pixels(cfg: TrainConfig, splits: dict, say) -> PixelSettings:
    """The run's pixel settings: what ``cfg`` asks for, plus the noise estimate of ``--scaling auto`` and the
    per-band mean/std of ``--norm stats``, both measured on the training set."""
    pixels = PixelSettings.from_config(cfg, splits["train"].pixel_kind)
    opts = LoaderOptions(seed=cfg.seed, **pixels.pixel_fields())  # (bad options fail here, before any read)
    if cfg.scaling == "auto" and not splits["train"].eight_bit:
        opts.noise_sigma = estimate_noise(splits["train"], opts)
        say(f"scaling auto: arcsinh(x / ({AUTO_K:g} * noise)) per band, noise "
            + ", ".join(f"{v:.3g}" for v in opts.noise_sigma) + " (estimated on the training set)")
    if cfg.norm == "stats":
        opts.mean, opts.std = compute_stats(splits["train"], opts)
    return dataclasses.replace(pixels, noise_sigma=opts.noise_sigma, mean=opts.mean, std=opts.std)


def _restore(ck: Checkpoint, members: list, path: str, device, say) -> None:
    """``--resume``: the members' states and where training stood, from ``path`` (any checkpoint version)."""
    state = Checkpoint.load(path, map_location=device)
    if len(state.members) != len(members):
        raise CheckpointError(f"{path}: holds {len(state.members)} member(s), this run has {len(members)}")
    for m, ms in zip(members, state.members):
        try:
            load_member_state(m, ms)
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # weights or optimizer of another model
            detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path}: cannot restore member {m.spec.name!r} ({detail})") from None
    ck.epoch, ck.best_auc, ck.bad_epochs, ck.history = state.epoch, state.best_auc, state.bad_epochs, state.history
    ck.loader, ck.progress = state.loader, state.progress
    say(f"resumed {path} at epoch {ck.epoch + 1}"
        + (f", step {ck.loader['batches_done']}" if ck.loader and ck.loader.get("batches_done") else ""))


def _validate(members, val_loader, cfg: TrainConfig, device, select: str, show_progress: bool) -> dict:
    """The validation entries of an epoch's history line; ``val_select`` is the score best.pt is chosen by."""
    from ..metrics import roc_auc

    _, y, logits = predict(members, val_loader, cfg, device, desc="val", show_progress=show_progress)
    aucs = {k: roc_auc(y, sigmoid(z)) for k, z in logits.items()}
    auc = roc_auc(y, fuse(logits, "mean_prob"))
    loss = bce(y, logits)
    return {"val_auc": round(float(auc), 4), "val_auc_members": aucs if len(aucs) > 1 else None,
            "val_loss": round(loss, 5), "val_select": float(auc if select == "AUC" else -loss)}


def _epoch_line(line: dict, stats: dict, epochs: int, improved: bool) -> str:
    loss_txt = " ".join(f"{v:.4f}" for v in stats["loss"].values())
    return (f"epoch {line['epoch']}/{epochs}  loss {loss_txt}  "
            + (f"val AUC {line['val_auc']:.4f}  " if "val_auc" in line else "")
            + f"{stats['images_per_s']:.0f} img/s  data wait {100 * stats['data_wait_fraction']:.0f}%"
            + ("  *best*" if improved else ""))


def _note_chunks(stats: dict, batch_size: int, said: dict, say) -> dict:
    """Say (once per change) which members trained in chunks smaller than the batch; returns what was said."""
    split = {name: {s: n for s, n in sizes.items() if n < batch_size} for name, sizes in stats["chunk_sizes"].items()}
    split = {name: sizes for name, sizes in split.items() if sizes}
    if split and split != said:
        say("forward/backward in chunks (--memory-budget / --micro-batch): "
            + _chunk_note(split, stats["saved_bytes_per_sample"]))
        return split
    return said


def _chunk_note(split: dict, saved: dict) -> str:
    parts = []
    for name, sizes in split.items():
        for scale, n in sizes.items():
            per = saved.get(f"{name}@{scale}")
            parts.append(f"{name} at {scale} px: {n} samples"
                         + (f" ({per / 2 ** 20:.1f} MB kept for backward per sample)" if per else ""))
    return "; ".join(parts)


def _say_stems(specs, cfg, say) -> None:
    """Log which stem each ResNet member gets (--stem auto switches at 96 px, at a large cost in compute)."""
    from ..models import small_stem

    for sp in specs:
        small = small_stem(sp.arch, max(sp.scales), cfg.stem)
        if small is not None:
            say(f"{sp.name}: " + ("small-input stem (3x3 stride 1, no max-pool: 16x the pixels through every "
                                  "block, ~15x the compute)" if small else "ImageNet stem (7x7 stride 2 + max-pool)")
                + (f" chosen by --stem auto for {max(sp.scales)} px; --stem imagenet|small to choose"
                   if cfg.stem == "auto" else f" (--stem {cfg.stem})"))


def selection_metric(val, log=print) -> str:
    """What picks best.pt: the validation AUC, or the validation loss when the val split holds one class only
    (its AUC is undefined), with a warning."""
    if val is None or len(set(val.labels) - {-1}) == 2:
        return "AUC"
    counts = val.counts()
    log(f"warning: the val split has {counts['lens']} lens(es) and {counts['nonlens']} non-lens(es): its AUC is "
        "undefined, so the best epoch (best.pt) is chosen by the validation loss instead; give a val split with "
        "both classes to select by AUC")
    return "loss"


def bce(y: np.ndarray, logits: dict) -> float:
    """Mean binary cross-entropy of the members' logits against the labels ``y`` (NaN without labels)."""
    keep = y >= 0
    if not keep.any():
        return float("nan")
    yk = y[keep].astype(np.float64)
    return float(np.mean([np.mean(np.logaddexp(0.0, z[keep]) - yk * z[keep]) for z in logits.values()]))


def best_epoch(history: list) -> int:
    key = "val_select" if history and "val_select" in history[0] else "val_auc"
    if not history or key not in history[0]:
        return len(history)
    return int(max(history, key=lambda h: h[key])["epoch"])


def summary_line(result: dict, split: str) -> str:
    m = result.get("metrics", {})

    def f(k):
        v = m.get(k)
        return "n/a" if v is None else f"{v:.3f}"

    line = (f"{split}: AUC {f('roc_auc')}  PR-AUC {f('pr_auc')}  accuracy {f('accuracy')}  F1 {f('f1')}  "
            f"TPR0 {f('tpr0')}  TPR10 {f('tpr10')}  ECE {f('ece')}  (n={m.get('n')})")
    if m.get("search"):  # purity@N, completeness@N, completeness at purity, also at --prior
        from ..metrics import format_search

        line += "\n" + format_search(m["search"], split)
    return line
