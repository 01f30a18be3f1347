"""Evaluate trained lens finders on a labelled split: metrics with confidence intervals, completeness, plots.

Scores the split with every member of the given checkpoint(s) and their ensemble, and writes to --out:

  metrics.json     per-member and ensemble metrics side by side (accuracy, precision, recall, F1 at
                   --threshold; ROC AUC, PR AUC, ECE, TPR0, TPR10), bootstrap confidence intervals
                   (stratified percentile bootstrap, --n-boot replicates) for ROC AUC, TPR0 and TPR10,
                   completeness of the lenses at --threshold binned by every numeric catalogue column of
                   the samples (einstein_area, numb_pix_lensed_image, flux_lensed_image_in_sigma, ...), and
                   the expected contamination (false positives per true lens, purity) in a survey whose
                   lens fraction is --prior
  predictions.csv  file,id,label,score[,score_<member>...,member_std]
  roc.png          ROC curves of the members and the ensemble
  completeness_<column>.png   one per catalogue column
  gallery/         gallery.png and index.html (grading page) of the false positives and missed lenses
                   (--no-gallery: off)

TPR0 / TPR10 follow the lens-finding challenge (Metcalf et al. 2019): the highest true-positive rate with
no false positive / fewer than ten. Every file is written atomically; an existing non-empty --out is not
touched unless --overwrite.

Examples:
  python -m dali_lens.evaluate --checkpoint runs/single-small_cnn /data/lenses --out eval/small_cnn
  python -m dali_lens.evaluate -c runs/a -c runs/b /data/lenses --split val --fusion mean_logit --out eval/ab
  python -m dali_lens.evaluate -c runs/ens/best.pt /data/lenses --tta --fusion temperature --out eval/ens
  python -m dali_lens.evaluate -c runs/a challenge_data/ --prior 1e-4 --threshold 0.9 --out eval/challenge
Exit status: 0 done, 2 bad input (the message names the file), 130 interrupted.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

import numpy as np

from .choices import COUNT, FRACTION_OPEN, NON_NEGATIVE, PROBABILITY, SEED
from .cli import Parser, add_scoring_args, log, run_command
from .data.dataset import DataError, Dataset, parse_hdus

CI_METRICS = ("roc_auc", "tpr0", "tpr10")
TABLE = ("roc_auc", "pr_auc", "tpr0", "tpr10", "accuracy", "precision", "recall", "f1", "ece")


class EvaluateError(ValueError):
    """Bad arguments or an output directory that would be overwritten."""


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise EvaluateError(f"{out}: --out exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise EvaluateError(f"{out}: directory is not empty; refusing to overwrite it (pass --overwrite, or "
                            "choose another --out)")
    from .data.io import claim_outputs

    try:  # --overwrite replaces only what evaluate wrote there by its record
        claim_outputs(out, _COMMAND, _OUTPUTS, record=False)
    except FileExistsError as exc:
        raise EvaluateError(str(exc)) from None


_COMMAND = "dali_lens.evaluate"
_OUTPUTS = ("predictions.csv", "metrics.json", "roc.png", "gallery")


def numeric_columns(dataset: Dataset, labels: np.ndarray, wanted: list[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """Catalogue columns usable for completeness: finite for some lenses and not constant among them."""
    names: list[str] = []
    for s in dataset.samples:
        for k in s.meta:
            if k not in names:
                names.append(k)
    if wanted:
        missing = [w for w in wanted if w not in names]
        if missing:
            raise EvaluateError(f"{dataset.root}: no catalogue column(s) {missing} in the samples "
                                f"(available: {', '.join(names) or 'none'})")
        names = list(wanted)
    out = {}
    lens = labels == 1
    for k in names:
        v = np.array([float(s.meta.get(k, math.nan)) for s in dataset.samples], dtype=np.float64)
        lv = v[lens & np.isfinite(v)]
        if lv.size >= 2 and np.ptp(lv) > 0:
            out[k] = v
        elif wanted:
            log(f"note: column {k!r} does not vary among the lenses; no completeness for it")
    return out


def model_report(y: np.ndarray, s: np.ndarray, args) -> dict:
    from .metrics import bootstrap_ci, classification_metrics, expected_contamination, roc_auc, tpr0, tpr10

    rep = classification_metrics(y, s, args.threshold)
    fns = {"roc_auc": roc_auc, "tpr0": tpr0, "tpr10": tpr10}
    if args.n_boot > 0 and len(set(y.tolist())) == 2:
        rep["ci"] = {k: list(bootstrap_ci(y, s, fns[k], n_boot=args.n_boot, alpha=args.alpha, seed=args.seed))
                     for k in CI_METRICS}
    else:
        rep["ci"] = {k: [math.nan, math.nan] for k in CI_METRICS}
    rep["contamination"] = expected_contamination(y, s, args.threshold, args.prior)
    return rep


def _cell(rep: dict, key: str) -> str:
    v = rep.get(key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    text = f"{v:.3f}"
    ci = rep.get("ci", {}).get(key)
    if ci and all(c is not None and not math.isnan(c) for c in ci):
        text += f" [{ci[0]:.3f},{ci[1]:.3f}]"
    return text


def table(reports: dict[str, dict]) -> str:
    """Side-by-side text table: one row per metric, one column per model."""
    cols = list(reports)
    rows = [["metric"] + cols]
    for key in TABLE:
        rows.append([key] + [_cell(reports[c], key) for c in cols])
    rows.append(["fp_per_tp"] + [_cell(reports[c]["contamination"], "fp_per_tp") for c in cols])
    rows.append(["purity"] + [_cell(reports[c]["contamination"], "purity") for c in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "column"


def evaluate(args) -> dict:
    """``python -m dali_lens.evaluate``: score the labelled split, compute the metrics, write OUT, print a summary."""
    out = os.path.abspath(os.path.expanduser(args.out))
    _check_out(out, args.overwrite)
    if not 0 < args.prior < 1:
        raise EvaluateError(f"--prior must be in (0, 1), got {args.prior}")
    if not 0 < args.alpha < 1:
        raise EvaluateError(f"--alpha must be in (0, 1), got {args.alpha}")
    ens, dataset, backend, device = _load(args)
    all_labels = np.array(dataset.labels, dtype=np.int64)
    if not (all_labels >= 0).any():
        raise DataError(f"{dataset.root}: the {dataset.split} samples have no labels; nothing to evaluate "
                        "(use python -m dali_lens.predict to score unlabelled data)")
    fusion = args.fusion or ens.fusion
    wanted = [c.strip() for c in args.completeness_columns.split(",") if c.strip()] if args.completeness_columns \
        else None
    columns = numeric_columns(dataset, all_labels, wanted)  # fail early on a bad column name
    log(f"{dataset.describe()}")
    log(f"{ens.describe()}; fusion {fusion if len(ens.members) > 1 else 'n/a'}" + (", TTA x8" if args.tta else "")
        + f"; backend {backend} on {device}")
    logits, seconds = _score(ens, dataset, backend, args)
    score, probs, spread = ens.probabilities(logits, fusion)
    metrics = _metrics(ens, dataset, all_labels, score, probs, columns, fusion, args)
    metrics.update({"backend": backend, "device": str(device), "seconds": round(seconds, 2),
                    "images_per_s": round(len(dataset) / max(seconds, 1e-9), 1)})
    result = _write(out, ens, dataset, all_labels, score, probs, spread, metrics, args)
    _print_summary(out, dataset, metrics, len(result["plots"]), args)
    return result


def _load(args):
    """The ensemble of ``--checkpoint``, the data it is evaluated on (bad files dropped with ``--skip-bad``),
    the backend and the device: ``(ensemble, dataset, backend, device)``."""
    import torch

    from .data.inputs import gather_inputs
    from .inference import check_dataset, load_ensemble
    from .pipelines import resolve_backend

    resolve_backend(args.backend)  # a backend this machine lacks fails (BackendError) before anything is loaded
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    ens = load_ensemble(args.checkpoint, device)
    hdus = parse_hdus(args.hdus) or ens.hdus
    dataset = gather_inputs([args.data], args.split, hdus, float(ens.config.get("val_fraction", 0.15)),
                            int(ens.config.get("seed", 0)))
    check_dataset(ens, dataset)
    backend = resolve_backend(args.backend, dataset)
    if args.skip_bad:
        from .data.validate import drop_bad

        dataset = drop_bad(dataset, allow_nonfinite=ens.mask_value is not None, log=log)
    return ens, dataset, backend, device


def _score(ens, dataset: Dataset, backend: str, args) -> tuple[dict[str, np.ndarray], float]:
    """Every member's logits for every sample of ``dataset``, in dataset order, and the seconds it took."""
    from tqdm import tqdm

    from .inference import loader_options, score_batches
    from .pipelines import build_loader

    loader = build_loader(dataset, backend=backend, options=loader_options(ens, args.batch_size, args.tta,
                                                                           workers=args.workers))
    idx_parts, logit_parts = [], {k: [] for k in ens.names}
    t0 = time.perf_counter()
    with tqdm(total=len(dataset), unit="img", desc=f"evaluate {dataset.split}", disable=not args.progress,
              dynamic_ncols=True, leave=False) as bar:
        for idx, _, logits in score_batches(ens, loader):
            idx_parts.append(idx)
            for k, z in logits.items():
                logit_parts[k].append(z)
            bar.update(len(idx))
    seconds = time.perf_counter() - t0
    index = np.concatenate(idx_parts)
    order = np.argsort(index, kind="stable")
    index = index[order]
    if len(index) != len(dataset) or not np.array_equal(index, np.arange(len(dataset))):
        raise RuntimeError(f"the loader returned {len(index)} samples for {len(dataset)} in the split")
    return {k: np.concatenate(v)[order] for k, v in logit_parts.items()}, seconds


def _metrics(ens, dataset: Dataset, all_labels: np.ndarray, score: np.ndarray, probs: dict, columns: dict,
             fusion: str, args) -> dict:
    """metrics.json's content (without the backend and timing): counts, the ensemble's and each member's
    report (bootstrap intervals), completeness per catalogue column, over the labelled samples."""
    from .metrics import completeness_by_bin

    labelled = all_labels >= 0
    y = all_labels[labelled]
    if labelled.sum() < len(dataset):
        log(f"note: {len(dataset) - int(labelled.sum())} unlabelled sample(s) are left out of the metrics")
    if len(set(y.tolist())) < 2:
        log(f"warning: only {'lenses' if y.all() else 'non-lenses'} in {dataset.split}: ROC AUC, TPR0/10 and "
            "contamination are undefined")
    several = len(ens.members) > 1
    curves = {k: probs[k][labelled] for k in ens.names}
    members = {k: model_report(y, v, args) for k, v in curves.items()}
    completeness = {}
    for col, values in columns.items():
        v = values[labelled]
        completeness[col] = {
            "ensemble": completeness_by_bin(y, score[labelled], v, args.threshold, bins=args.bins),
            "members": ({k: completeness_by_bin(y, s, v, args.threshold, bins=args.bins) for k, s in curves.items()}
                        if several else {}),
        }
    return {
        "data": dataset.root, "split": dataset.split, "n": int(len(dataset)), "n_labelled": int(labelled.sum()),
        "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()),
        "checkpoints": ens.checkpoints,
        "members_info": [{"name": m.name, "arch": m.arch, "scales": list(m.scales), "temperature": m.temperature,
                          "checkpoint": m.checkpoint} for m in ens.members],
        "fusion": fusion, "tta": bool(args.tta), "threshold": args.threshold, "prior": args.prior,
        "bootstrap": {"n_boot": args.n_boot, "alpha": args.alpha, "seed": args.seed, "stratified": True,
                      "metrics": list(CI_METRICS)},
        "ensemble": model_report(y, score[labelled], args) if several else members[ens.names[0]],
        "members": members,
        "completeness": completeness,
    }


def _write(out: str, ens, dataset: Dataset, all_labels: np.ndarray, score: np.ndarray, probs: dict,
           spread: np.ndarray, metrics: dict, args) -> dict:
    """OUT: predictions.csv, roc.png, completeness_<column>.png, metrics.json (``metrics`` plus the plots'
    names, returned as written) and, with ``--gallery``, gallery/."""
    from .data.io import atomic_write_csv, atomic_write_json, claim_outputs
    from .metrics import plot_completeness, plot_roc, to_jsonable
    from .trainers.outputs import prediction_header, prediction_row

    several = len(ens.members) > 1
    os.makedirs(out, exist_ok=True)
    plot_names = [f"completeness_{_safe(col)}.png" for col in metrics["completeness"]]
    try:
        before = claim_outputs(out, _COMMAND, [*_OUTPUTS, *plot_names])
    except FileExistsError as exc:
        raise EvaluateError(str(exc)) from None
    for stale in sorted(before - set(plot_names)):  # an earlier evaluate's plots, by its record
        path = os.path.join(out, stale)
        if stale.startswith("completeness_") and os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
    rows = [prediction_row(s.path, s.id, all_labels[j], score[j], [probs[k][j] for k in ens.names] if several else (),
                           spread[j] if several else None) for j, s in enumerate(dataset.samples)]
    atomic_write_csv(os.path.join(out, "predictions.csv"), prediction_header(ens.names), rows)
    labelled = all_labels >= 0
    y = all_labels[labelled]
    plots = []
    if len(set(y.tolist())) == 2:
        extra = {k: (y, probs[k][labelled]) for k in ens.names} if several else None
        plots.append(plot_roc(y, score[labelled], os.path.join(out, "roc.png"),
                              title=f"{dataset.split}: {os.path.basename(out)}", extra_curves=extra,
                              label="ensemble" if several else ens.names[0]))
    for col, tab in metrics["completeness"].items():
        plots.append(plot_completeness(to_jsonable(tab["ensemble"]),
                                       os.path.join(out, f"completeness_{_safe(col)}.png"), col))
    result = to_jsonable(dict(metrics, plots=[os.path.basename(p) for p in plots]))
    atomic_write_json(os.path.join(out, "metrics.json"), result)
    if args.gallery:
        from .inspection import split_gallery

        split_gallery(os.path.join(out, "gallery"), dataset, score, all_labels, spread if several else None,
                      threshold=args.threshold, mask_value=ens.mask_value, log=log)
    return result


def _print_summary(out: str, dataset: Dataset, metrics: dict, n_plots: int, args) -> None:
    """The results on stdout: the metrics table (each member and the ensemble), contamination, what was written."""
    from .metrics import to_jsonable

    names = [m["name"] for m in metrics["members_info"]]
    shown = dict(metrics["members"]) if len(names) > 1 else {}
    shown["ensemble" if len(names) > 1 else names[0]] = metrics["ensemble"]
    print(table(to_jsonable(shown)))
    c = metrics["ensemble"]["contamination"]
    print(f"{dataset.split}: n={len(dataset)} ({metrics['n_pos']} lenses); at threshold {args.threshold} and prior "
          f"{args.prior:g}: {_num(c['fp_per_tp'])} false positives per true lens (purity {_num(c['purity'])})")
    print(f"wrote {out}/metrics.json, predictions.csv, {n_plots} plot(s); {metrics['images_per_s']} img/s")


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.3g}"


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="python -m dali_lens.evaluate", description=__doc__)
    ap.add_argument("data", metavar="DATA", help="labelled data: a dataset root, or a CSV manifest with labels")
    ap.add_argument("--checkpoint", "-c", action="append", required=True, metavar="CKPT",
                    help="a checkpoint (best.pt/last.pt) or a run directory (its best.pt); repeat for an ensemble")
    ap.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    ap.add_argument("--split", default="test",
                    help="split to evaluate: test (default), val (the training run's validation split), train, all; "
                         "DATA with no splits of its own (class folders, the challenge layout, flat files) is "
                         "evaluated whole")
    ap.add_argument("--threshold", type=PROBABILITY, default=0.5,
                    help="score threshold for accuracy/precision/recall/F1, completeness, contamination (default: 0.5)")
    ap.add_argument("--prior", type=FRACTION_OPEN, default=1e-3,
                    help="lens fraction of the survey for the expected contamination (default: 1e-3)")
    ap.add_argument("--n-boot", type=NON_NEGATIVE, default=1000, help="bootstrap replicates for the intervals (0 = none; "
                                                             "default: 1000)")
    ap.add_argument("--alpha", type=FRACTION_OPEN, default=0.05, help="intervals at level 1 - alpha (default: 0.05)")
    ap.add_argument("--seed", type=SEED, default=0, help="bootstrap seed (default: 0)")
    ap.add_argument("--gallery", action=argparse.BooleanOptionalAction, default=True,
                    help="write gallery/ (gallery.png, index.html: the 50 highest-scoring non-lenses and 50 "
                         "lowest-scoring lenses; see python -m dali_lens.inspect) (default: on)")
    ap.add_argument("--bins", type=COUNT, default=5, help="completeness: quantile bins per column (default: 5)")
    ap.add_argument("--completeness-columns", default=None, metavar="COLS",
                    help="comma-separated catalogue columns (default: every numeric column that varies among "
                         "the lenses)")
    add_scoring_args(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = parser()
    args = ap.parse_args(argv)
    from .inference import CheckpointError
    from .pipelines import BackendError

    return run_command(lambda: evaluate(args),
                       (DataError, CheckpointError, EvaluateError, BackendError, FileNotFoundError, PermissionError),
                       "interrupted: nothing was written", output=args.out)


if __name__ == "__main__":
    sys.exit(main())
