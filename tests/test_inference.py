# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
import math

import pytest
import torch
import torch.nn.functional as F

from mpseg.inference import instance_inference, panoptic_inference, resize_mask_logits, semantic_inference

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")

BIG = 8.0



def _logits(*probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def test_semantic_hand_computed():
    logits = _logits([0.6, 0.3, 0.1], [0.2, 0.2, 0.6])
    masks = torch.tensor([[[0.0, 50.0]], [[50.0, -50.0]]])  # sigmoid: q0 (0.5, 1), q1 (1, 0)
    expected = torch.tensor([[[0.6 * 0.5 + 0.2, 0.6]], [[0.3 * 0.5 + 0.2, 0.3]]])
    torch.testing.assert_close(semantic_inference(logits, masks), expected, rtol=0, atol=1e-6)
    batched = semantic_inference(logits[None].repeat(2, 1, 1), masks[None].repeat(2, 1, 1, 1))
    assert batched.shape == (2, 2, 1, 2)
    torch.testing.assert_close(batched[1], expected, rtol=0, atol=1e-6)
    empty = semantic_inference(torch.zeros(1, 0, 3), torch.zeros(1, 0, 4, 5))
    assert empty.shape == (1, 2, 4, 5) and not empty.any()


def _box(rows, cols, size=(4, 4)):
    m = torch.full(size, -BIG)
    m[rows, cols] = BIG
    return m


def test_panoptic_hand_computed():
    # classes: 0 thing, 1 and 2 stuff; probabilities are [class 0, class 1, class 2, no-object]
    queries = [
        ([0.90, 0.03, 0.02, 0.05], _box(slice(None), slice(0, 2))),  # thing, left half
        ([0.95, 0.02, 0.01, 0.02], _box(slice(0, 2), slice(2, 4))),  # thing, top right
        ([0.05, 0.90, 0.02, 0.03], _box(slice(2, 3), slice(2, 4))),  # stuff 1, row 2 right
        ([0.05, 0.85, 0.05, 0.05], _box(slice(3, 4), slice(2, 4))),  # stuff 1 again, row 3 right: merged
        ([0.10, 0.10, 0.10, 0.70], _box(slice(None), slice(None))),  # no-object: dropped
        ([0.20, 0.20, 0.50, 0.10], _box(slice(None), slice(None))),  # class 2 at 0.5 < 0.8: dropped
        ([0.85, 0.05, 0.05, 0.05], _box(slice(0, 2), slice(2, 4))),  # loses every pixel to query 1: dropped
    ]
    logits = _logits(*[q[0] for q in queries])
    masks = torch.stack([q[1] for q in queries])
    seg, info = panoptic_inference(logits, masks, is_thing=[True, False, False])
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [1, 1, 3, 3], [1, 1, 3, 3]], dtype=torch.int32)
    assert torch.equal(seg, expected)
    assert info == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": True, "category_id": 0},
                    {"id": 3, "isthing": False, "category_id": 1}]
    # the same with thing ids given as a set
    seg2, info2 = panoptic_inference(logits, masks, is_thing={0})
    assert torch.equal(seg2, expected) and info2 == info


def test_panoptic_overlap_threshold():
    logits = _logits([0.95, 0.02, 0.03], [0.02, 0.90, 0.08])
    masks = torch.tensor([[[BIG, BIG, -BIG, -BIG]], [[BIG, BIG, BIG, BIG]]])
    # query 1 wins only pixels 2 and 3 of its 4: 0.5 of its mask
    seg, info = panoptic_inference(logits, masks, is_thing=[True, True])
    assert seg.tolist() == [[1, 1, 0, 0]] and len(info) == 1
    seg, info = panoptic_inference(logits, masks, is_thing=[True, True], overlap_threshold=0.4)
    assert seg.tolist() == [[1, 1, 2, 2]] and info[1] == {"id": 2, "isthing": True, "category_id": 1}


def test_panoptic_empty_predictions_give_void():
    seg, info = panoptic_inference(_logits([0.1, 0.1, 0.8]), torch.full((1, 3, 5), BIG), is_thing=[True, False])
    assert seg.shape == (3, 5) and not seg.any() and info == []
    seg, info = panoptic_inference(torch.zeros(0, 3), torch.zeros(0, 3, 5), is_thing=[True, False])
    assert seg.shape == (3, 5) and not seg.any() and info == []
    with pytest.raises(ValueError, match="is_thing"):
        panoptic_inference(torch.zeros(2, 3), torch.zeros(2, 3, 5), is_thing=[True])


def test_instance_hand_computed():
    logits = _logits([0.7, 0.2, 0.1], [0.1, 0.6, 0.3])
    masks = torch.tensor([[[3.0, -3.0]], [[1.0, 1.0]]])
    out = instance_inference(logits, masks, topk=3)
    s3, s1 = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))
    torch.testing.assert_close(out["scores"], torch.tensor([0.7 * s3, 0.6 * s1, 0.2 * s3]), rtol=1e-5, atol=1e-6)
    assert out["labels"].tolist() == [0, 1, 1]
    assert out["masks"].tolist() == [[[True, False]], [[True, True]], [[True, False]]]
    assert instance_inference(logits, masks, topk=100)["scores"].shape == (4,)
    things = instance_inference(logits, masks, topk=3, is_thing=[False, True])
    assert things["labels"].tolist() == [1, 1]
    empty = instance_inference(torch.zeros(0, 3), torch.zeros(0, 4, 4))
    assert empty["masks"].shape == (0, 4, 4) and empty["scores"].shape == (0,) and empty["labels"].shape == (0,)


def test_resize_mask_logits():
    logits = torch.randn(2, 3, 8, 8)
    # mask resolution equal to the padded input and no final resize: a pure crop
    assert torch.equal(resize_mask_logits(logits, (8, 8), (5, 6)), logits[..., :5, :6])
    out = resize_mask_logits(logits, (32, 32), (20, 24), (40, 48))
    manual = F.interpolate(F.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)[..., :20, :24],
                           size=(40, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, manual, rtol=0, atol=1e-6)
    assert resize_mask_logits(logits[0], (32, 32), (20, 24)).shape == (3, 20, 24)
    constant = resize_mask_logits(torch.full((1, 4, 4), 2.5), (16, 16), (10, 7), (33, 21))
    torch.testing.assert_close(constant, torch.full((1, 33, 21), 2.5))
    assert resize_mask_logits(torch.zeros(0, 4, 4), (16, 16), (10, 7)).shape == (0, 10, 7)
    with pytest.raises(ValueError, match="fit in padded_size"):
        resize_mask_logits(logits, (16, 16), (20, 7))
