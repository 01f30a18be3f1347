"""Run a training job: data -> loaders -> members -> epochs -> checkpoints -> test metrics and outputs.

The three trainers differ only in their members and which scales are active in an epoch
(``single.py``, ``multiscale.py``, ``ensemble.py``); this module is the loop around them.
"""
from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import os
import shutil
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist

from ..data import DataError, discover
from ..data.io import atomic_save_torch, atomic_write_json
from ..distributed import init as init_distributed
from ..pipelines import build_loader, compute_stats, estimate_noise, resolve_backend
from ..pipelines.options import AUTO_K, LoaderOptions
from .budget import parse_budget
from .config import TrainConfig, parse_mask_value
from .loop import dist_info, fuse, predict, sigmoid, train_epoch
from .members import load_member_state, make_member, member_state
from .outputs import write_outputs
from .rundir import RunDir, check_resume_config

DEFAULT_N = 4000
DEFAULT_SIZE = 64


def cache_dir() -> str:
    return os.environ.get("DALI_LENS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dali-lens"))


def output_dtype(cfg: TrainConfig, dataset) -> str:
    """The loader's output dtype for ``--dtype``: ``auto`` is uint8 for 8-bit images, float32 otherwise.

    With ``--batch-transforms`` ``auto`` stays float32: batch transforms see normalised float batches.
    """
    if cfg.dtype == "auto":
        return "uint8" if dataset.pixel_kind == "image" and not cfg.batch_transforms.strip() else "float32"
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


def trainer_module(name: str):
    from . import ensemble, multiscale, single

    return {"single": single, "multiscale": multiscale, "ensemble": ensemble}[name]


def _out_dir(cfg: TrainConfig) -> str:
    out = cfg.out or os.path.join("runs", f"{cfg.trainer}-{cfg.arch if cfg.trainer != 'ensemble' else 'ensemble'}-"
                                          f"{datetime.datetime.now():%Y%m%d-%H%M%S}")
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
    kind = trainer_module(cfg.trainer)
    specs = kind.member_specs(cfg)
    parse_budget(cfg.memory_budget)  # a bad value fails here, before any data is touched
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    out = _out_dir(cfg)
    resume = rundir.claim(out, cfg.resume, is_main, world, say)
    data_root = cfg.data_root or (default_dataset(say) if is_main else None)
    if world > 1:
        holder = [data_root]
        dist.broadcast_object_list(holder, src=0)
        data_root = holder[0]
    splits = discover(data_root, hdus=cfg.hdu_list, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if "train" not in splits:
        raise DataError(f"{data_root}: no training data (labelled train split) found")
    cfg = layout_defaults(cfg, splits["train"], say)
    # compared once the defaults are resolved, as config.json records them (--mask-value auto -> 100)
    config_extra = (check_resume_config(out, {**cfg.to_dict(), "data_root": data_root}, cfg.allow_config_change, say)
                    if resume else {})
    if cfg.skip_bad:
        from ..data.validate import drop_bad

        splits = {k: drop_bad(v, allow_nonfinite=cfg.mask_value is not None, log=say) for k, v in splits.items()}
    for ds in splits.values():
        say(ds.describe())
    if is_main:  # warn (not refuse) about the same file twice or identical files, above all across splits
        from ..data.validate import report_duplicates

        report_duplicates(splits, log=say)

    backend = resolve_backend(cfg.backend, splits["train"])
    all_scales = tuple(sorted({s for sp in specs for s in sp.scales}))
    base = LoaderOptions(scales=all_scales, batch_size=cfg.batch_size, seed=cfg.seed, shard_id=rank,
                         num_shards=world, num_workers=cfg.workers, scaling=cfg.scaling, scale_a=cfg.scale_a,
                         mask_value=cfg.mask_value, mask_channel=cfg.mask_channel, resize_mode=cfg.resize_mode,
                         max_shift=cfg.max_shift, dtype=output_dtype(cfg, splits["train"]))
    if cfg.scaling == "auto" and splits["train"].pixel_kind != "image":
        base.noise_sigma = estimate_noise(splits["train"], base)
        say(f"scaling auto: arcsinh(x / ({AUTO_K:g} * noise)) per band, noise "
            + ", ".join(f"{v:.3g}" for v in base.noise_sigma) + " (estimated on the training set)")
    if cfg.norm == "stats":
        base.mean, base.std = compute_stats(splits["train"], base)

    def loader(split: str, train: bool, scales=all_scales, tta: bool = False):
        transforms = tuple(t for t in cfg.batch_transforms.split(",") if t.strip()) if train else ()
        opts = LoaderOptions(**{**base.to_dict(), "scales": scales, "train": train, "augment": train, "tta": tta,
                                "transforms": transforms})
        return build_loader(splits[split], backend=backend, options=opts)

    say(f"backend {backend} on {device}; trainer {cfg.trainer}: "
        + ", ".join(f"{s.name}" for s in specs) + f"; {world} process(es)")
    _say_stems(specs, cfg, say)
    active = kind.active_scales(cfg, 0)
    train_loader = loader("train", True, active)
    if getattr(train_loader, "reads", ""):  # the GPU read path taken (DALI backend): cuFile or not, DALI or astropy
        say(train_loader.reads)
    in_chans = splits["train"].bands + int(cfg.mask_channel)
    members = [make_member(sp, in_chans, cfg, len(train_loader), device, distributed=world > 1)
               for sp in specs]

    start_epoch, best_auc, bad_epochs, history = 0, float("-inf"), 0, []
    ckpt_last, ckpt_best = os.path.join(out, "last.pt"), os.path.join(out, "best.pt")
    loader_state = None
    if resume:
        state = torch.load(ckpt_last, map_location=device, weights_only=False)
        for m, ms in zip(members, state["members"]):
            load_member_state(m, ms)
        start_epoch, best_auc = state["epoch"], state["best_auc"]
        bad_epochs, history = state["bad_epochs"], state["history"]
        loader_state = state.get("loader")
        say(f"resumed {ckpt_last} at epoch {start_epoch + 1}"
            + (f", step {loader_state['batches_done']}" if loader_state and loader_state.get("batches_done") else ""))

    def save(path: str, epoch: int, loader_state=None) -> None:
        if not is_main:
            return
        atomic_save_torch({"members": [member_state(m) for m in members], "epoch": epoch, "best_auc": best_auc,
                           "bad_epochs": bad_epochs, "history": history, "loader": loader_state,
                           "config": cfg.to_dict(), "norm": {"mean": base.mean, "std": base.std,
                                                                             "noise_sigma": base.noise_sigma},
                           "bands": splits["train"].bands, "kind": splits["train"].pixel_kind}, path)

    if is_main:
        atomic_write_json(os.path.join(out, "config.json"), {**cfg.to_dict(), "data_root": data_root,
                                                             "backend_resolved": backend, "world_size": world,
                                                             **config_extra})
    val_loader = loader("val", False, all_scales) if "val" in splits else None
    select = selection_metric(splits.get("val"), say)
    t_start = time.perf_counter()
    chunks_said: dict = {}
    for epoch in range(start_epoch, cfg.epochs):
        scales_now = kind.active_scales(cfg, epoch)
        if scales_now != active:
            active = scales_now
            train_loader = None  # the previous pipeline's buffers go before the next one is built
            gc.collect()
            train_loader = loader("train", True, active)
            say(f"epoch {epoch + 1}: training scales now {active}")
        train_loader.set_epoch(epoch)
        if loader_state is not None and loader_state.get("epoch", epoch) == epoch:
            train_loader.load_state_dict(loader_state)
        loader_state = None

        def on_step(step: int, epoch=epoch) -> None:
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                save(ckpt_last, epoch, train_loader.state_dict())

        stats = train_epoch(members, train_loader, cfg, device, epoch, active_scales=active, on_step=on_step,
                            show_progress=cfg.progress and is_main)
        split = {name: {s: n for s, n in sizes.items() if n < cfg.batch_size} for name, sizes in stats["chunk_sizes"].items()}
        split = {name: sizes for name, sizes in split.items() if sizes}
        if split and split != chunks_said:
            say("forward/backward in chunks (--memory-budget / --micro-batch): "
                + _chunk_note(split, stats["saved_bytes_per_sample"]))
            chunks_said = split
        line = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_images_per_s": round(stats["images_per_s"], 1),
                "data_wait_fraction": round(stats["data_wait_fraction"], 3)}
        if val_loader is not None:
            _, y, logits = predict(members, val_loader, cfg, device, desc="val", show_progress=cfg.progress and is_main)
            from ..metrics import roc_auc

            aucs = {k: roc_auc(y, sigmoid(z)) for k, z in logits.items()}
            auc = roc_auc(y, fuse(logits, "mean_prob"))
            loss = bce(y, logits)
            line.update(val_auc=round(float(auc), 4), val_auc_members=aucs if len(aucs) > 1 else None,
                        val_loss=round(loss, 5))
            auc = auc if select == "AUC" else -loss
            line["val_select"] = float(auc)
        else:
            auc = -stats["loss"][members[0].spec.name]
        history.append(line)
        improved = bool(auc > best_auc)  # a NaN score never improves
        if improved:
            best_auc, bad_epochs = float(auc), 0
        else:
            bad_epochs += 1
        loss_txt = " ".join(f"{v:.4f}" for v in stats["loss"].values())
        say(f"epoch {epoch + 1}/{cfg.epochs}  loss {loss_txt}  "
            + (f"val AUC {line['val_auc']:.4f}  " if "val_auc" in line else "")
            + f"{stats['images_per_s']:.0f} img/s  data wait {100 * stats['data_wait_fraction']:.0f}%"
            + ("  *best*" if improved else ""))
        if improved:
            save(ckpt_best, epoch + 1)
        save(ckpt_last, epoch + 1)
        if cfg.patience and bad_epochs >= cfg.patience:
            say(f"early stopping: no better validation {select} for {cfg.patience} epoch(s)")
            break
    if is_main and not os.path.exists(ckpt_best) and history:
        say(f"warning: no epoch had a finite validation {select}; best.pt holds the last epoch")
        save(ckpt_best, len(history))
    train_seconds = time.perf_counter() - t_start
    train_loader = None  # evaluation needs neither the training pipeline's buffers nor its threads

    if os.path.exists(ckpt_best) or world > 1:
        if world > 1:
            dist.barrier()
        best = torch.load(ckpt_best, map_location=device, weights_only=False)
        for m, ms in zip(members, best["members"]):
            load_member_state(m, ms, weights_only=True)
        del best  # the optimizer states in it would otherwise stay in memory through evaluation
    temperatures = None
    if cfg.trainer == "ensemble" and cfg.fusion == "temperature" and val_loader is not None:
        from ..metrics import fit_temperature

        _, y, logits = predict(members, val_loader, cfg, device, desc="calibrate", show_progress=False)
        temperatures = {k: float(fit_temperature(z, y)) for k, z in logits.items()}
        for m in members:
            m.temperature = temperatures[m.spec.name]
        save(ckpt_best, best_epoch(history))
        say("fitted temperatures: " + ", ".join(f"{k} {v:.3f}" for k, v in temperatures.items()))

    val_loader = None
    gc.collect()
    eval_split = "test" if "test" in splits else "val"
    eval_loader = loader(eval_split, False, all_scales, tta=cfg.tta)
    index, y, logits = predict(members, eval_loader, cfg, device, desc=eval_split, show_progress=cfg.progress and is_main)
    result = {}
    if is_main:
        result = write_outputs(out, splits[eval_split], index, y, logits, cfg, temperatures,
                               extra={"history": history, "train_seconds": round(train_seconds, 1),
                                      "backend": backend, "device": str(device), "world_size": world,
                                      "data_root": data_root, "eval_split": eval_split})
        say(summary_line(result, eval_split))
        say(f"outputs in {out}")
    if world > 1:
        dist.barrier()
    return result


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

    return (f"{split}: AUC {f('roc_auc')}  PR-AUC {f('pr_auc')}  accuracy {f('accuracy')}  F1 {f('f1')}  "
            f"TPR0 {f('tpr0')}  TPR10 {f('tpr10')}  ECE {f('ece')}  (n={m.get('n')})")
