"""The typed core of ``python -m dali_lens.evaluate``: :func:`evaluate_files` scores a labelled split with an
ensemble of checkpoints and writes metrics.json (metrics with bootstrap intervals, completeness, expected
contamination), predictions.csv, the ROC and completeness plots and the gallery. The command's docstring
(``dali_lens/evaluate.py``) says what a user sees.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from .cli import log
from .choices import AT_N
from .data.dataset import DataError, Dataset
from .metrics import DEFAULT_AT_N
from .score_inputs import load_scoring_inputs

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
        claim_outputs(out, COMMAND, _OUTPUTS, record=False)
    except FileExistsError as exc:
        raise EvaluateError(str(exc)) from None


COMMAND = "dali_lens.evaluate"
_OUTPUTS = ("predictions.csv", "metrics.json", "roc.png", "gallery")


def numeric_columns(dataset: Dataset, labels: np.ndarray, wanted: list[str] | None = None
                    ) -> dict[str, np.ndarray]:
    """Catalogue columns usable for completeness: finite for some lenses and not constant among them."""
    names: list[str] = []
    for s in dataset.samples:  # text columns (a tile name) are not numeric: only columns with a number somewhere
        for k, v in s.meta.items():
            if k not in names and not isinstance(v, str):
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
        v = np.array([math.nan if isinstance(x := s.meta.get(k, math.nan), str) else float(x)
                      for s in dataset.samples], dtype=np.float64)
        lv = v[lens & np.isfinite(v)]
        if lv.size >= 2 and np.ptp(lv) > 0:
            out[k] = v
        elif wanted:
            log(f"note: column {k!r} does not vary among the lenses; no completeness for it")
    return out


def model_report(y: np.ndarray, s: np.ndarray, opts: EvaluateOptions) -> dict:
    from .metrics import (bootstrap_ci, classification_metrics, expected_contamination, roc_auc, search_metrics,
                          tpr0, tpr10)

    rep = classification_metrics(y, s, opts.threshold)
    fns = {"roc_auc": roc_auc, "tpr0": tpr0, "tpr10": tpr10}
    if opts.n_boot > 0 and len(set(y.tolist())) == 2:
        rep["ci"] = {k: list(bootstrap_ci(y, s, fns[k], n_boot=opts.n_boot, alpha=opts.alpha, seed=opts.seed))
                     for k in CI_METRICS}
    else:
        rep["ci"] = {k: [math.nan, math.nan] for k in CI_METRICS}
    rep["contamination"] = expected_contamination(y, s, opts.threshold, opts.prior)
    rep["search"] = search_metrics(y, s, opts.at_n, opts.prior)  # purity/completeness at N and at purity
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
    first = reports[cols[0]]["search"]
    for key, name in (("purity_at_n", "purity@"), ("completeness_at_n", "completeness@")):
        rows.extend([f"{name}{n}"] + [_cell(reports[c]["search"][key], str(n)) for c in cols] for n in first["at_n"])
    rows.extend([f"completeness at purity {100 * float(p):g}%"]
                + [_cell(reports[c]["search"]["completeness_at_purity"], p) for c in cols]
                for p in first["completeness_at_purity"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "column"


@dataclass(frozen=True)
class EvaluateOptions:
    """The options of one evaluation (``evaluate_files``'s keyword parameters), as its steps read them."""

    split: str = "test"
    threshold: float = 0.5
    prior: float = 1e-3
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    gallery: bool = True
    bins: int = 5
    completeness_columns: str | None = None
    backend: str = "auto"
    batch_size: int = 64
    tta: bool = False
    fusion: str | None = None
    workers: int | None = None
    threads: int | None = None
    hdus: str | None = None
    skip_bad: bool = False
    progress: bool = True
    at_n: tuple[int, ...] = DEFAULT_AT_N


def evaluate_files(checkpoint: list[str] | str, data: str, out: str, *, overwrite: bool = False,
                   split: str = "test", threshold: float = 0.5, prior: float = 1e-3, n_boot: int = 1000,
                   alpha: float = 0.05, seed: int = 0, gallery: bool = True, bins: int = 5,
                   completeness_columns: str | None = None, backend: str = "auto", batch_size: int = 64,
                   tta: bool = False, fusion: str | None = None, workers: int | None = None,
                   threads: int | None = None, hdus: str | None = None, skip_bad: bool = False,
                   progress: bool = True, at_n: tuple[int, ...] | str = DEFAULT_AT_N) -> dict:
    """Score the labelled ``split`` of ``data`` with the ensemble of ``checkpoint``, compute the metrics and
    write ``out`` (metrics.json, predictions.csv, plots, gallery/; see ``python -m dali_lens.evaluate --help``
    for every option); prints the summary and returns metrics.json's content. Raises DataError, EvaluateError,
    CheckpointError or BackendError on bad input."""
    opts = EvaluateOptions(split=split, threshold=threshold, prior=prior, n_boot=n_boot, alpha=alpha, seed=seed,
                           gallery=gallery, bins=bins, completeness_columns=completeness_columns, backend=backend,
                           batch_size=batch_size, tta=tta, fusion=fusion, workers=workers, threads=threads,
                           hdus=hdus, skip_bad=skip_bad, progress=progress, at_n=_at_n(at_n))
    _check_ranges(opts)
    out = os.path.abspath(os.path.expanduser(out))
    _check_out(out, overwrite)
    ens, dataset, backend, device, _ = load_scoring_inputs(
        [checkpoint] if isinstance(checkpoint, str) else list(checkpoint), [data], opts.split, backend=opts.backend,
        threads=opts.threads, hdus=opts.hdus, skip_bad=opts.skip_bad)
    all_labels = np.array(dataset.labels, dtype=np.int64)
    if not (all_labels >= 0).any():
        raise DataError(f"{dataset.root}: the {dataset.split} samples have no labels; nothing to evaluate "
                        "(use python -m dali_lens.predict to score unlabelled data)")
    fusion = opts.fusion or ens.fusion
    wanted = [c.strip() for c in opts.completeness_columns.split(",") if c.strip()] if opts.completeness_columns \
        else None
    columns = numeric_columns(dataset, all_labels, wanted)  # fail early on a bad column name
    from .pipelines.injecting import for_evaluation  # issue 25: a run's --inject-eval set, repeated exactly

    inject, all_labels, injected_columns = for_evaluation(ens.config, dataset, all_labels, ens.pixels.mask_value, log)
    columns.update(injected_columns)
    log(f"{dataset.describe()}")
    log(f"{ens.describe()}; fusion {fusion if len(ens.members) > 1 else 'n/a'}" + (", TTA x8" if opts.tta else "")
        + f"; backend {backend} on {device}")
    logits, seconds = _score(ens, dataset, backend, opts, inject)
    score, probs, spread = ens.probabilities(logits, fusion)
    metrics = _metrics(ens, dataset, all_labels, score, probs, columns, fusion, opts)
    metrics.update({"backend": backend, "device": str(device), "seconds": round(seconds, 2),
                    "images_per_s": round(len(dataset) / max(seconds, 1e-9), 1)})
    result = _write(out, ens, dataset, all_labels, score, probs, spread, metrics, opts)
    _print_summary(out, dataset, metrics, len(result["plots"]), opts)
    return result


def _at_n(value) -> tuple[int, ...]:
    """``--at-n`` as a tuple of ints (text or a sequence), held to its range (``choices.AT_N``) first."""
    AT_N.check("--at-n", value)
    return AT_N.parse(value)


def _check_ranges(opts: EvaluateOptions) -> None:
    """Every option held to the range its flag documents (``choices``), before any work: the command's parser
    does it for the CLI, this for library callers (``choices.OptionRangeError`` naming the flag)."""
    from .choices import COUNT, FRACTION_OPEN, NON_NEGATIVE, PROBABILITY, SEED
    from .cli import check_options, scoring_parser

    check_options(scoring_parser(), {k: getattr(opts, k) for k in ("batch_size", "workers", "threads", "hdus")})
    for flag, kind, value in (("--threshold", PROBABILITY, opts.threshold), ("--prior", FRACTION_OPEN, opts.prior),
                              ("--n-boot", NON_NEGATIVE, opts.n_boot), ("--alpha", FRACTION_OPEN, opts.alpha),
                              ("--seed", SEED, opts.seed), ("--bins", COUNT, opts.bins)):
        kind.check(flag, value)


def _score(ens, dataset: Dataset, backend: str, opts: EvaluateOptions, inject=None
           ) -> tuple[dict[str, np.ndarray], float]:
    """Every member's logits for every sample of ``dataset``, in dataset order, and the seconds it took."""
    from tqdm import tqdm

    from .inference import loader_options, score_batches
    from .pipelines import build_loader

    options = loader_options(ens, opts.batch_size, opts.tta, workers=opts.workers)
    options.inject = inject
    loader = build_loader(dataset, backend=backend, options=options)
    idx_parts, logit_parts = [], {k: [] for k in ens.names}
    t0 = time.perf_counter()
    with tqdm(total=len(dataset), unit="img", desc=f"evaluate {dataset.split}", disable=not opts.progress,
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
             fusion: str, opts: EvaluateOptions) -> dict:
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
    members = {k: model_report(y, v, opts) for k, v in curves.items()}
    completeness = {}
    for col, values in columns.items():
        v = values[labelled]
        completeness[col] = {
            "ensemble": completeness_by_bin(y, score[labelled], v, opts.threshold, bins=opts.bins),
            "members": ({k: completeness_by_bin(y, s, v, opts.threshold, bins=opts.bins) for k, s in curves.items()}
                        if several else {}),
        }
    return {
        "data": dataset.root, "split": dataset.split, "n": int(len(dataset)), "n_labelled": int(labelled.sum()),
        "n_pos": int((y == 1).sum()), "n_neg": int((y == 0).sum()),
        "checkpoints": ens.checkpoints,
        "members_info": [{"name": m.name, "arch": m.arch, "scales": list(m.scales), "temperature": m.temperature,
                          "checkpoint": m.checkpoint} for m in ens.members],
        "fusion": fusion, "tta": bool(opts.tta), "threshold": opts.threshold, "prior": opts.prior,
        "bootstrap": {"n_boot": opts.n_boot, "alpha": opts.alpha, "seed": opts.seed, "stratified": True,
                      "metrics": list(CI_METRICS)},
        "ensemble": model_report(y, score[labelled], opts) if several else members[ens.names[0]],
        "members": members,
        "completeness": completeness,
    }


def _write(out: str, ens, dataset: Dataset, all_labels: np.ndarray, score: np.ndarray, probs: dict,
           spread: np.ndarray, metrics: dict, opts: EvaluateOptions) -> dict:
    """OUT: predictions.csv, roc.png, completeness_<column>.png, metrics.json (``metrics`` plus the plots'
    names, returned as written) and, with ``--gallery``, gallery/."""
    from .data.io import atomic_write_csv, atomic_write_json, claim_outputs
    from .metrics import plot_completeness, plot_roc, to_jsonable
    from .prediction_rows import prediction_header, prediction_row

    several = len(ens.members) > 1
    os.makedirs(out, exist_ok=True)
    plot_names = [f"completeness_{_safe(col)}.png" for col in metrics["completeness"]]
    try:
        before = claim_outputs(out, COMMAND, [*_OUTPUTS, *plot_names])
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
    if opts.gallery:
        from .inspection import split_gallery

        split_gallery(os.path.join(out, "gallery"), dataset, score, all_labels, spread if several else None,
                      threshold=opts.threshold, mask_value=ens.pixels.mask_value, log=log)
    return result


def _print_summary(out: str, dataset: Dataset, metrics: dict, n_plots: int, opts: EvaluateOptions) -> None:
    """The results on stdout: the metrics table (each member and the ensemble), contamination, purity and
    completeness at N and at purity (``metrics.format_search``), what was written."""
    from .metrics import format_search, to_jsonable

    names = [m["name"] for m in metrics["members_info"]]
    shown = dict(metrics["members"]) if len(names) > 1 else {}
    shown["ensemble" if len(names) > 1 else names[0]] = metrics["ensemble"]
    print(table(to_jsonable(shown)))
    c = metrics["ensemble"]["contamination"]
    print(f"{dataset.split}: n={len(dataset)} ({metrics['n_pos']} lenses); at threshold {opts.threshold} and prior "
          f"{opts.prior:g}: {_num(c['fp_per_tp'])} false positives per true lens (purity {_num(c['purity'])})")
    print(format_search(metrics["ensemble"]["search"], dataset.split))
    print(f"wrote {out}/metrics.json, predictions.csv, {n_plots} plot(s); {metrics['images_per_s']} img/s")


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return "inf" if isinstance(v, float) and math.isinf(v) else f"{v:.3g}"
