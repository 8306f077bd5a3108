# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Benchmark: the compiled point kernels of the mask losses against the PyTorch paths they replace.

At the sizes of Mask2Former's training on a 512x512 image (mask logits at 128x128, 12544 points per mask, oversampling
3, importance ratio 0.75, ground truth at 512x512), for M matched masks:

- ``select``: choosing the 9408 most uncertain of 37632 candidates per mask (``mpseg::_select_uncertain_points``
  against ``grid_sample`` + ``-abs`` + ``topk`` + gather); the random draws are made outside the timed region;
- ``targets``: reading the target masks at the 12544 points (``mpseg::_sample_masks_at_points`` against four
  ``index_select`` gathers and the bilinear weights in PyTorch), for bool and float32 target masks;
- ``criterion``: one :class:`mpseg.SetCriterion` forward over 10 layers of outputs (B=2, 100 queries, 10 objects per
  image), everything included (matching, random draws), kernels on against kernels off.

Times are medians of ``torch.utils.benchmark`` (``adaptive_autorange``); the ratio is PyTorch / kernel from the same run.

Usage: ``python benchmarks/bench_point_sampling.py [--masks 20] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from torch.utils import benchmark

from mpseg import HungarianMatcher, SetCriterion, _extension
from mpseg.ops import point_sampling as ps


def _median_ms(fn) -> float:
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())  # its default is 1
    return timer.adaptive_autorange(min_run_time=1.0).median * 1e3


@contextlib.contextmanager
def _kernels_off():
    saved = ps._kernels_for
    ps._kernels_for = lambda device_type: False
    try:
        yield
    finally:
        ps._kernels_for = saved


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--masks", type=int, default=20, help="matched masks M (the B=2, 10 objects per image case)")
    p.add_argument("--points", type=int, default=12544)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not _extension.load().loaded:
        raise SystemExit(f"mpseg's compiled ops are not loaded: {_extension.status().reason()}")
    g = torch.Generator().manual_seed(0)
    m, points = args.masks, args.points
    logits = torch.randn(m, 1, 128, 128, generator=g) * 3
    candidates = torch.rand(m, 3 * points, 2, generator=g)
    keep = int(0.75 * points)
    coords = torch.rand(m, points, 2, generator=g)
    objects = 10
    targets_bool = torch.rand(objects, 512, 512, generator=g) > 0.5
    index = torch.arange(m) % objects
    rows = []

    def row(name, kernel_fn, torch_fn):
        kernel_ms, torch_ms = _median_ms(kernel_fn), _median_ms(torch_fn)
        rows.append((name, torch_ms, kernel_ms))
        print(f"{name:<34}{torch_ms:10.2f} ms {kernel_ms:10.2f} ms {torch_ms / kernel_ms:8.2f}x", flush=True)

    print(f"M={m} masks, {points} points, {torch.get_num_threads()} threads; median times")
    print(f"{'':<34}{'PyTorch':>13} {'kernel':>13} {'ratio':>9}")
    row("select (37632 -> 9408 per mask)",
        lambda: torch.ops.mpseg._select_uncertain_points(logits[:, 0], candidates, keep),
        lambda: ps._select_uncertain_points_torch(logits, candidates, keep, ps.logit_uncertainty))
    for name, masks in (("bool", targets_bool), ("float32", targets_bool.float())):
        row(f"targets ({name} 512x512 masks)",
            lambda masks=masks: torch.ops.mpseg._sample_masks_at_points(masks, coords, index, 512, 512),
            lambda masks=masks: ps._sample_masks_at_points_torch(masks, coords, index, (512, 512), torch.float32))

    criterion = SetCriterion(80, HungarianMatcher(num_points=points), num_points=points)
    outputs = {"pred_logits": torch.randn(2, 100, 81, generator=g),
               "pred_masks": torch.randn(2, 100, 128, 128, generator=g) * 3}
    outputs["aux_outputs"] = [dict(outputs) for _ in range(9)]
    targets = [{"labels": torch.randint(0, 80, (objects,), generator=g), "masks": targets_bool} for _ in range(2)]

    def run_criterion():
        criterion(outputs, targets, generator=torch.Generator().manual_seed(1))

    kernel_ms = _median_ms(run_criterion)
    with _kernels_off():
        torch_ms = _median_ms(run_criterion)
    rows.append(("criterion", torch_ms, kernel_ms))
    print(f"{'SetCriterion forward (10 layers)':<34}{torch_ms:10.2f} ms {kernel_ms:10.2f} ms "
          f"{torch_ms / kernel_ms:8.2f}x")
    return {name: (t, k) for name, t, k in rows}


if __name__ == "__main__":
    main()
