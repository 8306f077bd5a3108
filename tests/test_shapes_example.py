# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The shapes demo's dataset and metrics: determinism, consistency of the ground truths, hand-computed metric values."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from _metrics import SegmentationMetrics  # noqa: E402
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


def _metric_inputs(sem_pred, sem_gt, pan_pred, pan_pred_segments, pan_gt, pan_gt_segments, instances=None,
                   gt_masks=None, gt_labels=None):
    empty = {"masks": torch.zeros(0, *sem_gt.shape, dtype=torch.bool), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.long)}
    return dict(sem_pred=sem_pred, sem_gt=sem_gt, pan_pred=pan_pred, pan_pred_segments=pan_pred_segments, pan_gt=pan_gt,
                pan_gt_segments=pan_gt_segments, instances=instances or empty,
                gt_masks=gt_masks if gt_masks is not None else empty["masks"],
                gt_labels=gt_labels if gt_labels is not None else empty["labels"])


def test_miou_wiring_hand_computed():
    metrics = SegmentationMetrics([True, True, False, False])
    gt = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 0]])
    seg = torch.ones(2, 3, dtype=torch.long)
    segments = [{"id": 1, "category_id": 2}]
    metrics.update(**_metric_inputs(pred, gt, seg, segments, seg, segments))
    out = metrics.compute()
    # class 0: tp 1, fn 1 -> 1/2; class 1: tp 2, fp 1 -> 2/3; class 2: 1/1; class 3 absent everywhere (not averaged);
    # the 255 pixel is ignored (its prediction 0 is no false positive).
    assert out["class_iou"][:3] == pytest.approx([50.0, 200 / 3, 100.0]) and out["class_iou"][3] != out["class_iou"][3]
    assert out["miou"] == pytest.approx((50.0 + 200 / 3 + 100.0) / 3)


def test_panoptic_quality_wiring_hand_computed():
    # 1x8 image. GT: thing seg 1 (class 0) px 0-3, stuff seg 2 (class 1) px 4-7.
    gt = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2]])
    gt_segments = [{"id": 1, "category_id": 0}, {"id": 2, "category_id": 1}]
    # Pred: seg 5 class 0 px 0-2 (IoU 3/4 with GT 1), seg 6 class 0 px 3-7 (no match: an FP of class 0).
    pred = torch.tensor([[5, 5, 5, 6, 6, 6, 6, 6]])
    pred_segments = [{"id": 5, "category_id": 0}, {"id": 6, "category_id": 0}]
    sem = torch.zeros(1, 8, dtype=torch.long)
    metrics = SegmentationMetrics([True, False])
    metrics.update(**_metric_inputs(sem, sem, pred, pred_segments, gt, gt_segments))
    out = metrics.compute()
    # class 0: TP 1 (IoU .75), FP 1 -> PQ = .75 / 1.5 = .5; class 1: FN 1 -> PQ 0.
    assert out["pq"] == pytest.approx(25.0)
    assert out["pq_th"] == pytest.approx(50.0) and out["pq_st"] == pytest.approx(0.0)
    # Perfect prediction: PQ 100; a void (0) prediction is no segment: IoU exactly 0.5 is not a match.
    perfect = SegmentationMetrics([True, False])
    perfect.update(**_metric_inputs(sem, sem, gt.clone(), gt_segments, gt, gt_segments))
    assert perfect.compute()["pq"] == pytest.approx(100.0)
    half = SegmentationMetrics([True, False])
    half.update(**_metric_inputs(sem, sem, torch.tensor([[7, 7, 0, 0, 2, 2, 2, 2]]),
                                 [{"id": 7, "category_id": 0}, {"id": 2, "category_id": 1}], gt, gt_segments))
    # class 0: FP 1 + FN 1 -> 0; class 1: perfect -> 1.
    out = half.compute()
    assert out["pq_th"] == pytest.approx(0.0) and out["pq_st"] == pytest.approx(100.0) and out["pq"] == 50.0
    # The void pixel counts in the union, as in COCO: IoU 3/4, a match.
    most = SegmentationMetrics([True, False])
    most.update(**_metric_inputs(sem, sem, torch.tensor([[7, 7, 7, 0, 2, 2, 2, 2]]),
                                 [{"id": 7, "category_id": 0}, {"id": 2, "category_id": 1}], gt, gt_segments))
    assert most.compute()["pq_th"] == pytest.approx(75.0)


def test_mask_ap_wiring_hand_computed():
    gt_masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    gt_masks[0, :2] = True
    gt_masks[1, 2:] = True
    wrong = torch.zeros(4, 4, dtype=torch.bool)
    wrong[:, :1] = True
    wrong[0] = False  # touches neither GT enough: IoU < 0.5 with both
    sem = torch.zeros(4, 4, dtype=torch.long)
    seg = torch.ones(4, 4, dtype=torch.long)
    segments = [{"id": 1, "category_id": 2}]

    def ap(masks, scores, gts=gt_masks):
        metrics = SegmentationMetrics([True, True, False])
        detections = {"masks": masks, "scores": torch.tensor(scores),
                      "labels": torch.zeros(len(scores), dtype=torch.long)}
        metrics.update(**_metric_inputs(sem, sem, seg, segments, seg, segments, detections, gts,
                                        torch.zeros(len(gts), dtype=torch.long)))
        return metrics.compute()

    out = ap(torch.stack([gt_masks[0], wrong, gt_masks[1]]), [0.9, 0.8, 0.7])  # class 1 has no GT: skipped
    # Ranked hits: T F T; precision 1, 1/2, 2/3; recall .5 .5 1. Envelope 1, 2/3, 2/3: 51 recall points at 1, 50 at 2/3.
    expected = 100 * (51 * 1.0 + 50 * (2 / 3)) / 101
    assert out["ap"] == pytest.approx(expected, abs=1e-4) and out["ap50"] == pytest.approx(expected, abs=1e-4)
    assert ap(gt_masks, [0.5, 0.4])["ap"] == pytest.approx(100.0)
    partial = gt_masks[0].clone()
    partial[1, 3] = False  # IoU 7/8 = .875: a hit for thresholds .50-.85 (8 of 10)
    assert ap(partial[None], [1.0], gt_masks[:1])["ap"] == pytest.approx(80.0)
    assert ap(torch.zeros(0, 4, 4, dtype=torch.bool), [])["ap"] == 0.0


def test_demo_script_runs_end_to_end(tmp_path):
    import shapes_demo

    # The documented smoke run (`make demo DEMO_ARGS=--quick`), both models side by side in two forked processes.
    results = shapes_demo.main(["--quick", "--parallel", "--threads", "1", "--no-progress", "--out", str(tmp_path)])
    assert set(results) == {"mask2former", "mp-former"}
    for r in results.values():
        assert 0.0 <= r["miou"] <= 100.0 and len(r["layer_iou"]) == 6
        assert all(0.0 <= v <= 1.0 for v in r["layer_iou"] + r["layer_same_query"])
        assert len(r["history"]["loss"]) == 8 and r["history"]["eval_step"] == [8]
        assert r["history"]["eval_seconds"] == [r["train_seconds"]] and r["train_seconds"] > 0
    for name in ("predictions.png", "curves.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 0
    import json

    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    for mode in ("mask2former", "mp-former"):
        for key in ("miou", "pq", "ap", "train_seconds"):
            assert saved[mode][key] == pytest.approx(results[mode][key])


def test_passing_points_and_summary_line():
    import shapes_demo

    def run(pq, ap, seconds, final_seconds):
        history = {"step": [100, 200, 300], "eval_step": [100, 200, 300], "eval_seconds": seconds, "eval_pq": pq,
                   "eval_ap": ap}
        return {"pq": pq[-1], "ap": ap[-1], "train_seconds": final_seconds, "history": history}

    results = {"mask2former": run([10.0, 20.0, 30.0], [5.0, 8.0, 12.0], [10.0, 20.0, 30.0], 30.0),
               "mp-former": run([15.0, 30.0, 40.0], [4.0, 7.0, 11.0], [12.0, 24.0, 36.0], 36.0)}
    passes = shapes_demo.passing_points(results)
    # PQ: the baseline ends at 30; MP-Former reaches 30 at its second checkpoint (step 200, 24 s = 80% of 30 s).
    assert passes["pq"] == {"target": 30.0, "step": 200, "seconds": 24.0, "fraction": pytest.approx(0.8)}
    assert passes["ap"] == {"target": 12.0, "step": None, "seconds": None, "fraction": None}
    line = shapes_demo.summary_line(results, passes)
    assert "final PQ (30.0) at step 200 (24 s, 80% of its training time)" in line
    assert "does not reach its final mask AP (12.0)" in line and "\n" not in line
    assert shapes_demo.passing_points({"mp-former": results["mp-former"]}) == {}


def test_demo_pilot_loss_weight_scales_only_the_pilot_terms():
    import shapes_demo

    _, criterion = shapes_demo.make_criterion(shapes_demo.parse_args(["--mp-loss-weight", "0.5"]))
    assert [criterion.weight(k) for k in ("loss_ce", "loss_mask_2", "loss_dice")] == [2.0, 5.0, 5.0]
    assert [criterion.weight(k) for k in ("loss_ce_mp", "loss_mask_mp_2", "loss_dice_mp_0")] == [1.0, 2.5, 2.5]
    _, default = shapes_demo.make_criterion(shapes_demo.parse_args([]))
    assert default.weight("loss_mask_mp_4") == 5.0  # MP-Former's: the pilots' losses weigh as the matching ones


def test_mp_vs_baseline_report_equal_steps_and_equal_time(tmp_path, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import mp_vs_baseline

    def arm(values, seconds):
        history = {"eval_step": [10, 20], "eval_seconds": seconds}
        for key in ("miou", "pq", "ap", "pq_th", "pq_st", "layer_iou", "layer_same_query"):
            history[f"eval_{key}"] = values
        return {"miou": values[-1], "pq": values[-1], "ap": values[-1], "train_seconds": seconds[-1],
                "history": history}

    args = {"steps": 20, "batch_size": 8, "image_size": 64, "dec_layers": 6, "points": 256, "val_images": 4,
            "point_noise": 0.0, "label_noise": 0.2, "mp_loss_weight": 1.0}
    runs = [{"args": {**args, "seed": seed},
             "results": {"mask2former": arm([10.0, 20.0 + seed], [10.0, 20.0]),
                         "mp-former": arm([20.0, 40.0 + seed], [15.0, 30.0])}} for seed in (0, 2)]
    summary = mp_vs_baseline.report(runs, str(tmp_path))
    # Equal steps: means over the two seeds (20, 22 -> 21 +- sqrt(2)).
    assert summary["equal_steps"]["mask2former"][1]["pq"] == pytest.approx((21.0, 2 ** 0.5))
    assert summary["equal_steps"]["mp-former"][0]["miou"] == pytest.approx((20.0, 0.0))
    # Equal time: MP-Former at the baseline's 20 s lies a third of the way from its 15 s to its 30 s checkpoint.
    assert summary["equal_time"]["mp-former"]["ap"][0] == pytest.approx((20 + 20 / 3 + 20 + 22 / 3) / 2)
    assert summary["step_seconds"]["ratio"] == pytest.approx((1.5, 0.0))
    assert mp_vs_baseline.at_seconds(runs[0]["results"]["mp-former"]["history"], "pq", 5.0) == 20.0
    assert mp_vs_baseline.at_seconds(runs[0]["results"]["mp-former"]["history"], "pq", 99.0) == 40.0
    assert "seed 0: mIoU +20.0, PQ +20.0, AP +20.0  (ahead on all three)" in capsys.readouterr().out
    assert (tmp_path / "summary.json").stat().st_size > 0
