# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""HungarianMatcher against transformers' Mask2FormerHungarianMatcher, a per-pair loop formula and brute force."""

import itertools

import pytest
import torch
import torch.nn.functional as F
import transformers.models.mask2former.modeling_mask2former as hf_mask2former

import mpseg
from mpseg import HungarianMatcher
from mpseg.ops.point_sampling import point_sample

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")


def make_batch(seed, counts, num_queries=12, num_classes=6, pred_size=(16, 16), target_size=(48, 40)):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    batch = len(counts)
    outputs = {
        "pred_logits": torch.randn(batch, num_queries, num_classes + 1, generator=g) * 2,
        "pred_masks": torch.randn(batch, num_queries, *pred_size, generator=g) * 3,
    }
    targets = [
        {
            "labels": torch.randint(0, num_classes, (n,), generator=g),
            "masks": torch.rand(n, *target_size, generator=g) > 0.6,
        }
        for n in counts
    ]
    return outputs, targets


def loop_costs(outputs, targets, points, cost_class, cost_mask, cost_dice):
    """Mask2Former's published cost, one (prediction, target) pair at a time, in float64."""
    costs = []
    for b, target in enumerate(targets):
        probs = outputs["pred_logits"][b].double().softmax(-1)
        pred = point_sample(outputs["pred_masks"][b].double().unsqueeze(1), points[b].double().expand(
            outputs["pred_masks"].shape[1], -1, -1)).squeeze(1)
        tgt = point_sample(target["masks"].double().unsqueeze(1), points[b].double().expand(
            target["masks"].shape[0], -1, -1)).squeeze(1)
        cost = torch.zeros(pred.shape[0], tgt.shape[0], dtype=torch.float64)
        for q, t in itertools.product(range(pred.shape[0]), range(tgt.shape[0])):
            bce = F.binary_cross_entropy_with_logits(pred[q], tgt[t]).item()
            x = pred[q].sigmoid()
            dice = 1 - (2 * (x * tgt[t]).sum() + 1) / (x.sum() + tgt[t].sum() + 1)
            cost[q, t] = (
                cost_class * -probs[q, target["labels"][t]] + cost_mask * bce + cost_dice * dice
            )
        costs.append(cost)
    return costs


def brute_force_best(cost):
    """Minimum total cost over all one-to-one assignments of min(Q, T) pairs."""
    q, t = cost.shape
    best = float("inf")
    if q >= t:
        for rows in itertools.permutations(range(q), t):
            best = min(best, sum(float(cost[r, c]) for c, r in enumerate(rows)))
    else:
        for cols in itertools.permutations(range(t), q):
            best = min(best, sum(float(cost[r, c]) for r, c in enumerate(cols)))
    return best


def capture_hf(monkeypatch, outputs, targets, num_points, seed):
    """Runs transformers' matcher with the global seed, capturing its cost matrices before scipy."""
    captured = []
    original = hf_mask2former.linear_sum_assignment

    def spy(cost):
        captured.append(torch.as_tensor(cost).clone())
        return original(cost)

    monkeypatch.setattr(hf_mask2former, "linear_sum_assignment", spy)
    matcher = hf_mask2former.Mask2FormerHungarianMatcher(
        cost_class=1.0, cost_mask=5.0, cost_dice=5.0, num_points=num_points
    )
    torch.manual_seed(seed)
    masks, labels = [t["masks"].float() for t in targets], [t["labels"] for t in targets]
    indices = matcher(outputs["pred_masks"], outputs["pred_logits"], masks, labels)
    return indices, captured


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_transformers(monkeypatch, seed):
    outputs, targets = make_batch(seed, counts=(3, 0, 7, 12))
    hf_indices, hf_costs = capture_hf(monkeypatch, outputs, targets, num_points=400, seed=100 + seed)
    matcher = HungarianMatcher(cost_class=1.0, cost_mask=5.0, cost_dice=5.0, num_points=400)
    torch.manual_seed(100 + seed)
    costs = matcher.cost_matrices(outputs, targets)
    torch.manual_seed(100 + seed)
    indices = matcher(outputs, targets)
    for ours, theirs, cost, hf_cost in zip(indices, hf_indices, costs, hf_costs):
        assert ours[0].dtype == torch.int64 and ours[1].dtype == torch.int64
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
        torch.testing.assert_close(cost, hf_cost.float(), atol=2e-5, rtol=1e-5)


def test_cost_weights_against_loop_formula():
    outputs, targets = make_batch(5, counts=(2, 4), num_queries=5)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=3.0, num_points=64)
    costs = matcher.cost_matrices(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(7))
    replay = torch.Generator(torch.get_default_device()).manual_seed(7)
    points = [torch.rand(1, 64, 2, generator=replay)[0] for _ in targets]  # one set per image, in order
    expected = loop_costs(outputs, targets, points, 2.0, 5.0, 3.0)
    for cost, ref in zip(costs, expected):
        assert cost.dtype == torch.float32
        torch.testing.assert_close(cost.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("counts, num_queries", [((3,), 5), ((5,), 3), ((4,), 4)])
def test_assignment_is_optimal_including_more_targets_than_queries(counts, num_queries):
    outputs, targets = make_batch(9, counts=counts, num_queries=num_queries)
    matcher = HungarianMatcher(num_points=50)
    cost = matcher.cost_matrices(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))[0]
    pred_index, target_index = matcher(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))[0]
    pairs = min(num_queries, counts[0])
    # More targets than queries: min(Q, T) pairs, every query used once, the surplus targets unmatched.
    assert len(pred_index) == len(target_index) == pairs
    assert len(set(pred_index.tolist())) == pairs and len(set(target_index.tolist())) == pairs
    assert torch.equal(pred_index, pred_index.sort().values)
    total = float(cost[pred_index, target_index].sum())
    assert total == pytest.approx(brute_force_best(cost), abs=1e-5)


def test_images_without_targets_give_empty_indices():
    outputs, targets = make_batch(3, counts=(0, 2, 0))
    indices = HungarianMatcher(num_points=32)(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    for (pred_index, target_index), count in zip(indices, (0, 2, 0)):
        assert pred_index.dtype == target_index.dtype == torch.int64
        assert pred_index.shape == target_index.shape == (count,)
    outputs, targets = make_batch(3, counts=(0, 0))
    assert all(p.numel() == 0 for p, _ in HungarianMatcher(num_points=32)(outputs, targets))


def test_nonfinite_predictions_replace_and_raise():
    outputs, targets = make_batch(4, counts=(2, 3), num_queries=6)
    clean_indices = HungarianMatcher(num_points=64)(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    # Make the prediction that image 1 matched first non-finite (NaN mask logits); image 0 gets an inf class logit.
    bad_query = int(clean_indices[1][0][0])
    outputs["pred_masks"][1, bad_query] = float("nan")
    outputs["pred_logits"][0, 4, 0] = float("inf")
    replaced = HungarianMatcher(num_points=64)(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    assert bad_query not in replaced[1][0].tolist()
    assert 4 not in replaced[0][0].tolist()
    assert len(replaced[1][0]) == 3
    # The remaining queries are matched exactly as the clean costs without the bad rows would match them.
    clean_costs = HungarianMatcher(num_points=64).cost_matrices(
        make_batch(4, counts=(2, 3), num_queries=6)[0], targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1)
    )
    for image, bad in ((0, 4), (1, bad_query)):
        keep = [q for q in range(6) if q != bad]
        total = float(clean_costs[image][replaced[image][0], replaced[image][1]].sum())
        assert total == pytest.approx(brute_force_best(clean_costs[image][keep]), abs=1e-5)

    strict = HungarianMatcher(num_points=64, nonfinite="raise")
    with pytest.raises(ValueError, match=r"image 0 is NaN or inf for prediction\(s\) \[4\]"):
        strict(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(1))


def test_unavoidable_nonfinite_cost_still_gives_a_full_assignment():
    outputs, targets = make_batch(6, counts=(3,), num_queries=3)
    outputs["pred_logits"][0, 1] = float("nan")
    pred_index, target_index = HungarianMatcher(num_points=32)(outputs, targets)[0]
    assert sorted(pred_index.tolist()) == [0, 1, 2] and sorted(target_index.tolist()) == [0, 1, 2]


def test_costs_in_float32_under_autocast_and_for_half_inputs():
    outputs, targets = make_batch(7, counts=(3, 2))
    matcher = HungarianMatcher(num_points=128)
    reference = matcher.cost_matrices(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
        under_autocast = matcher.cost_matrices(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    for a, b in zip(under_autocast, reference):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b)
    half = {k: v.bfloat16() for k, v in outputs.items()}
    half_costs = matcher.cost_matrices(half, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(2))
    for a, b in zip(half_costs, reference):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=0.1, rtol=0.05)


def test_mask_dtypes_and_sizes_agree():
    outputs, targets = make_batch(8, counts=(2, 3), target_size=(40, 40))
    as_uint8 = [{"labels": t["labels"], "masks": t["masks"].to(torch.uint8)} for t in targets]
    as_float = [{"labels": t["labels"], "masks": t["masks"].float()} for t in targets]
    # A smaller target in the batch counts as zero-padded at the bottom/right to the largest (Mask2Former's padding).
    smaller = [dict(targets[0]), {"labels": targets[1]["labels"], "masks": targets[1]["masks"][:, :30, :25]}]
    padded = [dict(targets[0]), {"labels": targets[1]["labels"], "masks": torch.zeros(3, 40, 40, dtype=torch.bool)}]
    padded[1]["masks"][:, :30, :25] = smaller[1]["masks"]
    runs = [
        HungarianMatcher(num_points=200).cost_matrices(outputs, t, generator=torch.Generator(torch.get_default_device()).manual_seed(3))
        for t in (targets, as_uint8, as_float, smaller, padded)
    ]
    for other in runs[1:3]:
        for a, b in zip(other, runs[0]):
            torch.testing.assert_close(a, b)
    for a, b in zip(runs[3], runs[4]):
        torch.testing.assert_close(a, b)


def test_generator_reproduces_and_leaves_global_rng_alone():
    outputs, targets = make_batch(10, counts=(4, 2))
    matcher = HungarianMatcher(num_points=100)
    state = torch.get_rng_state()
    first = matcher.cost_matrices(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    second = matcher.cost_matrices(outputs, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_bad_input_errors():
    outputs, targets = make_batch(11, counts=(2,))
    matcher = HungarianMatcher(num_points=16)
    assert isinstance(matcher, torch.nn.Module) and mpseg.HungarianMatcher is HungarianMatcher
    with pytest.raises(ValueError, match="one dict per image: expected 1, got 2"):
        matcher(outputs, targets * 2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, num_classes\) = \[0, 6\)"):
        matcher(outputs, [{"labels": torch.tensor([6, 0]), "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match=r"'labels'\] must be an int64 Tensor"):
        matcher(outputs, [{"labels": torch.tensor([1.0, 0.0]), "masks": targets[0]["masks"]}])
    with pytest.raises(ValueError, match=r"N = len\(labels\) = 2"):
        matcher(outputs, [{"labels": targets[0]["labels"], "masks": targets[0]["masks"][:1]}])
    with pytest.raises(ValueError, match="must contain 'pred_masks'"):
        matcher({"pred_logits": outputs["pred_logits"]}, targets)
    with pytest.raises(ValueError, match="disagree on B, Q"):
        matcher({"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"][:, :3]}, targets)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        HungarianMatcher(nonfinite="ignore")
    with pytest.raises(ValueError, match="at least one of"):
        HungarianMatcher(0, 0, 0)
