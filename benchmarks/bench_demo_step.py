# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Where a training step of the shapes demo spends its time, Mask2Former vs MP-Former (the baseline).

The demo's model, data and settings (``examples/shapes_demo.py`` defaults; any of its options can be passed through),
one thread. Each part of a step is timed in process CPU time (steadier than wall time on a shared machine): the data,
the noiser (MP-Former only), backbone + pixel decoder, the masked-attention decoder, the criterion (matching and
losses), the backward, and gradient clipping + AdamW. The two models alternate in rounds of ``--batches`` steps after a
warm-up; the report gives per-part medians over the rounds and MP-Former's extra time as a share of Mask2Former's step.

Example::

    python benchmarks/bench_demo_step.py                 # the demo's settings, about a minute
    python benchmarks/bench_demo_step.py --points 1024   # any shapes_demo option
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import shapes_demo  # noqa: E402
from _shapes import NUM_CLASSES, ShapesDataset  # noqa: E402

from mpseg import MaskPilotNoiser  # noqa: E402

PARTS = ("data", "noiser", "backbone + pixel decoder", "decoder forward", "criterion forward", "backward",
         "clip + AdamW")


class Arm:
    """One model with its optimiser and data stream, stepped part by part."""

    def __init__(self, args, *, mask_piloted: bool, dataset: ShapesDataset) -> None:
        torch.manual_seed(args.seed)
        self.model = shapes_demo.ShapesModel(
            backbone=args.backbone, hidden_dim=args.hidden_dim, num_queries=args.queries, dec_layers=args.dec_layers,
            nheads=args.nheads, enc_layers=args.enc_layers, dim_feedforward=args.dim_feedforward)
        self.noiser = MaskPilotNoiser(NUM_CLASSES, args.hidden_dim, point_noise=args.point_noise,
                                      label_noise=args.label_noise, num_groups=args.groups) if mask_piloted else None
        _, self.criterion = shapes_demo.make_criterion(args)
        self.params = list(self.model.parameters()) + (list(self.noiser.parameters()) if self.noiser else [])
        self.optimizer = torch.optim.AdamW(self.params, lr=args.lr, weight_decay=0.05, fused=True)
        self.clip = args.clip
        self.gen = torch.Generator().manual_seed(args.seed)
        self.stream = self._batches(args, dataset)

    def _batches(self, args, dataset):
        while True:
            yield from dataset.batches(args.batch_size, shuffle=True, generator=self.gen, drop_last=True)

    def step(self) -> list[float]:
        """One training step; the CPU seconds of each part (see PARTS)."""
        marks = [time.process_time()]
        images, targets, _ = next(self.stream)
        marks.append(time.process_time())
        pilot = self.noiser(targets, generator=self.gen) if self.noiser is not None else None
        marks.append(time.process_time())
        features = self.model.backbone(images - self.model.pixel_mean)
        mask_features, multi_scale = self.model.pixel_decoder(features)
        marks.append(time.process_time())
        outputs = self.model.decoder(multi_scale, mask_features, pilot=pilot)
        marks.append(time.process_time())
        loss = self.criterion(outputs, targets, generator=self.gen)["loss"]
        marks.append(time.process_time())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.process_time())
        torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        marks.append(time.process_time())
        return [b - a for a, b in zip(marks, marks[1:])]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per model (median over rounds)")
    p.add_argument("--batches", type=int, default=10, help="steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    ours, rest = p.parse_known_args(argv)
    args = shapes_demo.parse_args(rest)
    torch.set_num_threads(1)
    # Enough images that no batch repeats within the measurement; generated once (cached) before timing.
    needed = (ours.warmup + ours.rounds * ours.batches) * args.batch_size
    dataset = ShapesDataset(min(args.train_images, needed), split="train", image_size=args.image_size, seed=args.seed,
                            cache=True)
    for i in range(len(dataset)):
        dataset[i]
    arms = {mode: Arm(args, mask_piloted=mode == "mp-former", dataset=dataset) for mode in shapes_demo.MODES}
    for arm in arms.values():
        for _ in range(ours.warmup):
            arm.step()
    per_round = {mode: [] for mode in arms}  # [round][part] = mean CPU ms per step
    for _ in range(ours.rounds):
        for mode, arm in arms.items():
            sums = [0.0] * len(PARTS)
            for _ in range(ours.batches):
                sums = [s + t for s, t in zip(sums, arm.step())]
            per_round[mode].append([1000 * s / ours.batches for s in sums])
    median = {mode: [statistics.median(r[i] for r in rounds) for i in range(len(PARTS))]
              for mode, rounds in per_round.items()}
    base_total = sum(median["mask2former"])
    print(f"shapes demo step, {args.image_size} px, batch {args.batch_size}, {args.points} points, 1 thread; "
          f"process CPU ms per step, median of {ours.rounds} alternating rounds of {ours.batches} steps")
    print(f"{'part':<26}{'Mask2Former':>12}{'MP-Former':>12}   extra (% of Mask2Former's step)")
    for i, part in enumerate(PARTS):
        a, b = median["mask2former"][i], median["mp-former"][i]
        print(f"{part:<26}{a:>10.1f}ms{b:>10.1f}ms   {b - a:+6.1f} ms ({100 * (b - a) / base_total:+5.1f}%)")
    mp_total = sum(median["mp-former"])
    print(f"{'step':<26}{base_total:>10.1f}ms{mp_total:>10.1f}ms   {mp_total / base_total:.2f}x (baseline: Mask2Former)")


if __name__ == "__main__":
    main()
