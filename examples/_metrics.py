# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The examples' held-out metrics, computed by maintained libraries (torchmetrics, with pycocotools-compatible AP).

* semantic mIoU: :class:`torchmetrics.classification.MulticlassJaccardIndex` (macro average over the classes present in
  the ground truth or the prediction);
* panoptic quality: :class:`torchmetrics.detection.PanopticQuality` (Kirillov et al.), overall and per class, so that
  the thing and stuff means can be reported too;
* mask AP over thing classes: :class:`torchmetrics.detection.MeanAveragePrecision` with ``iou_type="segm"`` (COCO's
  101-point AP over IoU 0.50:0.95; ``faster_coco_eval`` backend, ``pycocotools`` when only that one is installed).

This module only adapts mpseg's inference outputs to the libraries' input formats; every number comes from them.
"""

from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassJaccardIndex
from torchmetrics.detection import MeanAveragePrecision, PanopticQuality

__all__ = ["SegmentationMetrics", "coco_backend"]


def coco_backend() -> str:
    """The COCO evaluation backend torchmetrics should use: ``faster_coco_eval`` if installed, else ``pycocotools``."""
    for name in ("faster_coco_eval", "pycocotools"):
        if importlib.util.find_spec(name) is not None:
            return name
    raise ImportError("mask AP needs faster-coco-eval or pycocotools: pip install 'mpseg[examples]'")


class SegmentationMetrics:
    """Accumulates one held-out evaluation: mIoU, PQ (all / things / stuff) and mask AP (things).

    Args:
        is_thing (Sequence[bool]): per class id ``0..K-1``, True for thing classes.
        ignore_index (int): semantic label that is not scored.

    Call :meth:`update` once per image, then :meth:`compute`.
    """

    def __init__(self, is_thing: Sequence[bool], *, ignore_index: int = 255) -> None:
        self.is_thing = [bool(t) for t in is_thing]
        num_classes = len(self.is_thing)
        self.things = [c for c, t in enumerate(self.is_thing) if t]
        self.stuffs = [c for c, t in enumerate(self.is_thing) if not t]
        self.miou = MulticlassJaccardIndex(num_classes, average="none", ignore_index=ignore_index)
        # Unlike COCO's panoptic evaluation, torchmetrics drops the pixels a prediction leaves void from the
        # ground-truth segments' area (a half-covered object would score IoU 1). Void predictions therefore get a
        # category of their own (an extra stuff class, `num_classes`), which keeps them in the union as COCO does and
        # is left out of every mean below.
        self._void = num_classes
        self.pq = PanopticQuality(things=set(self.things), stuffs=set(self.stuffs) | {self._void},
                                  return_per_class=True)
        self.ap = MeanAveragePrecision(iou_type="segm", backend=coco_backend())
        self._present = torch.zeros(num_classes, dtype=torch.bool)  # classes in any GT or prediction (for mIoU)
        self._ignore_index = ignore_index

    def _panoptic_pairs(self, seg: Tensor, segments: Sequence[dict]) -> Tensor:
        """Segment-id map [H, W] + segment list -> torchmetrics' [H, W, 2] (category, instance id); void is (K, 0)."""
        out = torch.zeros((*seg.shape, 2), dtype=torch.long)
        out[..., 0] = self._void
        for s in segments:
            where = seg == s["id"]
            out[where, 0] = int(s["category_id"])
            out[where, 1] = int(s["id"])
        return out

    def update(self, *, sem_pred: Tensor, sem_gt: Tensor, pan_pred: Tensor, pan_pred_segments: Sequence[dict],
               pan_gt: Tensor, pan_gt_segments: Sequence[dict], instances: dict, gt_masks: Tensor,
               gt_labels: Tensor) -> None:
        """Add one image.

        Args:
            sem_pred, sem_gt (Tensor): [H, W] class ids.
            pan_pred, pan_gt (Tensor): [H, W] segment ids (0 = void) with their ``[{"id", "category_id"}]`` lists.
            instances (dict): ``{"masks": bool [n, H, W], "scores": [n], "labels": [n]}`` thing detections.
            gt_masks (Tensor): [m, H, W] bool masks of the ground-truth thing instances.
            gt_labels (Tensor): [m] their classes.
        """
        self.miou.update(sem_pred[None], sem_gt[None])
        keep = sem_gt != self._ignore_index
        self._present[sem_gt[keep].unique()] = True
        self._present[sem_pred[keep].unique()] = True
        self.pq.update(self._panoptic_pairs(pan_pred, pan_pred_segments)[None],
                       self._panoptic_pairs(pan_gt, pan_gt_segments)[None])
        self.ap.update([{"masks": instances["masks"].bool(), "scores": instances["scores"].float(),
                         "labels": instances["labels"].long()}],
                       [{"masks": gt_masks.bool(), "labels": gt_labels.long()}])

    def compute(self) -> dict:
        """``miou``, ``class_iou`` (NaN for absent classes), ``pq``, ``pq_th``, ``pq_st``, ``ap``, ``ap50``; in %."""
        iou = self.miou.compute().double()
        iou = torch.where(self._present, iou, torch.full_like(iou, float("nan")))
        pq_per_class = self.pq.compute().double().flatten().tolist()
        # torchmetrics' class order: sorted things, then sorted stuffs (the void class last); a class is scored when it
        # has a true positive, false positive or false negative.
        order = sorted(self.things) + sorted(self.stuffs) + [self._void]
        scored = (self.pq.true_positives + self.pq.false_positives + self.pq.false_negatives > 0).tolist()
        present_pq = {c: v for c, v, s in zip(order, pq_per_class, scored) if s and c != self._void}

        def mean(classes):
            values = [present_pq[c] for c in classes if c in present_pq]
            return 100.0 * sum(values) / len(values) if values else float("nan")

        ap = self.ap.compute()
        present = iou[~iou.isnan()]
        return {
            "miou": 100.0 * float(present.mean()) if present.numel() else float("nan"),
            "class_iou": (100.0 * iou).tolist(),
            "pq": mean(self.things + self.stuffs),
            "pq_th": mean(self.things),
            "pq_st": mean(self.stuffs),
            "ap": 100.0 * max(float(ap["map"]), 0.0),  # COCO reports -1 when no class has a ground truth
            "ap50": 100.0 * max(float(ap["map_50"]), 0.0),
        }
