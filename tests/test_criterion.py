# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""SetCriterion: parity with transformers' Mask2FormerLoss, hand-computed losses, the pilot path and edge cases."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import Mask2FormerConfig
from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

import mpseg
from mpseg import HungarianMatcher, SetCriterion
from mpseg.ops.point_sampling import point_sample

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")

# The submodule, not the function that mpseg.ops re-exports under the same name.
point_sample_module = importlib.import_module("mpseg.ops.point_sampling")
matcher_module = importlib.import_module("mpseg.training.matcher")

K = 5


@pytest.fixture
def fixed_points(monkeypatch):
    """Replaces every random point draw by one fixed point set (the same for every mask and call), so that losses
    are deterministic functions of the data and can be recomputed by hand."""

    def fixed(num_sets, num_points, *, device=None, generator=None):
        base = torch.rand(1, num_points, 2, generator=torch.Generator(torch.get_default_device()).manual_seed(1000 + num_points))
        return base.expand(num_sets, -1, -1).clone().to(device)

    monkeypatch.setattr(point_sample_module, "uniform_points", fixed)
    monkeypatch.setattr(matcher_module, "uniform_points", fixed)
    return lambda num_points: fixed(1, num_points)[0]


def prediction(g, batch, queries, size=(12, 12), requires_grad=False):
    return {
        "pred_logits": (torch.randn(batch, queries, K + 1, generator=g) * 2).requires_grad_(requires_grad),
        "pred_masks": (torch.randn(batch, queries, *size, generator=g) * 3).requires_grad_(requires_grad),
    }


def make_targets(g, counts, size=(40, 36)):
    return [
        {"labels": torch.randint(0, K, (n,), generator=g), "masks": torch.rand(n, *size, generator=g) > 0.55}
        for n in counts
    ]


def reference_losses(pred, targets, pairs, points, num_masks, eos_coef=0.1):
    """Loss of one prediction under an assignment, written out pair by pair (float64)."""
    logits = pred["pred_logits"].detach().double()
    batch, queries = logits.shape[:2]
    classes = torch.full((batch, queries), K)
    for b, (src, tgt) in enumerate(pairs):
        for s, t in zip(src.tolist(), tgt.tolist()):
            classes[b, s] = targets[b]["labels"][t]
    numerator = denominator = 0.0
    for b in range(batch):
        log_probs = logits[b].log_softmax(-1)
        for q in range(queries):
            weight = eos_coef if classes[b, q] == K else 1.0
            numerator += -weight * float(log_probs[q, classes[b, q]])
            denominator += weight
    bce = dice = 0.0
    for b, (src, tgt) in enumerate(pairs):
        for s, t in zip(src.tolist(), tgt.tolist()):
            x = point_sample(pred["pred_masks"].detach()[b, s].double()[None, None], points.double()[None])[0, 0]
            y = point_sample(targets[b]["masks"][t].double()[None, None], points.double()[None])[0, 0]
            bce += float(F.binary_cross_entropy_with_logits(x, y))
            p = x.sigmoid()
            dice += float(1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1))
    return {"loss_ce": numerator / denominator, "loss_mask": bce / num_masks, "loss_dice": dice / num_masks}


def assert_losses(actual, expected, suffix=""):
    for key, value in expected.items():
        assert float(actual[key + suffix]) == pytest.approx(value, rel=1e-5, abs=1e-6), key + suffix


# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_transformers_values_and_gradients(seed):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    final = prediction(g, 3, 10, requires_grad=True)
    aux = [prediction(g, 3, 10, requires_grad=True) for _ in range(2)]
    targets = make_targets(g, (3, 0, 6))
    num_points = 300
    criterion = SetCriterion(
        K, HungarianMatcher(cost_class=1.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points), num_points=num_points
    )
    torch.manual_seed(50 + seed)
    ours = criterion({**final, "aux_outputs": aux}, targets)
    config = Mask2FormerConfig(
        num_labels=K, no_object_weight=0.1, train_num_points=num_points, oversample_ratio=3.0,
        importance_sample_ratio=0.75, class_weight=1.0, mask_weight=5.0, dice_weight=5.0,
    )
    torch.manual_seed(50 + seed)
    hf_aux = [{"masks_queries_logits": a["pred_masks"], "class_queries_logits": a["pred_logits"]} for a in aux]
    masks, labels = [t["masks"].float() for t in targets], [t["labels"] for t in targets]
    theirs = Mask2FormerLoss(config, weight_dict={})(
        final["pred_masks"], final["pred_logits"], masks, labels, auxiliary_predictions=hf_aux
    )
    assert len(theirs) == 9 and set(ours) == {k.replace("cross_entropy", "ce") for k in theirs} | {"loss"}
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key.replace("cross_entropy", "ce")], value, rtol=1e-5, atol=1e-6)
    leaves = [t for p in [final, *aux] for t in p.values()]
    ours_grad = torch.autograd.grad(sum(v for k, v in ours.items() if k != "loss"), leaves)
    theirs_grad = torch.autograd.grad(sum(theirs.values()), leaves)
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_losses_by_hand_and_default_weights(fixed_points):
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    final = prediction(g, 2, 6)
    aux = [prediction(g, 2, 6)]
    targets = make_targets(g, (2, 3))
    matcher = HungarianMatcher(num_points=64)
    criterion = SetCriterion(K, matcher, num_points=48, importance_sample_ratio=0.0)
    losses = criterion({**final, "aux_outputs": aux}, targets)
    points = fixed_points(48)
    assert_losses(losses, reference_losses(final, targets, matcher(final, targets), points, num_masks=5))
    assert_losses(losses, reference_losses(aux[0], targets, matcher(aux[0], targets), points, num_masks=5), "_0")
    expected_total = sum(
        (2.0 if key.startswith("loss_ce") else 5.0) * float(value) for key, value in losses.items() if key != "loss"
    )
    assert losses["loss"].item() == pytest.approx(expected_total, rel=1e-6)
    assert set(losses) == {"loss", "loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}


def test_weight_dict_lookup_and_validation():
    criterion = SetCriterion(
        K, HungarianMatcher(), weight_dict={"loss_ce": 1.0, "loss_mask_mp": 3.0, "loss_dice_4": 7.0, "loss_dice": 0.5}
    )
    assert criterion.weight("loss_ce_mp_2") == 1.0
    assert criterion.weight("loss_mask_mp_2") == 3.0
    assert criterion.weight("loss_mask") == 0.0  # not given: left out of `loss`
    assert criterion.weight("loss_dice_4") == 7.0 and criterion.weight("loss_dice_3") == 0.5
    losses = {"loss_ce": torch.tensor(2.0), "loss_mask": torch.tensor(9.0), "loss_dice_4": torch.tensor(1.0)}
    assert float(criterion.weighted_sum(losses)) == pytest.approx(2.0 + 7.0)
    with pytest.raises(ValueError, match="'loss_bce' names no loss"):
        SetCriterion(K, HungarianMatcher(), weight_dict={"loss_bce": 1.0})
    assert SetCriterion(K, HungarianMatcher()).weight("loss_dice_mp_8") == 5.0


# ---------------------------------------------------------------------------------------------------------------------
def pilot_batch(g, counts, num_groups, layers=2):
    max_objects = max(counts)
    target_index = torch.full((len(counts), num_groups * max_objects), -1, dtype=torch.int64)
    for b, n in enumerate(counts):
        for group in range(num_groups):
            target_index[b, group * max_objects : group * max_objects + n] = torch.arange(n)
    num_slots = target_index.shape[1]
    pilot = {**prediction(g, len(counts), num_slots), "target_index": target_index}
    pilot["aux_outputs"] = [prediction(g, len(counts), num_slots) for _ in range(layers)]
    return pilot


@pytest.mark.parametrize("give_num_groups", [True, False])
def test_pilot_losses_by_hand(fixed_points, give_num_groups):
    g = torch.Generator(torch.get_default_device()).manual_seed(4)
    targets = make_targets(g, (2, 1))
    outputs = {**prediction(g, 2, 6), "aux_outputs": [prediction(g, 2, 6) for _ in range(2)]}
    pilot = pilot_batch(g, (2, 1), num_groups=2)
    assert pilot["target_index"].tolist() == [[0, 1, 0, 1], [0, -1, 0, -1]]
    if give_num_groups:
        pilot["num_groups"] = 2
    criterion = SetCriterion(K, HungarianMatcher(num_points=32), num_points=40, importance_sample_ratio=0.0)
    without_pilot = criterion(outputs, targets)
    losses = criterion({**outputs, "pilot_outputs": pilot}, targets)

    # Fixed assignment: slot -> target, padding slots are no-object; normalised by num_masks * num_groups = 3 * 2.
    pairs = [(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 0, 1])), (torch.tensor([0, 2]), torch.tensor([0, 0]))]
    points = fixed_points(40)
    assert_losses(losses, reference_losses(pilot, targets, pairs, points, num_masks=6), "_mp")
    for i in range(2):
        expected = reference_losses(pilot["aux_outputs"][i], targets, pairs, points, num_masks=6)
        assert_losses(losses, expected, f"_mp_{i}")
    # The matching queries' losses do not depend on the pilots.
    for key, value in without_pilot.items():
        if key != "loss":
            assert torch.equal(losses[key], value), key
    mp_keys = {f"loss_{kind}_mp{suffix}" for kind in ("ce", "mask", "dice") for suffix in ("", "_0", "_1")}
    assert set(losses) == set(without_pilot) | mp_keys
    extra = sum((2.0 if "_ce" in key else 5.0) * float(losses[key]) for key in mp_keys)
    assert losses["loss"].item() == pytest.approx(float(without_pilot["loss"]) + extra, rel=1e-6)


def test_pilot_with_fewer_layers_and_no_objects(fixed_points):
    g = torch.Generator(torch.get_default_device()).manual_seed(5)
    targets = make_targets(g, (0, 0))
    outputs = {**prediction(g, 2, 4), "aux_outputs": [prediction(g, 2, 4) for _ in range(3)]}
    pilot = {**prediction(g, 2, 2, requires_grad=True), "target_index": torch.full((2, 2), -1, dtype=torch.int64)}
    pilot["aux_outputs"] = [prediction(g, 2, 2)]  # pilot_layers = 1: fewer pilot predictions than layers
    criterion = SetCriterion(K, HungarianMatcher(num_points=16), num_points=16)
    losses = criterion({**outputs, "pilot_outputs": pilot}, targets)
    assert {k for k in losses if "_mp" in k} == {"loss_ce_mp", "loss_mask_mp", "loss_dice_mp", "loss_ce_mp_0",
                                                 "loss_mask_mp_0", "loss_dice_mp_0"}
    assert losses["loss_mask_mp"].item() == 0.0 and losses["loss_dice_mp"].item() == 0.0
    expected_ce = float(-pilot["pred_logits"].detach().log_softmax(-1)[..., K].mean())
    assert losses["loss_ce_mp"].item() == pytest.approx(expected_ce, rel=1e-6)
    losses["loss"].backward()
    assert pilot["pred_masks"].grad is not None and float(pilot["pred_masks"].grad.abs().sum()) == 0.0


def test_pilot_input_errors():
    g = torch.Generator(torch.get_default_device()).manual_seed(6)
    targets = make_targets(g, (1, 2))
    outputs = prediction(g, 2, 4)
    criterion = SetCriterion(K, HungarianMatcher(num_points=16), num_points=16)
    bad = {**prediction(g, 2, 4), "target_index": torch.tensor([[0, -1, 0, -1], [0, 2, -1, -1]])}
    with pytest.raises(ValueError, match=r"target_index'\]\[1\] refers to target 2, but image 1 has 2 targets"):
        criterion({**outputs, "pilot_outputs": bad}, targets)
    bad["target_index"] = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"must have shape \[B, Np\] = \(2, 4\)"):
        criterion({**outputs, "pilot_outputs": bad}, targets)
    with pytest.raises(ValueError, match="must be a dict holding 'target_index'"):
        criterion({**outputs, "pilot_outputs": prediction(g, 2, 4)}, targets)


# ---------------------------------------------------------------------------------------------------------------------
def test_images_without_targets_and_all_empty_batch():
    g = torch.Generator(torch.get_default_device()).manual_seed(7)
    criterion = SetCriterion(K, HungarianMatcher(num_points=32), num_points=32)
    final = prediction(g, 3, 5, requires_grad=True)
    losses = criterion(final, make_targets(g, (0, 2, 0)))
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_mask"].item() > 0

    empty = prediction(g, 2, 5, requires_grad=True)
    losses = criterion(empty, make_targets(g, (0, 0)))
    assert losses["loss_mask"].item() == 0.0 and losses["loss_dice"].item() == 0.0
    # Every query is no-object with the same weight: a plain mean of -log p(no-object).
    expected_ce = float(-empty["pred_logits"].detach().log_softmax(-1)[..., K].mean())
    assert losses["loss_ce"].item() == pytest.approx(expected_ce, rel=1e-6)
    losses["loss"].backward()
    # The mask head still receives a (zero) gradient, so DDP sees every parameter used.
    assert empty["pred_masks"].grad is not None and float(empty["pred_masks"].grad.abs().sum()) == 0.0


def test_more_targets_than_queries(fixed_points):
    g = torch.Generator(torch.get_default_device()).manual_seed(8)
    final = prediction(g, 1, 2)
    targets = make_targets(g, (4,))
    matcher = HungarianMatcher(num_points=32)
    losses = SetCriterion(K, matcher, num_points=24, importance_sample_ratio=0.0)(final, targets)
    pairs = matcher(final, targets)
    assert len(pairs[0][0]) == 2
    # Two pairs are scored, the normaliser still counts all four targets.
    assert_losses(losses, reference_losses(final, targets, pairs, fixed_points(24), num_masks=4))


def test_nonfinite_predictions():
    g = torch.Generator(torch.get_default_device()).manual_seed(9)
    criterion = SetCriterion(K, HungarianMatcher(num_points=64), num_points=64)
    final = prediction(g, 2, 6)
    targets = make_targets(g, (2, 1))
    # NaN mask logits in one query: it is matched around and the losses stay finite.
    final["pred_masks"][0, 3] = float("nan")
    losses = criterion(final, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    assert all(math.isfinite(v.item()) for v in losses.values())
    # NaN class logits show in loss_ce (every query enters the class loss), so the step is visibly bad.
    final["pred_logits"][1, 0] = float("nan")
    losses = criterion(final, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    assert math.isnan(losses["loss_ce"].item()) and math.isnan(losses["loss"].item())
    strict = SetCriterion(K, HungarianMatcher(num_points=64, nonfinite="raise"), num_points=64)
    with pytest.raises(ValueError, match=r"image 0 is NaN or inf for prediction\(s\) \[3\]"):
        strict(final, targets)


def test_autocast_generator_and_dtypes():
    g = torch.Generator(torch.get_default_device()).manual_seed(10)
    criterion = SetCriterion(K, HungarianMatcher(num_points=64), num_points=64)
    final = prediction(g, 2, 6)
    targets = make_targets(g, (3, 1))
    targets[1]["masks"] = targets[1]["masks"].float()
    state = torch.get_rng_state()
    plain = criterion(final, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    again = criterion(final, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    assert torch.equal(state, torch.get_rng_state())
    for key in plain:
        assert torch.equal(plain[key], again[key])
    with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
        autocast = criterion(final, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    half = criterion({k: v.bfloat16() for k, v in final.items()}, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    for key in plain:
        assert autocast[key].dtype == torch.float32 and half[key].dtype == torch.float32
        torch.testing.assert_close(autocast[key], plain[key])
        torch.testing.assert_close(half[key], plain[key], rtol=0.05, atol=0.05)


def test_constructor_and_input_errors():
    g = torch.Generator(torch.get_default_device()).manual_seed(11)
    assert mpseg.SetCriterion is SetCriterion
    criterion = SetCriterion(K, HungarianMatcher(num_points=16), num_points=16)
    assert criterion.empty_weight.tolist() == pytest.approx([1.0] * K + [0.1])
    assert "empty_weight" in criterion.state_dict()
    with pytest.raises(ValueError, match=r"num_classes \+ 1 = 6 class logits"):
        criterion({"pred_logits": torch.zeros(1, 3, 4), "pred_masks": torch.zeros(1, 3, 8, 8)}, make_targets(g, (1,)))
    with pytest.raises(ValueError, match=r"aux_outputs'\]\[0\]\['pred_masks'\] must be a Tensor"):
        criterion({**prediction(g, 1, 3), "aux_outputs": [{"pred_logits": torch.zeros(1, 3, 6), "pred_masks": None}]},
                  make_targets(g, (1,)))
    with pytest.raises(ValueError, match=r"\[0\]\['pred_logits'\] must be \[B, \*, K\+1\] with B, K\+1 = 1, 6"):
        criterion({**prediction(g, 1, 3), "aux_outputs": [prediction(g, 2, 3)]}, make_targets(g, (1,)))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        SetCriterion(0, HungarianMatcher())
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        SetCriterion(K, HungarianMatcher(), importance_sample_ratio=2.0)
    with pytest.raises(TypeError, match="matcher must be callable"):
        SetCriterion(K, None)


def test_loss_functions_and_pairwise_costs_by_hand():
    from mpseg.training.losses import (
        dice_loss, pairwise_dice_cost, pairwise_mask_costs, pairwise_sigmoid_ce_cost, sigmoid_ce_loss,
    )

    g = torch.Generator(torch.get_default_device()).manual_seed(12)
    # Extreme logits included: the softplus identity must hold where sigmoid saturates.
    logits = torch.cat([torch.randn(3, 50, generator=g) * 4, torch.tensor([[-120.0, 95.0, 0.0, 30.0, -30.0] * 10])])
    targets = torch.rand(5, 50, generator=g).round()
    targets[0, :25] = torch.rand(25, generator=g)  # soft targets are allowed too
    ce, dice = pairwise_mask_costs(logits, targets)
    torch.testing.assert_close(ce, pairwise_sigmoid_ce_cost(logits, targets))
    torch.testing.assert_close(dice, pairwise_dice_cost(logits, targets))
    for q in range(4):
        for t in range(5):
            x, y = logits[q].double(), targets[t].double()
            bce = torch.mean(torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs())))
            p = x.sigmoid()
            d = 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
            assert float(ce[q, t]) == pytest.approx(float(bce), rel=1e-5, abs=1e-6)
            assert float(dice[q, t]) == pytest.approx(float(d), rel=1e-5, abs=1e-6)
    # Batched leading dimensions broadcast like matmul.
    batched = pairwise_mask_costs(torch.stack([logits, logits.flip(0)]), torch.stack([targets, targets]))[0]
    torch.testing.assert_close(batched[1], pairwise_sigmoid_ce_cost(logits.flip(0), targets))
    # Matched losses: the diagonal of the pairwise costs, summed and normalised.
    pairs = targets[:4]
    assert float(sigmoid_ce_loss(logits, pairs, 2.0)) == pytest.approx(float(ce.diagonal().sum() / 2), rel=1e-5)
    assert float(dice_loss(logits, pairs, 2.0)) == pytest.approx(float(dice.diagonal().sum() / 2), rel=1e-5)
    assert float(sigmoid_ce_loss(logits[:0], pairs[:0], 1.0)) == 0.0
