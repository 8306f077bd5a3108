# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""A dependency-free COCO-style mask AP (101-point interpolated, IoU 0.50:0.95, no crowd regions, no area ranges): the
independent oracle that ``mpseg.evaluation.InstanceEvaluator`` (pycocotools' COCOeval) is checked against. It was the
shapes demo's metric before the demo moved to torchmetrics."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["mask_ap"]


def _mask_iou(a: Tensor, b: Tensor) -> Tensor:
    """[n, m] IoU between bool masks a [n, P] and b [m, P]."""
    a, b = a.float(), b.float()
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.zeros_like(inter))


def mask_ap(predictions: Sequence[dict], ground_truths: Sequence[dict], num_classes: int,
            iou_thresholds: Sequence[float] = tuple(0.5 + 0.05 * i for i in range(10))) -> dict:
    """COCO-style mask AP.

    Args:
        predictions: per image ``{"masks": bool [n, H, W], "scores": [n], "labels": [n]}``.
        ground_truths: per image ``{"masks": bool [m, H, W], "labels": [m]}``.
        num_classes: classes to evaluate (ids ``0..num_classes-1``; classes without GT are skipped, as COCO does).
        iou_thresholds: thresholds averaged for ``ap``.

    Returns:
        dict: ``ap`` (mean over thresholds and classes), ``ap50``, ``ap75`` (when 0.75 is a threshold), in [0, 100].
    """
    recall_points = torch.linspace(0, 1, 101)
    per_threshold = {}
    # IoUs per image and class computed once.
    cache = []
    for pred, gt in zip(predictions, ground_truths):
        entry = {}
        for c in range(num_classes):
            pm = pred["masks"][pred["labels"] == c].flatten(1).bool()
            gm = gt["masks"][gt["labels"] == c].flatten(1).bool()
            ps = pred["scores"][pred["labels"] == c].float()
            entry[c] = (ps, _mask_iou(pm, gm), gm.shape[0])
        cache.append(entry)
    for thr in iou_thresholds:
        aps = []
        for c in range(num_classes):
            num_gt = sum(entry[c][2] for entry in cache)
            if num_gt == 0:
                continue
            scores, hits = [], []
            for entry in cache:
                ps, iou, m = entry[c]
                order = torch.argsort(ps, descending=True, stable=True)
                taken = torch.zeros(m, dtype=torch.bool)
                for d in order.tolist():
                    scores.append(float(ps[d]))
                    best, best_iou = -1, thr
                    for g in range(m):
                        # COCO: the best-IoU GT not yet taken, with IoU at least the threshold.
                        if not taken[g] and float(iou[d, g]) >= best_iou:
                            best, best_iou = g, float(iou[d, g])
                    if best >= 0:
                        taken[best] = True
                    hits.append(best >= 0)
            if not scores:
                aps.append(0.0)
                continue
            order = torch.argsort(torch.tensor(scores), descending=True, stable=True)
            tp = torch.tensor(hits, dtype=torch.float64)[order]
            ctp, cfp = tp.cumsum(0), (1 - tp).cumsum(0)
            recall = ctp / num_gt
            precision = ctp / (ctp + cfp)
            # Monotone precision envelope, then sample at 101 recall points.
            precision = torch.flip(torch.cummax(torch.flip(precision, [0]), 0).values, [0])
            idx = torch.searchsorted(recall, recall_points.double(), side="left")
            sampled = torch.where(idx < len(precision), precision[idx.clamp(max=len(precision) - 1)],
                                  torch.zeros(101, dtype=torch.float64))
            aps.append(float(sampled.mean()))
        per_threshold[round(thr, 2)] = sum(aps) / len(aps) if aps else float("nan")
    values = list(per_threshold.values())
    return {
        "ap": 100.0 * sum(values) / len(values),
        "ap50": 100.0 * per_threshold.get(0.5, float("nan")),
        "ap75": 100.0 * per_threshold.get(0.75, float("nan")),
    }
