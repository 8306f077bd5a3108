# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Evaluators against hand-computed cases and independent implementations: torchmetrics' PanopticQuality (PQ),
the examples' dependency-free mask AP (AP) and, for the instance evaluator, pycocotools on the annotation file."""

import os
import sys

import pytest
import torch

from mpseg.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def test_semantic_hand_computed():
    evaluator = SemanticEvaluator(4)
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 3]])
    evaluator.update(pred, gt)
    out = evaluator.compute()
    # class 0: tp 1 / union 2; class 1: 2 / 3; class 2: 1 / 1; class 3: never in the ground truth and never predicted
    # on a valid pixel (its one prediction is on 255): absent from the mean. The 255 pixel is ignored.
    assert out["iou"][:3] == pytest.approx([50.0, 200 / 3, 100.0]) and out["iou"][3] != out["iou"][3]
    assert out["miou"] == pytest.approx((50 + 200 / 3 + 100) / 3)
    assert out["pacc"] == pytest.approx(400 / 5)
    assert out["macc"] == pytest.approx((50 + 100 + 100) / 3)
    assert out["fwiou"] == pytest.approx((2 * 50 + 2 * 200 / 3 + 100) / 5)
    # A class predicted on valid pixels but absent from the ground truth counts as IoU 0 (detectron2's mIoU).
    evaluator.update(torch.tensor([[3]]), torch.tensor([[2]]))
    out = evaluator.compute()
    assert out["miou"] == pytest.approx((50 + 200 / 3 + 50 + 0) / 4)


def test_semantic_bad_input():
    evaluator = SemanticEvaluator(3)
    with pytest.raises(ValueError, match=r"prediction holds classes outside \[0, 3\)"):
        evaluator.update(torch.tensor([[3]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match=r"target holds classes outside"):
        evaluator.update(torch.tensor([[0]]), torch.tensor([[7]]))
    with pytest.raises(ValueError, match=r"target has shape \(1, 2\), expected \(1, 1\)"):
        evaluator.update(torch.tensor([[0]]), torch.tensor([[0, 0]]))
    with pytest.raises(ValueError, match=r"integer Tensor\[H, W\]"):
        evaluator.update(torch.zeros(1, 1), torch.tensor([[0]]))


def test_panoptic_hand_computed_void_and_crowd():
    # 2x8 image; categories: 0 thing, 1 thing, 2 stuff.
    gt = torch.tensor([[1, 1, 1, 1, 2, 2, 0, 0],
                       [3, 3, 3, 3, 4, 4, 4, 4]])
    gt_segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1},
                   {"id": 3, "category_id": 2}, {"id": 4, "category_id": 0, "iscrowd": 1}]
    pred = torch.tensor([[5, 5, 5, 6, 6, 6, 6, 6],
                         [7, 7, 7, 7, 8, 8, 8, 9]])
    pred_segments = [{"id": 5, "category_id": 0},   # gt 1: inter 3, union 3 + 4 - 3 = 4 -> IoU 0.75: TP
                     {"id": 6, "category_id": 1},   # gt 2: inter 2, union 5 + 2 - 2 - 2 (on void) = 3 -> 2/3: TP
                     {"id": 7, "category_id": 2},   # gt 3: IoU 1: TP
                     {"id": 8, "category_id": 0},   # on the category-0 crowd region: ignored, not FP
                     {"id": 9, "category_id": 1}]   # on the crowd of another category: FP for category 1
    evaluator = PanopticEvaluator([True, True, False])
    evaluator.update(pred, pred_segments, gt, gt_segments)
    out = evaluator.compute()
    pq0, pq1, pq2 = 0.75, (2 / 3) / (1 + 0.5), 1.0
    assert [c["pq"] for c in out["per_class"]] == pytest.approx([100 * pq0, 100 * pq1, 100 * pq2])
    assert out["per_class"][1]["sq"] == pytest.approx(200 / 3) and out["per_class"][1]["rq"] == pytest.approx(200 / 3)
    assert out["pq"] == pytest.approx(100 * (pq0 + pq1 + pq2) / 3) and out["n"] == 3
    assert out["pq_th"] == pytest.approx(100 * (pq0 + pq1) / 2) and out["n_th"] == 2
    assert out["pq_st"] == pytest.approx(100.0) and out["n_st"] == 1
    # A missed ground truth is a FN; a prediction mostly on void is ignored.
    evaluator.reset()
    evaluator.update(torch.tensor([[0, 0, 0, 1]]), [{"id": 1, "category_id": 2}], torch.tensor([[1, 1, 0, 0]]),
                     [{"id": 1, "category_id": 0}])
    out = evaluator.compute()
    assert out["per_class"][0] == {"pq": 0.0, "sq": 0.0, "rq": 0.0} and out["n"] == 1 and out["n_st"] == 0
    assert out["pq_st"] != out["pq_st"]  # NaN: no stuff category seen


def test_panoptic_bad_input():
    evaluator = PanopticEvaluator([True])
    with pytest.raises(ValueError, match=r"ids \[2\] are in pred_seg but not in pred_segments"):
        evaluator.update(torch.tensor([[1, 2]]), [{"id": 1, "category_id": 0}], torch.tensor([[1, 1]]), [])
    with pytest.raises(ValueError, match=r"ids \[3\] in pred_segments but not in pred_seg"):
        evaluator.update(torch.tensor([[1, 1]]), [{"id": 1, "category_id": 0}, {"id": 3, "category_id": 0}],
                         torch.tensor([[1, 1]]), [])
    with pytest.raises(ValueError, match=r"segment id 1 has category_id 4, outside \[0, 1\)"):
        evaluator.update(torch.tensor([[1, 1]]), [{"id": 1, "category_id": 4}], torch.tensor([[1, 1]]), [])


def _random_panoptic(gen, size, things, stuffs, allow_void):
    """A random panoptic map: a few stuff bands, then rectangles of things; one segment per stuff category."""
    h, w = size
    seg = torch.zeros(h, w, dtype=torch.int64)
    segments = []
    next_id = 1
    bands = torch.randint(1, h, (len(stuffs) - 1,), generator=gen).sort().values.tolist()
    for category, (top, bottom) in zip(stuffs, zip([0] + bands, bands + [h])):
        if bottom > top:
            seg[top:bottom] = next_id
            segments.append({"id": next_id, "category_id": category})
            next_id += 1
    for _ in range(int(torch.randint(1, 6, (), generator=gen))):
        y, x = torch.randint(0, h - 2, (), generator=gen), torch.randint(0, w - 2, (), generator=gen)
        dy, dx = torch.randint(2, h // 2, (2,), generator=gen).tolist()
        seg[y:y + dy, x:x + dx] = next_id
        segments.append({"id": next_id, "category_id": things[int(torch.randint(len(things), (), generator=gen))]})
        next_id += 1
    if allow_void:
        seg[torch.rand(h, w, generator=gen) < 0.1] = 0
    present = set(torch.unique(seg).tolist())
    return seg, [s for s in segments if s["id"] in present]


def test_panoptic_equals_torchmetrics():
    # torchmetrics' PanopticQuality is an independent implementation; it agrees with panopticapi's definitions when
    # predictions have no void pixels (it also removes prediction-void pixels from the union, panopticapi does not)
    # and there is no crowd region (which it does not know).
    from torchmetrics.detection import PanopticQuality

    things, stuffs = [0, 1, 2], [3, 4]
    gen = torch.Generator().manual_seed(0)
    reference = PanopticQuality(things=set(things), stuffs=set(stuffs), return_sq_and_rq=True,
                                return_per_class=True)
    ours = PanopticEvaluator([True, True, True, False, False])
    for _ in range(12):
        gt, gt_segments = _random_panoptic(gen, (24, 20), things, stuffs, allow_void=True)
        # The prediction: the ground truth with shifted boxes, relabelled segments and new ones, no void.
        pred, pred_segments = _random_panoptic(gen, (24, 20), things, stuffs, allow_void=False)
        mix = torch.rand(24, 20, generator=gen) < 0.5
        pred = torch.where(mix & (gt > 0), gt + 100, pred)
        pred_segments = pred_segments + [{"id": s["id"] + 100, "category_id": s["category_id"]} for s in gt_segments]
        # One segment per stuff category, as panoptic_inference gives (torchmetrics merges them by definition).
        merged = {}
        for s in pred_segments:
            if s["category_id"] in stuffs:
                pred[pred == s["id"]] = merged.setdefault(s["category_id"], s["id"])
        present = set(torch.unique(pred).tolist())
        pred_segments = [s for s in pred_segments if s["id"] in present]
        ours.update(pred, pred_segments, gt, gt_segments)

        def pairs(seg, segments):
            category = torch.full_like(seg, 5)  # 5: a category outside things and stuffs = void for torchmetrics
            for s in segments:
                category[seg == s["id"]] = s["category_id"]
            return torch.stack([category, seg], -1)[None]

        reference.update(pairs(pred, pred_segments), pairs(gt, gt_segments))
    ref = reference.compute()  # [classes, 3] with pq, sq, rq, sorted things then stuffs
    out = ours.compute()
    per_class = torch.tensor([[c["pq"], c["sq"], c["rq"]] for c in out["per_class"]], dtype=torch.float64)
    torch.testing.assert_close(per_class, 100 * ref.double(), rtol=1e-5, atol=1e-4)
    assert out["pq"] > 5  # a non-trivial case: real matches happen


def test_instance_hand_computed():
    masks = torch.zeros(3, 10, 10, dtype=torch.bool)
    masks[0, :4, :4] = True
    masks[1, 5:, 5:] = True
    masks[2, :3, 6:] = True
    target = {"masks": masks[:2], "labels": torch.tensor([0, 0])}
    evaluator = InstanceEvaluator()
    # One of two ground truths found, plus a false positive of lower score: precision 1 up to recall 0.5,
    # so AP = 51 of 101 recall points at every IoU threshold.
    evaluator.update(1, {"masks": masks[[0, 2]], "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([0, 0])},
                     target=target)
    out = evaluator.compute()
    assert out["ap"] == pytest.approx(100 * 51 / 101) and out["ap50"] == pytest.approx(100 * 51 / 101)
    assert out["per_class"] == pytest.approx([100 * 51 / 101])
    # The false positive ranked first: precision 1/2 at recall 0.5 -> AP = 51/101 * 0.5.
    evaluator.reset()
    evaluator.update(1, {"masks": masks[[0, 2]], "scores": torch.tensor([0.3, 0.9]), "labels": torch.tensor([0, 0])},
                     target=target)
    assert evaluator.compute()["ap"] == pytest.approx(100 * 0.5 * 51 / 101)
    # Nothing detected: 0; no ground truth at all: NaN.
    evaluator.reset()
    empty = {"masks": masks[:0], "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    evaluator.update(1, empty, target=target)
    assert evaluator.compute()["ap"] == 0.0
    evaluator.reset()
    evaluator.update(1, empty, target={"masks": masks[:0], "labels": torch.zeros(0, dtype=torch.long)})
    assert evaluator.compute()["ap"] != evaluator.compute()["ap"]


def test_instance_equals_independent_mask_ap():
    # tests/_coco_ap_oracle.mask_ap is a dependency-free COCO AP (no crowd, no area ranges): on random data without
    # crowd regions it must give COCOeval's "all areas, 100 detections" AP.
    from _coco_ap_oracle import mask_ap

    gen = torch.Generator().manual_seed(1)
    evaluator = InstanceEvaluator(category_ids=[3, 8, 9])
    predictions, ground_truths = [], []
    for image_id in range(6):
        gt_masks = torch.zeros(4, 16, 16, dtype=torch.bool)
        for k in range(4):
            y, x = torch.randint(0, 10, (2,), generator=gen).tolist()
            gt_masks[k, y:y + 6, x:x + 6] = True
        gt_labels = torch.randint(0, 3, (4,), generator=gen)
        noise = torch.rand(4, 16, 16, generator=gen) < 0.03
        pred_masks = torch.cat([gt_masks ^ noise, torch.rand(3, 16, 16, generator=gen) < 0.3])
        pred_labels = torch.cat([gt_labels, torch.randint(0, 3, (3,), generator=gen)])
        scores = torch.rand(7, generator=gen)
        prediction = {"masks": pred_masks, "scores": scores, "labels": pred_labels}
        target = {"masks": gt_masks, "labels": gt_labels}
        evaluator.update(image_id, prediction, target=target)
        predictions.append(prediction)
        ground_truths.append(target)
    ours = evaluator.compute()
    reference = mask_ap(predictions, ground_truths, 3)
    assert ours["ap"] == pytest.approx(reference["ap"], abs=1e-6)
    assert ours["ap50"] == pytest.approx(reference["ap50"], abs=1e-6)
    assert 10 < ours["ap"] < 90


def test_instance_from_annotation_file_ignores_crowd(tmp_path):
    # Against the annotation file (pycocotools reads it): the dataset's own targets as predictions give AP 100, and
    # a detection on a crowd region is ignored by COCOeval instead of counting as a false positive.
    from make_tiny_coco import write_tiny_coco

    from mpseg.data import COCOInstanceDataset

    write_tiny_coco(str(tmp_path), num_images=3, image_size=40, seed=2)
    annotation_file = str(tmp_path / "annotations" / "instances.json")
    dataset = COCOInstanceDataset(str(tmp_path / "images"), annotation_file)
    evaluator = InstanceEvaluator(annotation_file)
    assert evaluator.category_ids == dataset.category_ids
    crowd_masks = 0
    for index in range(len(dataset)):
        _, target = dataset[index]
        masks, labels = target["masks"], target["labels"]
        crowd = [a for a in dataset.annotations(index) if a["iscrowd"]]
        if crowd:
            from pycocotools import mask as mask_api

            rle = crowd[0]["segmentation"]
            rle = mask_api.frPyObjects(rle, *rle["size"]) if isinstance(rle["counts"], list) else rle
            crowd_mask = torch.from_numpy(mask_api.decode(rle)).bool()[None]
            masks = torch.cat([masks, crowd_mask])
            labels = torch.cat([labels, torch.tensor([dataset.category_ids.index(crowd[0]["category_id"])])])
            crowd_masks += 1
        scores = torch.linspace(0.9, 0.5, len(labels))
        evaluator.update(target["image_id"], {"masks": masks, "scores": scores, "labels": labels})
    assert crowd_masks == 1
    out = evaluator.compute()
    assert out["ap"] == pytest.approx(100.0) and out["ap50"] == pytest.approx(100.0)
