# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""layer_consistency on hand-made decoder outputs with hand-computed IoUs and query changes."""

import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from mpseg.diagnostics import layer_consistency


def iou_matcher(outputs, targets):
    """Independent stand-in matcher: Hungarian on binary-mask IoU."""
    result = []
    for b, target in enumerate(targets):
        pred = outputs["pred_masks"][b].flatten(1) > 0
        gt = target["masks"].flatten(1).bool()
        if gt.shape[0] == 0:
            result.append((torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)))
            continue
        inter = (pred[:, None] & gt[None]).sum(-1).float()
        union = (pred[:, None] | gt[None]).sum(-1).float().clamp(min=1)
        rows, cols = linear_sum_assignment((-(inter / union)).numpy())
        result.append((torch.as_tensor(rows), torch.as_tensor(cols)))
    return result


def _logits(*regions):
    """Mask logits [Q, 4, 4]: +5 inside each query's region (a bool [4, 4] or None for empty), -5 outside."""
    out = torch.full((len(regions), 4, 4), -5.0)
    for q, region in enumerate(regions):
        if region is not None:
            out[q][region] = 5.0
    return out


def _case():
    left = torch.zeros(4, 4, dtype=torch.bool)
    left[:, :2] = True
    right = ~left
    left_top, right_top = left.clone(), right.clone()
    left_top[2:] = False
    right_top[2:] = False
    layers = [
        _logits(left, right, None),  # prediction 0: q0 = GT0, q1 = GT1
        _logits(left_top, None, right),  # prediction 1: q0 = half of GT0, GT1 moves to q2
        _logits(left, right, right_top),  # final: GT1 back on q1
    ]
    empty_image = torch.full((3, 4, 4), -5.0)
    preds = [{"pred_logits": torch.zeros(2, 3, 3), "pred_masks": torch.stack([m, empty_image])} for m in layers]
    outputs = dict(preds[-1], aux_outputs=preds[:-1])
    targets = [
        {"labels": torch.tensor([0, 1]), "masks": torch.stack([left, right])},
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)},
    ]
    return outputs, targets


def test_layer_consistency_hand_computed_next_anchor():
    outputs, targets = _case()
    stats = layer_consistency(outputs, targets, iou_matcher)
    # Pair (0,1), queries matched at 1: GT0->q0: |left_top|/|left| = 4/8; GT1->q2: empty vs right = 0.
    # Pair (1,2), queries matched at 2: GT0->q0: 4/8; GT1->q1: empty vs right = 0.
    assert stats["iou"] == pytest.approx([0.25, 0.25])
    assert stats["same_query"] == pytest.approx([0.5, 0.5])  # GT0 keeps q0, GT1 changes twice
    assert stats["mean_iou"] == pytest.approx(0.25)
    assert stats["mean_same_query"] == pytest.approx(0.5)
    assert stats["num_targets"] == 2 and stats["num_layers"] == 3


def test_layer_consistency_hand_computed_current_anchor():
    outputs, targets = _case()
    stats = layer_consistency(outputs, targets, iou_matcher, match_layer="current")
    # Pair (0,1): GT0->q0 0.5, GT1->q1 right vs empty 0. Pair (1,2): GT0->q0 0.5, GT1->q2 right vs right_top 0.5.
    assert stats["iou"] == pytest.approx([0.25, 0.5])
    assert stats["mean_iou"] == pytest.approx(0.375)


def test_identical_layers_are_fully_consistent_and_empty_agrees():
    outputs, targets = _case()
    final = {"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]}
    stats = layer_consistency(dict(final, aux_outputs=[final, final]), targets, iou_matcher)
    assert stats["iou"] == [1.0, 1.0] and stats["same_query"] == [1.0, 1.0]
    # A query predicting nothing at both layers agrees with itself (IoU 1, not NaN).
    none = torch.full((1, 3, 4, 4), -5.0)
    out = {"pred_logits": torch.zeros(1, 3, 3), "pred_masks": none}
    out["aux_outputs"] = [dict(out)]
    stats = layer_consistency(out, targets[:1], iou_matcher)
    assert stats["iou"] == [1.0]


def test_no_targets_gives_nan_and_generator_is_forwarded():
    outputs, targets = _case()
    seen = []

    def matcher(outs, tgts, generator=None):
        seen.append(generator)
        return iou_matcher(outs, tgts)

    gen = torch.Generator()
    stats = layer_consistency(outputs, [targets[1], targets[1]], matcher, generator=gen)
    assert math.isnan(stats["mean_iou"]) and math.isnan(stats["mean_same_query"]) and stats["num_targets"] == 0
    assert seen == [gen, gen, gen]


def test_bad_inputs():
    outputs, targets = _case()
    with pytest.raises(ValueError, match="match_layer"):
        layer_consistency(outputs, targets, iou_matcher, match_layer="prev")
    with pytest.raises(ValueError, match="one dict per image"):
        layer_consistency(outputs, targets[:1], iou_matcher)
    with pytest.raises(TypeError, match="pred_masks"):
        layer_consistency({"pred_logits": 1}, targets, iou_matcher)
