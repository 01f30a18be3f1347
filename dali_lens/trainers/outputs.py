"""What every run writes: metrics.json, predictions.csv (file, label, score[, members]), roc.png, gallery/."""
from __future__ import annotations

import os

import numpy as np

from ..data.dataset import Dataset
from ..data.io import atomic_write_csv, atomic_write_json
from ..metrics import classification_metrics, plot_roc, search_metrics, to_jsonable
from ..prediction_rows import prediction_header, prediction_row
from ..scoring import probabilities


def _metrics(y: np.ndarray, s: np.ndarray, cfg) -> dict:
    """The headline metrics and, under "search", purity/completeness at N and at purity (also at the prior)."""
    return {**classification_metrics(y, s, cfg.threshold), "search": search_metrics(y, s, cfg.at_n, cfg.prior)}


def write_outputs(out: str, dataset: Dataset, index: np.ndarray, labels: np.ndarray, logits: dict, cfg,
                  temperatures=None, extra: dict | None = None) -> dict:
    names = list(logits)
    fusion = cfg.fusion if len(names) > 1 else "mean_prob"
    score, member_scores, spread = probabilities(logits, fusion, temperatures)
    labelled = labels >= 0
    result = {"split": dataset.split, "n": int(len(index))}
    if labelled.any():
        result["metrics"] = _metrics(labels[labelled], score[labelled], cfg)
        if len(names) > 1:
            result["members"] = {k: _metrics(labels[labelled], v[labelled], cfg) for k, v in member_scores.items()}
            result["fusion"] = fusion
            if temperatures:
                result["temperatures"] = temperatures
    result.update(extra or {})
    header = prediction_header(names)
    several = len(names) > 1
    rows = [prediction_row(s.path, s.id, labels[j], score[j],
                           [member_scores[k][j] for k in names] if several else (), spread[j] if several else None)
            for j, s in ((j, dataset.samples[int(i)]) for j, i in enumerate(index))]
    atomic_write_csv(os.path.join(out, "predictions.csv"), header, rows)
    if labelled.any() and len(set(labels[labelled].tolist())) == 2:
        extra_curves = ({k: (labels[labelled], v[labelled]) for k, v in member_scores.items()}
                        if len(names) > 1 else None)
        plot_roc(labels[labelled], score[labelled], os.path.join(out, "roc.png"),
                 title=f"{dataset.split}: {os.path.basename(out)}", extra_curves=extra_curves,
                 label="ensemble" if len(names) > 1 else names[0])
    result = to_jsonable(result)
    atomic_write_json(os.path.join(out, "metrics.json"), result)
    if getattr(cfg, "gallery", False):  # gallery/: the split's highest-scoring non-lenses, lowest-scoring lenses
        from ..inspection import split_gallery

        split_gallery(os.path.join(out, "gallery"), dataset.subset(index), score, labels,
                      spread if len(names) > 1 else None, threshold=cfg.threshold, mask_value=cfg.mask_value)
    return result
