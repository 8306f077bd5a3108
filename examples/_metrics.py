# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Small, dependency-free segmentation metrics for the examples: mIoU, PQ (COCO panoptic) and mask AP (COCO style).

They follow the usual definitions (Cityscapes/ADE20K mIoU, Kirillov et al.'s panoptic quality, COCO's 101-point
interpolated AP over IoU 0.50:0.95) on in-memory tensors; they are for demos and sanity checks, not a replacement for
the official evaluation servers (no crowd regions, no area ranges).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["SemanticMeter", "PanopticMeter", "mask_ap"]


class SemanticMeter:
    """Accumulates a confusion matrix; ``miou()`` averages IoU over classes that occur in GT or prediction."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: Tensor, gt: Tensor) -> None:
        """pred, gt: [H, W] (or any equal shape) class ids."""
        keep = gt != self.ignore_index
        idx = gt[keep].long() * self.num_classes + pred[keep].long()
        self.confusion += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, -1)

    def iou(self) -> Tensor:
        """[K] IoU per class, NaN where the class appears nowhere."""
        tp = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))

    def miou(self) -> float:
        iou = self.iou()
        return float(iou[~iou.isnan()].mean()) if bool((~iou.isnan()).any()) else float("nan")


class PanopticMeter:
    """Panoptic quality accumulated over images (segments matched when IoU > 0.5, same category)."""

    def __init__(self, is_thing: Sequence[bool]) -> None:
        self.is_thing = list(is_thing)
        k = len(self.is_thing)
        self.tp = torch.zeros(k)
        self.fp = torch.zeros(k)
        self.fn = torch.zeros(k)
        self.iou_sum = torch.zeros(k, dtype=torch.float64)

    def update(self, pred_seg: Tensor, pred_segments: Sequence[dict], gt_seg: Tensor,
               gt_segments: Sequence[dict]) -> None:
        """Segment maps [H, W] (0 = void) with ``[{"id", "category_id"}]`` lists."""
        pred_seg, gt_seg = pred_seg.long().flatten(), gt_seg.long().flatten()
        gt_void = gt_seg == 0
        pred_cat = {s["id"]: s["category_id"] for s in pred_segments}
        gt_cat = {s["id"]: s["category_id"] for s in gt_segments}
        pred_area = {i: int((pred_seg == i).sum()) for i in pred_cat}
        gt_area = {i: int((gt_seg == i).sum()) for i in gt_cat}
        # Pairwise intersections in one pass over the pixels.
        stride = max(list(pred_cat) + [0]) + 1
        pair = torch.bincount(gt_seg * stride + pred_seg)
        matched_pred, matched_gt = set(), set()
        for g, gc in gt_cat.items():
            for p, pc in pred_cat.items():
                if pc != gc or g * stride + p >= pair.numel():
                    continue
                inter = int(pair[g * stride + p])
                if inter == 0:
                    continue
                # Pixels a prediction puts on GT void do not count against it (COCO panoptic rule).
                void_overlap = int(pair[p]) if p < pair.numel() else 0
                union = pred_area[p] + gt_area[g] - inter - void_overlap
                iou = inter / union
                if iou > 0.5:  # > 0.5 makes the match unique
                    self.tp[gc] += 1
                    self.iou_sum[gc] += iou
                    matched_pred.add(p)
                    matched_gt.add(g)
        for g, gc in gt_cat.items():
            if g not in matched_gt:
                self.fn[gc] += 1
        for p, pc in pred_cat.items():
            if p in matched_pred or pred_area[p] == 0:
                continue
            # A prediction lying mostly on void is ignored, as in COCO's evaluation.
            void_overlap = int(pair[p]) if p < pair.numel() and bool(gt_void.any()) else 0
            if void_overlap / pred_area[p] > 0.5:
                continue
            self.fp[pc] += 1

    def compute(self) -> dict:
        """``pq``, ``sq``, ``rq`` (means over categories with any TP/FP/FN) and ``pq_th``, ``pq_st``; in [0, 100]."""
        denom = self.tp + 0.5 * self.fp + 0.5 * self.fn
        present = denom > 0
        pq = torch.where(present, self.iou_sum.float() / denom.clamp(min=1e-9), torch.zeros_like(denom))
        sq = torch.where(self.tp > 0, self.iou_sum.float() / self.tp.clamp(min=1), torch.zeros_like(denom))
        rq = torch.where(present, self.tp / denom.clamp(min=1e-9), torch.zeros_like(denom))
        thing = torch.tensor(self.is_thing)

        def mean(values, select):
            sel = present & select
            return 100.0 * float(values[sel].mean()) if bool(sel.any()) else float("nan")

        every = torch.ones_like(thing)
        return {"pq": mean(pq, every), "sq": mean(sq, every), "rq": mean(rq, every),
                "pq_th": mean(pq, thing), "pq_st": mean(pq, ~thing)}


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
