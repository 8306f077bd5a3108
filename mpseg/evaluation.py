# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Evaluators giving the reference tools' numbers: semantic mIoU, panoptic PQ / SQ / RQ, instance mask AP.

Each evaluator is fed one image at a time (``update``) and reports in percent (``compute``). Under
``torch.distributed`` every rank updates with its own images and ``compute`` gathers the states of all ranks first
(with ``all_gather_object``, so any backend works), giving every rank the numbers of the whole split.

- :class:`SemanticEvaluator`: confusion matrix with an ignore index; mIoU, fwIoU, mACC, pACC as detectron2's
  ``SemSegEvaluator`` defines them.
- :class:`PanopticEvaluator`: panopticapi's ``pq_compute`` definitions (matching at IoU > 0.5 within a category,
  void and crowd handling, per-category and averaged over all / things / stuff).
- :class:`InstanceEvaluator`: pycocotools' ``COCOeval`` with ``iouType="segm"`` (needs the ``data`` extra), from
  :func:`mpseg.instance_inference` outputs, against an annotation file or ground truths passed in memory.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["SemanticEvaluator", "PanopticEvaluator", "InstanceEvaluator"]


def _gather(state) -> list:
    """The ``state`` of every rank (just ``[state]`` without an initialised process group of more than one rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _check_map(name: str, value: Tensor, shape=None) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 2 or value.is_floating_point() or value.is_complex():
        raise ValueError(f"{name} must be an integer Tensor[H, W], got "
                         f"{getattr(value, 'dtype', type(value).__name__)} of shape {tuple(getattr(value, 'shape', ()))}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)} (the prediction's)")
    return value.detach().to("cpu", torch.int64).flatten()


class SemanticEvaluator:
    """Semantic segmentation metrics from a confusion matrix (detectron2's ``SemSegEvaluator`` definitions).

    Args:
        num_classes (int): K; predictions must be in ``[0, K)``, ground truths in ``[0, K)`` or ``ignore_index``.
        ignore_index (int): ground-truth value of pixels left out (void).

    Example:
        >>> import torch
        >>> from mpseg.evaluation import SemanticEvaluator
        >>> evaluator = SemanticEvaluator(2)
        >>> evaluator.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 255]]))
        >>> evaluator.compute()["miou"]  # class 0: 1/2, class 1: 1/2
        50.0
    """

    def __init__(self, num_classes: int, *, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.reset()

    def reset(self) -> None:
        """Forgets every update."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Adds one image.

        Args:
            prediction (Tensor[H, W]): predicted class per pixel (e.g. ``semantic_inference(...).argmax(0)``).
            target (Tensor[H, W]): ground-truth class per pixel, ``ignore_index`` for void.
        """
        k = self.num_classes
        pred = _check_map("prediction", prediction)
        gt = _check_map("target", target, prediction.shape)
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(f"prediction holds classes outside [0, {k}): min {int(pred.min())}, max {int(pred.max())}")
        keep = gt != self.ignore_index
        gt, pred = gt[keep], pred[keep]
        if gt.numel() and (int(gt.min()) < 0 or int(gt.max()) >= k):
            raise ValueError(f"target holds classes outside [0, {k}) that are not ignore_index={self.ignore_index}")
        self.confusion += torch.bincount(gt * k + pred, minlength=k * k).view(k, k)

    def compute(self) -> dict:
        """Metrics over every update (of every rank).

        Returns:
            dict: ``miou``, ``fwiou``, ``macc``, ``pacc`` (percent) and per class ``iou`` and ``acc`` (lists, NaN for
            a class absent from the ground truth). A class absent from the ground truth but predicted counts as IoU
            0 in ``miou``; one absent from both does not count.
        """
        confusion = sum(_gather(self.confusion)).double()  # rows: ground truth, columns: prediction
        tp = confusion.diag()
        pos_gt, pos_pred = confusion.sum(1), confusion.sum(0)
        acc_valid, iou_valid = pos_gt > 0, (pos_gt + pos_pred) > 0
        nan = torch.full_like(tp, float("nan"))
        iou = torch.where(acc_valid, tp / (pos_gt + pos_pred - tp).clamp(min=1), nan)
        acc = torch.where(acc_valid, tp / pos_gt.clamp(min=1), nan)
        total = float(pos_gt.sum())

        def percent(value: float) -> float:
            return 100.0 * value if total > 0 else float("nan")

        return {
            "miou": percent(float(iou[acc_valid].sum()) / max(int(iou_valid.sum()), 1)),
            "fwiou": percent(float((iou[acc_valid] * pos_gt[acc_valid]).sum()) / max(total, 1.0)),
            "macc": percent(float(acc[acc_valid].mean()) if bool(acc_valid.any()) else 0.0),
            "pacc": percent(float(tp.sum()) / max(total, 1.0)),
            "iou": (100.0 * iou).tolist(),
            "acc": (100.0 * acc).tolist(),
        }


class PanopticEvaluator:
    """Panoptic quality with panopticapi's ``pq_compute`` definitions.

    Per image, a predicted and a ground-truth segment of the same category match when their IoU exceeds 0.5, where
    the union leaves out the prediction's pixels on ground-truth void. Per category: TP (matched pairs, their IoUs
    summed), FN (unmatched non-crowd ground truths), FP (unmatched predictions, except those lying more than half on
    void plus the crowd region of their category). ``PQ = sum IoU / (TP + FP/2 + FN/2)``, ``SQ = sum IoU / TP``,
    ``RQ = TP / (TP + FP/2 + FN/2)``, averaged over the categories with any TP, FP or FN (all, things, stuff).
    Ground-truth areas are the pixel counts of the map (panopticapi reads them from the JSON, equal for consistent
    files).

    Args:
        is_thing (Sequence[bool]): per category label 0..K-1, whether it is a thing.

    Example:
        >>> import torch
        >>> from mpseg.evaluation import PanopticEvaluator
        >>> evaluator = PanopticEvaluator([True])
        >>> gt = torch.tensor([[1, 1, 1, 1]])
        >>> pred = torch.tensor([[1, 1, 1, 0]])  # IoU 3/4 with the ground-truth segment
        >>> evaluator.update(pred, [{"id": 1, "category_id": 0}], gt, [{"id": 1, "category_id": 0}])
        >>> evaluator.compute()["pq"]
        75.0
    """

    def __init__(self, is_thing: Sequence[bool]) -> None:
        self.is_thing = [bool(v) for v in is_thing]
        if not self.is_thing:
            raise ValueError("is_thing must list at least one category")
        self.reset()

    def reset(self) -> None:
        """Forgets every update."""
        k = len(self.is_thing)
        self.iou = torch.zeros(k, dtype=torch.float64)
        self.tp = torch.zeros(k, dtype=torch.int64)
        self.fp = torch.zeros(k, dtype=torch.int64)
        self.fn = torch.zeros(k, dtype=torch.int64)

    def _categories(self, segments: Sequence[dict], what: str) -> dict[int, dict]:
        out = {}
        for s in segments:
            if not 0 <= int(s["category_id"]) < len(self.is_thing):
                raise ValueError(f"{what} segment id {s['id']} has category_id {s['category_id']}, outside "
                                 f"[0, {len(self.is_thing)})")
            out[int(s["id"])] = s
        return out

    def update(self, pred_seg: Tensor, pred_segments: Sequence[dict], gt_seg: Tensor,
               gt_segments: Sequence[dict]) -> None:
        """Adds one image.

        Args:
            pred_seg (Tensor[H, W]): predicted segment ids, 0 = void (e.g. from :func:`mpseg.panoptic_inference`).
            pred_segments (Sequence[dict]): ``{"id", "category_id"}`` per predicted segment (category = label).
            gt_seg (Tensor[H, W]): ground-truth segment ids, 0 = void.
            gt_segments (Sequence[dict]): ``{"id", "category_id"}`` and optionally ``"iscrowd"`` per ground-truth
                segment (a :class:`~mpseg.data.COCOPanopticDataset` target's ``segments_info``).

        Raises:
            ValueError: the maps differ in shape, a predicted id is in the map but not in ``pred_segments`` or the
                other way round (panopticapi's checks), or a category is out of range.
        """
        pred = _check_map("pred_seg", pred_seg)
        gt = _check_map("gt_seg", gt_seg, pred_seg.shape)
        pred_info = self._categories(pred_segments, "predicted")
        gt_info = self._categories(gt_segments, "ground-truth")

        pred_ids, pred_area = torch.unique(pred, return_counts=True)
        pred_area = dict(zip(pred_ids.tolist(), pred_area.tolist()))
        unlisted = [i for i in pred_area if i != 0 and i not in pred_info]
        absent = [i for i in pred_info if i not in pred_area]
        if unlisted or absent:
            raise ValueError(f"predicted segment ids {unlisted} are in pred_seg but not in pred_segments, ids "
                             f"{absent} in pred_segments but not in pred_seg")
        gt_ids, gt_area = torch.unique(gt, return_counts=True)
        gt_area = dict(zip(gt_ids.tolist(), gt_area.tolist()))

        # Intersections of every (ground truth, prediction) pair in one pass over the pixels.
        offset = int(pred.max()) + 1 if pred.numel() else 1
        pairs, counts = torch.unique(gt * offset + pred, return_counts=True)
        intersection = {(p // offset, p % offset): c for p, c in zip(pairs.tolist(), counts.tolist())}

        gt_matched, pred_matched = set(), set()
        for (g, p), inter in intersection.items():
            if g not in gt_info or p not in pred_info or gt_info[g].get("iscrowd", 0):
                continue
            category = int(gt_info[g]["category_id"])
            if category != int(pred_info[p]["category_id"]):
                continue
            union = pred_area[p] + gt_area[g] - inter - intersection.get((0, p), 0)
            iou = inter / union
            if iou > 0.5:  # > 0.5 makes the match unique
                self.tp[category] += 1
                self.iou[category] += iou
                gt_matched.add(g)
                pred_matched.add(p)
        crowd_of_category = {}
        for g, info in gt_info.items():
            if g in gt_matched:
                continue
            if info.get("iscrowd", 0):
                crowd_of_category[int(info["category_id"])] = g
                continue
            self.fn[int(info["category_id"])] += 1
        for p, info in pred_info.items():
            if p in pred_matched:
                continue
            category = int(info["category_id"])
            ignored = intersection.get((0, p), 0)
            if category in crowd_of_category:
                ignored += intersection.get((crowd_of_category[category], p), 0)
            if ignored / pred_area[p] > 0.5:
                continue
            self.fp[category] += 1

    def compute(self) -> dict:
        """PQ, SQ and RQ over every update (of every rank).

        Returns:
            dict: ``pq``, ``sq``, ``rq`` and ``n`` (categories averaged over) for all categories, the same with
            suffix ``_th`` (things) and ``_st`` (stuff), in percent (NaN where ``n`` is 0); and ``per_class``, a
            list of ``{"pq", "sq", "rq"}`` per label (zeros for a category with no TP, FP or FN, as panopticapi).
        """
        states = _gather((self.iou, self.tp, self.fp, self.fn))
        iou, tp, fp, fn = (sum(s[i] for s in states) for i in range(4))
        tp, fp, fn = tp.double(), fp.double(), fn.double()
        denominator = tp + 0.5 * fp + 0.5 * fn
        present = denominator > 0
        zero = torch.zeros_like(iou)
        pq = torch.where(present, iou / denominator.clamp(min=1e-12), zero)
        sq = torch.where(tp > 0, iou / tp.clamp(min=1), zero)
        rq = torch.where(present, tp / denominator.clamp(min=1e-12), zero)
        thing = torch.tensor(self.is_thing)
        results = {}
        for suffix, select in (("", torch.ones_like(thing)), ("_th", thing), ("_st", ~thing)):
            chosen = present & select
            n = int(chosen.sum())
            for name, values in (("pq", pq), ("sq", sq), ("rq", rq)):
                results[name + suffix] = 100.0 * float(values[chosen].mean()) if n else float("nan")
            results["n" + suffix] = n
        results["per_class"] = [{"pq": 100.0 * a, "sq": 100.0 * b, "rq": 100.0 * c}
                                for a, b, c in zip(pq.tolist(), sq.tolist(), rq.tolist())]
        return results


def _mask_api():
    from .data.coco import _mask_api as load

    return load()


class InstanceEvaluator:
    """COCO mask AP with pycocotools' ``COCOeval(iouType="segm")`` (needs the ``data`` extra).

    Predictions are :func:`mpseg.instance_inference` outputs at the image's original size, encoded as RLE when
    added. The ground truth is either a COCO annotation file (the official numbers: crowd regions, area ranges; the
    evaluation covers the images updated, as detectron2's) or targets passed to :meth:`update` (non-crowd masks).

    Args:
        annotation_file (str, optional): COCO instance JSON of the split; without it, ground truths come from
            ``update(..., target=...)``.
        category_ids (Sequence[int], optional): COCO category id of each label (``dataset.category_ids``); default:
            the file's category ids in sorted order (what :class:`~mpseg.data.COCOInstanceDataset` uses), or the
            labels themselves without a file.

    Example:
        >>> import torch
        >>> from mpseg.evaluation import InstanceEvaluator
        >>> evaluator = InstanceEvaluator()
        >>> masks = torch.zeros(1, 8, 8, dtype=torch.bool)
        >>> masks[0, 2:6, 2:6] = True
        >>> evaluator.update(7, {"masks": masks, "scores": torch.tensor([0.9]), "labels": torch.tensor([0])},
        ...                  target={"masks": masks, "labels": torch.tensor([0])})
        >>> round(evaluator.compute()["ap"], 6)  # COCOeval averages in float64
        100.0
    """

    def __init__(self, annotation_file: str | None = None, *, category_ids: Sequence[int] | None = None) -> None:
        _mask_api()
        self.annotation_file = annotation_file
        if category_ids is None and annotation_file is not None:
            import json

            with open(annotation_file) as f:
                category_ids = sorted(int(c["id"]) for c in json.load(f)["categories"])
        self.category_ids = None if category_ids is None else [int(c) for c in category_ids]
        self.reset()

    def reset(self) -> None:
        """Forgets every update."""
        self._detections: list[dict] = []
        self._ground_truths: list[dict] = []
        self._images: dict[int, tuple[int, int]] = {}

    def _category(self, label: int) -> int:
        if self.category_ids is None:
            return int(label)
        if not 0 <= label < len(self.category_ids):
            raise ValueError(f"label {label} outside [0, {len(self.category_ids)}) of category_ids")
        return self.category_ids[label]

    @staticmethod
    def _encode(masks: Tensor) -> list[dict]:
        import numpy as np

        if masks.shape[0] == 0:
            return []
        array = np.asfortranarray(masks.detach().to("cpu", torch.uint8).permute(1, 2, 0).numpy())
        rles = _mask_api().encode(array)
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")  # str: picklable and JSON-able
        return rles

    def update(self, image_id: int, prediction: dict, target: dict | None = None) -> None:
        """Adds the instances predicted for one image (and, without an annotation file, its ground truth).

        Args:
            image_id (int): COCO image id (a dataset target's ``image_id``).
            prediction (dict): ``masks`` bool [N, H, W] at the original image size, ``scores`` [N], ``labels`` [N]
                (contiguous labels).
            target (dict, optional): ``masks`` [M, H, W] and ``labels`` [M]; required without an annotation file,
                ignored with one.
        """
        masks, scores, labels = prediction["masks"], prediction["scores"], prediction["labels"]
        if masks.dim() != 3 or scores.shape != masks.shape[:1] or labels.shape != masks.shape[:1]:
            raise ValueError(f"prediction needs masks [N, H, W], scores [N], labels [N]; got {tuple(masks.shape)}, "
                             f"{tuple(scores.shape)}, {tuple(labels.shape)}")
        image_id = int(image_id)
        self._images[image_id] = tuple(masks.shape[-2:])
        for rle, score, label in zip(self._encode(masks > 0), scores.tolist(), labels.tolist()):
            self._detections.append({"image_id": image_id, "category_id": self._category(int(label)),
                                     "segmentation": rle, "score": float(score)})
        if self.annotation_file is not None:
            return
        if target is None:
            raise ValueError("InstanceEvaluator without an annotation_file needs the target of every image")
        if tuple(target["masks"].shape[-2:]) != tuple(masks.shape[-2:]) and masks.shape[0]:
            raise ValueError(f"target masks {tuple(target['masks'].shape)} and predicted masks "
                             f"{tuple(masks.shape)} differ in size")
        self._images[image_id] = tuple(target["masks"].shape[-2:])
        for rle, label in zip(self._encode(target["masks"] > 0), target["labels"].tolist()):
            self._ground_truths.append({"image_id": image_id, "category_id": self._category(int(label)),
                                        "segmentation": rle, "iscrowd": 0})

    def _ground_truth_api(self, ground_truths: list[dict], images: dict):
        from pycocotools.coco import COCO

        if self.annotation_file is not None:
            with contextlib.redirect_stdout(io.StringIO()):
                return COCO(self.annotation_file)
        mask_api = _mask_api()
        categories = self.category_ids if self.category_ids is not None else sorted(
            {g["category_id"] for g in ground_truths})
        dataset = {
            "images": [{"id": i, "height": h, "width": w} for i, (h, w) in images.items()],
            "categories": [{"id": c} for c in categories],
            "annotations": [dict(g, id=n + 1, area=float(mask_api.area(g["segmentation"])),
                                 bbox=mask_api.toBbox(g["segmentation"]).tolist())
                            for n, g in enumerate(ground_truths)],
        }
        api = COCO()
        api.dataset = dataset
        with contextlib.redirect_stdout(io.StringIO()):
            api.createIndex()
        return api

    def compute(self, *, verbose: bool = False) -> dict:
        """Mask AP over every update (of every rank).

        Args:
            verbose (bool): print COCOeval's summary table.

        Returns:
            dict: ``ap`` (IoU 0.50:0.95), ``ap50``, ``ap75``, ``aps``, ``apm``, ``apl`` in percent, and ``per_class``
            (AP per label, NaN for a category without ground truth), as detectron2's ``COCOEvaluator`` reports them.
            NaN everywhere when no ground truth was seen; 0 when nothing was detected.
        """
        from pycocotools.cocoeval import COCOeval

        states = _gather((self._detections, self._ground_truths, self._images))
        detections = [d for s in states for d in s[0]]
        ground_truths = [g for s in states for g in s[1]]
        images = {k: v for s in states for k, v in s[2].items()}
        names = ("ap", "ap50", "ap75", "aps", "apm", "apl")
        num_labels = len(self.category_ids) if self.category_ids is not None else 1 + max(
            [g["category_id"] for g in ground_truths] + [d["category_id"] for d in detections] + [-1])
        gt_api = self._ground_truth_api(ground_truths, images)
        has_gt = any(gt_api.getAnnIds(imgIds=list(images), iscrowd=False))
        if not has_gt:
            return {**dict.fromkeys(names, float("nan")), "per_class": [float("nan")] * num_labels}
        if not detections:
            return {**dict.fromkeys(names, 0.0), "per_class": [0.0] * num_labels}
        with contextlib.redirect_stdout(io.StringIO()) as captured:
            dt_api = gt_api.loadRes(detections)
            coco_eval = COCOeval(gt_api, dt_api, iouType="segm")
            coco_eval.params.imgIds = sorted(images)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        if verbose:
            print(captured.getvalue())
        results = {name: 100.0 * float(v) if v >= 0 else float("nan") for name, v in zip(names, coco_eval.stats)}
        # precision: [IoU thresholds, recall points, categories, area ranges, max detections]; area "all", 100 dets.
        precision = torch.from_numpy(coco_eval.eval["precision"][:, :, :, 0, -1].copy())
        category_order = list(coco_eval.params.catIds)
        per_class = []
        for label in range(num_labels):
            category = self._category(label)
            if category not in category_order:
                per_class.append(float("nan"))
                continue
            values = precision[:, :, category_order.index(category)]
            values = values[values > -1]
            per_class.append(100.0 * float(values.mean()) if values.numel() else float("nan"))
        results["per_class"] = per_class
        return results
