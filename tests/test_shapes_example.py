# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The shapes demo's dataset and metrics: determinism, consistency of the ground truths, hand-computed metric values."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from _metrics import PanopticMeter, SemanticMeter, mask_ap  # noqa: E402
from _shapes import IS_THING, NUM_CLASSES, ShapesDataset, collate  # noqa: E402


def test_dataset_is_seeded_and_splits_differ():
    a, b = ShapesDataset(4, image_size=64, seed=3), ShapesDataset(4, image_size=64, seed=3)
    assert torch.equal(a[2]["image"], b[2]["image"]) and torch.equal(a[2]["masks"], b[2]["masks"])
    assert not torch.equal(a[2]["image"], ShapesDataset(4, image_size=64, seed=4)[2]["image"])
    assert not torch.equal(a[2]["image"], ShapesDataset(4, split="val", image_size=64, seed=3)[2]["image"])
    with pytest.raises(IndexError):
        a[4]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(4, split="test")


def test_ground_truths_are_consistent():
    ds = ShapesDataset(12, image_size=80, seed=1)
    for sample in ds:
        image, labels, masks = sample["image"], sample["labels"], sample["masks"]
        assert image.shape == (3, 80, 80) and 0 <= float(image.min()) and float(image.max()) <= 1
        assert masks.dtype == torch.bool and masks.shape[0] == labels.shape[0]
        assert torch.equal(masks.sum(0), torch.ones(80, 80, dtype=torch.long))  # a partition of the image
        for lab, m in zip(labels.tolist(), masks):
            assert not IS_THING[lab] or int(m.sum()) >= ds.min_area
        sem = torch.zeros(80, 80, dtype=torch.long)
        for lab, m in zip(labels, masks):
            sem[m] = lab
        assert torch.equal(sem, sample["sem_seg"])
        assert [s["category_id"] for s in sample["segments_info"]] == labels.tolist()
        for seg, m in zip(sample["segments_info"], masks):
            assert torch.equal(sample["pan_seg"] == seg["id"], m)
            assert seg["isthing"] == IS_THING[seg["category_id"]]
    labels = torch.cat([s["labels"] for s in ds])
    assert set(labels.tolist()) == set(range(NUM_CLASSES))
    images, targets, _ = collate([ds[0], ds[1]])
    assert images.shape == (2, 3, 80, 80) and targets[0]["masks"].dtype == torch.float32


def test_semantic_miou_hand_computed():
    meter = SemanticMeter(3)
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    meter.update(pred, gt)
    # class 0: tp 1, fp 0, fn 1 -> 1/2; class 1: tp 2, fp 1 -> 2/3; class 2: 1/1. (255 ignored)
    assert meter.iou().tolist() == pytest.approx([0.5, 2 / 3, 1.0])
    assert meter.miou() == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    empty = SemanticMeter(4)
    empty.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    assert empty.miou() == 1.0  # classes absent everywhere do not count


def test_panoptic_quality_hand_computed():
    # 1x8 image. GT: thing seg 1 (class 0) px 0-3, stuff seg 2 (class 1) px 4-7.
    gt = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]])
    gt_segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]
    # Pred: seg 5 class 0 px 0-2 (IoU 3/4 with GT 1), seg 6 class 0 (wrong class) px 3-7.
    pred = torch.tensor([[5, 5, 5, 6, 6, 6, 6, 6]])
    pred_segments = [{"id": 5, "category_id": 0}, {"id": 6, "category_id": 0}]
    meter = PanopticMeter([True, False])
    meter.update(pred, pred_segments, gt, gt_segments)
    out = meter.compute()
    # class 0: TP 1 (IoU .75), FP 1 (seg 6) -> PQ = .75 / 1.5 = .5; class 1: FN 1 -> PQ 0.
    assert out["pq"] == pytest.approx(100 * (0.5 + 0.0) / 2)
    assert out["pq_th"] == pytest.approx(50.0) and out["pq_st"] == pytest.approx(0.0)
    assert out["sq"] == pytest.approx(100 * 0.75 / 2) and out["rq"] == pytest.approx(100 * (1 / 1.5) / 2)
    # Perfect prediction: PQ 100. Void (0) predictions are not segments.
    perfect = PanopticMeter([True, False])
    perfect.update(gt.clone(), gt_segments, gt, gt_segments)
    assert perfect.compute()["pq"] == pytest.approx(100.0)
    # IoU exactly 0.5 is not a match.
    half = PanopticMeter([True, False])
    half.update(torch.tensor([[7, 7, 0, 0, 0, 0, 0, 0]]), [{"id": 7, "category_id": 0}], gt, gt_segments[:1])
    assert half.compute()["pq"] == 0.0 and half.fp[0] == 1 and half.fn[0] == 1


def test_mask_ap_hand_computed():
    gt_masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt_masks[0, :2] = True
    gt_masks[1, 2:] = True
    gts = [{"masks": gt_masks, "labels": torch.tensor([0, 0])}]
    wrong = torch.zeros(4, 4, dtype=torch.bool)
    wrong[:, :1] = True
    wrong[0] = False  # touches neither GT enough: IoU < 0.5 with both
    preds = [{"masks": torch.stack([gt_masks[0], wrong, gt_masks[1]]), "scores": torch.tensor([0.9, 0.8, 0.7]),
              "labels": torch.tensor([0, 0, 0])}]
    out = mask_ap(preds, gts, num_classes=2)  # class 1 has no GT: skipped
    # Ranked hits: T F T; precision 1, 1/2, 2/3; recall .5 .5 1. Envelope 1, 2/3, 2/3: 51 recall points at 1, 50 at 2/3.
    expected = 100 * (51 * 1.0 + 50 * (2 / 3)) / 101
    assert out["ap"] == pytest.approx(expected) and out["ap50"] == pytest.approx(expected)
    perfect = [{"masks": gt_masks, "scores": torch.tensor([0.5, 0.4]), "labels": torch.tensor([0, 0])}]
    assert mask_ap(perfect, gts, 1)["ap"] == pytest.approx(100.0)
    # Partial overlap counts only below its IoU: a 3/4 IoU hit is a hit at .50-.75 (6 of 10 thresholds).
    partial = gt_masks[0].clone()
    partial[1, 3] = False  # IoU 7/8 = .875: hit for thresholds .50-.85 (8 of 10)
    one = [{"masks": partial[None], "scores": torch.tensor([1.0]), "labels": torch.tensor([0])}]
    one_gt = [{"masks": gt_masks[:1], "labels": torch.tensor([0])}]
    assert mask_ap(one, one_gt, 1)["ap"] == pytest.approx(80.0)
    none = [{"masks": torch.zeros(0, 4, 4, dtype=torch.bool), "scores": torch.zeros(0), "labels": torch.zeros(0)}]
    assert mask_ap(none, gts, 1)["ap"] == 0.0


@pytest.mark.slow
def test_demo_script_runs_end_to_end(tmp_path):
    import shapes_demo

    results = shapes_demo.main(["--steps", "2", "--batch-size", "2", "--train-images", "8", "--val-images", "4",
                                "--evals", "1", "--grid", "2", "--dec-layers", "2", "--image-size", "64",
                                "--no-progress", "--out",
                                str(tmp_path)])
    assert set(results) == {"mask2former", "mp-former"}
    for r in results.values():
        assert 0.0 <= r["miou"] <= 100.0 and len(r["layer_iou"]) == 2
        assert all(0.0 <= v <= 1.0 for v in r["layer_iou"] + r["layer_same_query"])
        assert len(r["history"]["loss"]) == 2 and r["history"]["eval_step"] == [2]
    for name in ("predictions.png", "curves.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_pilot_loss_weight_scales_only_the_pilot_terms():
    import shapes_demo

    _, criterion = shapes_demo.make_criterion(shapes_demo.parse_args(["--mp-loss-weight", "0.5"]))
    assert [criterion.weight(k) for k in ("loss_ce", "loss_mask_2", "loss_dice")] == [2.0, 5.0, 5.0]
    assert [criterion.weight(k) for k in ("loss_ce_mp", "loss_mask_mp_2", "loss_dice_mp_0")] == [1.0, 2.5, 2.5]
    _, paper = shapes_demo.make_criterion(shapes_demo.parse_args(["--mp-loss-weight", "1"]))
    assert paper.weight("loss_mask_mp_4") == 5.0  # MP-Former: the pilots' losses weigh as the matching ones
    _, demo_default = shapes_demo.make_criterion(shapes_demo.parse_args([]))
    assert demo_default.weight("loss_mask_mp_4") == 2.5  # the demo's default, see docs/guide/mask_pilot.rst
