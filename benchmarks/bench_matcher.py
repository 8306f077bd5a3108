# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Benchmark: HungarianMatcher cost computation and the whole SetCriterion.

Baselines, timed in the same run:

* matcher: a straightforward per-image implementation of Mask2Former's published matching cost, written below
  (targets converted to float at full resolution, sampled with grid_sample, sigmoid cross-entropy as two matrix
  products, one image at a time);
* criterion: transformers' ``Mask2FormerLoss`` (if installed), forward + backward on the same inputs.

Shapes: predictions 128x128, targets 512x512 (bool), 12544 points, Q in {100, 200}, T in {10, 50}, B in {4, 8}.
Reports medians and ratios (baseline time / mpseg time; > 1 means mpseg is faster).

    python benchmarks/bench_matcher.py            # full grid (a few minutes on 2 cores)
    python benchmarks/bench_matcher.py --quick    # Q=100, T=50, B=4 only
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from mpseg import HungarianMatcher, SetCriterion

NUM_CLASSES = 133
NUM_POINTS = 12544


# ---------------------------------------------------------------------------------------------------------------------
# Baseline: Mask2Former's matching cost as published, one image at a time.
def _sample(maps: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """maps [N, H, W] float, points [P, 2] in [0, 1] -> [N, P], bilinear, align_corners=False, zero padding."""
    grid = (2 * points - 1).view(1, 1, -1, 2).expand(maps.shape[0], -1, -1, -1)
    return F.grid_sample(maps.unsqueeze(1), grid, align_corners=False).view(maps.shape[0], -1)


@torch.no_grad()
def baseline_costs(outputs, targets, cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=NUM_POINTS):
    costs = []
    for b, target in enumerate(targets):
        probs = outputs["pred_logits"][b].float().softmax(-1)
        class_cost = -probs[:, target["labels"]]
        points = torch.rand(1, num_points, 2, device=probs.device)[0]
        pred = _sample(outputs["pred_masks"][b].float(), points)  # [Q, P]
        gt = _sample(target["masks"].float(), points)  # [T, P]: full-resolution float copy first
        positive = F.binary_cross_entropy_with_logits(pred, torch.ones_like(pred), reduction="none")
        negative = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none")
        mask_cost = (positive @ gt.T + negative @ (1 - gt).T) / num_points
        x = pred.sigmoid()
        dice_cost = 1 - (2 * x @ gt.T + 1) / (x.sum(-1)[:, None] + gt.sum(-1)[None, :] + 1)
        costs.append((cost_mask * mask_cost + cost_class * class_cost + cost_dice * dice_cost).cpu())
    return costs


def baseline_match(outputs, targets):
    return [linear_sum_assignment(c.numpy()) for c in baseline_costs(outputs, targets)]


# ---------------------------------------------------------------------------------------------------------------------
def make_inputs(batch, queries, num_targets, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    outputs = {
        "pred_logits": torch.randn(batch, queries, NUM_CLASSES + 1, generator=g).requires_grad_(requires_grad),
        "pred_masks": (torch.randn(batch, queries, 128, 128, generator=g) * 3).requires_grad_(requires_grad),
    }
    targets = []
    for _ in range(batch):
        # Blob-like masks: random rectangles, as real instance masks are spatially coherent.
        masks = torch.zeros(num_targets, 512, 512, dtype=torch.bool)
        corners = torch.randint(0, 400, (num_targets, 2), generator=g)
        sizes = torch.randint(16, 112, (num_targets, 2), generator=g)
        for t in range(num_targets):
            y, x = corners[t].tolist()
            h, w = sizes[t].tolist()
            masks[t, y : y + h, x : x + w] = True
        targets.append({"labels": torch.randint(0, NUM_CLASSES, (num_targets,), generator=g), "masks": masks})
    return outputs, targets


def median_time(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_matcher(configs, repeats):
    matcher = HungarianMatcher(num_points=NUM_POINTS)
    rows = []
    for i, (queries, num_targets, batch) in enumerate(configs, 1):
        print(f"[{i}/{len(configs)}] matcher Q={queries} T={num_targets} B={batch} ...", end="", flush=True)
        outputs, targets = make_inputs(batch, queries, num_targets)
        # Same seed, same draw order: both must assign identically.
        torch.manual_seed(0)
        ours = matcher(outputs, targets)
        torch.manual_seed(0)
        theirs = baseline_match(outputs, targets)
        agree = all(
            torch.equal(p, torch.as_tensor(bp)) and torch.equal(t, torch.as_tensor(bt))
            for (p, t), (bp, bt) in zip(ours, theirs)
        )
        base_cost = median_time(lambda: baseline_costs(outputs, targets), repeats)
        our_cost = median_time(lambda: matcher.cost_matrices(outputs, targets), repeats)
        base_match = median_time(lambda: baseline_match(outputs, targets), repeats)
        our_match = median_time(lambda: matcher(outputs, targets), repeats)
        rows.append((queries, num_targets, batch, base_cost, our_cost, base_match, our_match, agree))
        print(f" cost {base_cost * 1e3:.0f} -> {our_cost * 1e3:.0f} ms ({base_cost / our_cost:.2f}x)", flush=True)
    print()
    print("Matching cost (median ms; ratio = baseline / mpseg; 'match' includes linear_sum_assignment)")
    print(f"{'Q':>4} {'T':>3} {'B':>2} | {'baseline':>9} {'mpseg':>7} {'ratio':>6} | {'match base':>10} "
          f"{'mpseg':>7} {'ratio':>6} | same assignment")
    for queries, num_targets, batch, bc, oc, bm, om, agree in rows:
        print(f"{queries:>4} {num_targets:>3} {batch:>2} | {bc * 1e3:>9.1f} {oc * 1e3:>7.1f} {bc / oc:>5.2f}x | "
              f"{bm * 1e3:>10.1f} {om * 1e3:>7.1f} {bm / om:>5.2f}x | {'yes' if agree else 'NO'}")
    return rows


def bench_criterion(queries, num_targets, batch, repeats, num_layers=10):
    print()
    print(f"Whole criterion, forward + backward, {num_layers} predictions (= {num_layers} matchings) per step, "
          f"Q={queries} T={num_targets} B={batch}", flush=True)
    layers = [make_inputs(batch, queries, num_targets, seed=s, requires_grad=True)[0] for s in range(num_layers)]
    targets = make_inputs(batch, queries, num_targets)[1]
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher())

    def ours():
        criterion(outputs, targets)["loss"].backward()

    def matching_only():
        for prediction in layers:
            criterion.matcher(prediction, targets)

    our_step = median_time(ours, repeats)
    our_matching = median_time(matching_only, repeats)
    print(f"  mpseg SetCriterion step:          {our_step * 1e3:8.1f} ms (matching {our_matching * 1e3:.1f} ms, "
          f"{100 * our_matching / our_step:.0f}%)")
    try:
        from transformers import Mask2FormerConfig
        from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss
    except ImportError:
        print("  transformers not installed: no criterion baseline")
        return
    config = Mask2FormerConfig(num_labels=NUM_CLASSES, class_weight=2.0, mask_weight=5.0, dice_weight=5.0)
    hf_loss = Mask2FormerLoss(config, weight_dict={})
    hf_targets = ([t["masks"].float() for t in targets], [t["labels"] for t in targets])  # HF wants float masks
    aux = [{"masks_queries_logits": p["pred_masks"], "class_queries_logits": p["pred_logits"]} for p in layers[:-1]]

    def theirs():
        losses = hf_loss(layers[-1]["pred_masks"], layers[-1]["pred_logits"], *hf_targets, auxiliary_predictions=aux)
        sum(losses.values()).backward()

    their_step = median_time(theirs, repeats)
    print(f"  transformers Mask2FormerLoss step: {their_step * 1e3:8.1f} ms  -> ratio {their_step / our_step:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only Q=100, T=50, B=4, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--no-criterion", action="store_true", help="skip the whole-criterion timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, {repeats} repeats (median)")
    if args.quick:
        configs = [(100, 50, 4)]
    else:
        configs = [(q, t, b) for q in (100, 200) for t in (10, 50) for b in (4, 8)]
    rows = bench_matcher(configs, repeats)
    if not args.no_criterion:
        # --quick: a smaller step (B=2, T=10) so that the whole run stays around a minute on 2 cores.
        shape = (100, 10, 2) if args.quick else (100, 50, 4)
        bench_criterion(*shape, repeats=1 if args.quick else 3)
    target = [r for r in rows if r[:3] == (100, 50, 4)]
    if target:
        ratio = target[0][3] / target[0][4]
        verdict = "met" if ratio >= 2 else "NOT met"
        print(f"\nTarget (cost computation >= 2x at Q=100, T=50, B=4): {ratio:.2f}x -> {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
