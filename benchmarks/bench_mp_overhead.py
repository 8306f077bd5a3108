# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Cost of mask piloting: one training step (decoder + criterion, forward + backward) with and without the pilot.

Baseline: the same step as plain Mask2Former (``pilot=None``). Also checks that inference with a noiser constructed but
unused costs the same as without one (the decoder's no-pilot path must not change). Timings are medians over
interleaved repetitions, printed as ratios against the baseline measured in the same run; the target is at most
1.15x for training and 1.00x for inference.

Example::

    python benchmarks/bench_mp_overhead.py                      # B=2, 512x512, 100 queries, Mask2Former defaults
    python benchmarks/bench_mp_overhead.py --size 256 --reps 3  # quicker on a small CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mpseg import HungarianMatcher, MaskedAttentionDecoder, MaskPilotNoiser, SetCriterion


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _targets(batch: int, objects: int, size: int, num_classes: int, gen: torch.Generator, device,
             dtype: torch.dtype = torch.bool) -> list[dict]:
    out = []
    for _ in range(batch):
        masks = torch.zeros(objects, size, size, dtype=dtype)
        for j in range(objects):
            h, w = (torch.randint(size // 16, size // 3, (2,), generator=gen)).tolist()
            y, x = torch.randint(0, size - h, (1,), generator=gen).item(), torch.randint(0, size - w, (1,),
                                                                                          generator=gen).item()
            masks[j, y:y + h, x:x + w] = 1
        out.append({"labels": torch.randint(0, num_classes, (objects,), generator=gen).to(device),
                    "masks": masks.to(device)})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512, help="image side; features at strides 32/16/8, masks at 4")
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--objects", type=int, default=10, help="ground truths per image")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--dec-layers", type=int, default=9)
    p.add_argument("--points", type=int, default=12544)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--target-dtype", choices=("bool", "float32"), default="bool",
                   help="dtype of the ground-truth masks (Mask2Former's data pipeline gives bool masks)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with process CPU time instead of wall time (steadier on a shared CPU machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.cpu_time and args.device == "cpu" else time.perf_counter
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    decoder = MaskedAttentionDecoder(args.hidden, args.classes, hidden_dim=args.hidden, num_queries=args.queries,
                                     dec_layers=args.dec_layers, mask_dim=args.hidden).to(device)
    noiser = MaskPilotNoiser(args.classes, args.hidden, num_groups=args.groups).to(device)
    criterion = SetCriterion(args.classes, HungarianMatcher(num_points=args.points), num_points=args.points)
    s = args.size
    feats = [torch.randn(args.batch, args.hidden, s // st, s // st, device=device) for st in (32, 16, 8)]
    mask_features = torch.randn(args.batch, args.hidden, s // 4, s // 4, device=device)
    targets = _targets(args.batch, args.objects, s, args.classes, gen, device, getattr(torch, args.target_dtype))
    noise_gen = torch.Generator(device=device).manual_seed(1)
    point_gen = torch.Generator(device=device).manual_seed(2)

    def train_step(piloted: bool) -> tuple[float, float, float, float]:
        """Total, then its parts: noiser + decoder forward, criterion forward, backward."""
        _sync(device)
        start = clock()
        pilot = noiser(targets, generator=noise_gen) if piloted else None
        outputs = decoder(feats, mask_features, pilot=pilot)
        _sync(device)
        forward = clock()
        losses = criterion(outputs, targets, generator=point_gen)
        loss = losses["loss"] + (noiser.dummy_loss() if piloted else 0.0)
        _sync(device)
        criterion_done = clock()
        loss.backward()
        _sync(device)
        end = clock()
        decoder.zero_grad(set_to_none=True)
        noiser.zero_grad(set_to_none=True)
        return end - start, forward - start, criterion_done - forward, end - criterion_done

    @torch.no_grad()
    def infer_step(with_noiser: bool) -> float:
        # The noiser exists (constructed above) in both cases; inference never calls it, so the path is identical.
        _sync(device)
        start = clock()
        decoder.eval()
        decoder(feats, mask_features, pilot=None)
        decoder.train()
        _sync(device)
        return clock() - start

    timings = {}
    for rep in range(args.warmup + args.reps):
        # Interleave the variants so machine noise hits both alike.
        base, mp = train_step(False), train_step(True)
        sample = {"train_base": base[0], "train_mp": mp[0], "infer_base": infer_step(False),
                  "infer_noiser": infer_step(True)}
        for part, b, m in zip(("decoder", "criterion", "backward"), base[1:], mp[1:]):
            sample[f"{part}_base"], sample[f"{part}_mp"] = b, m
        if rep >= args.warmup:
            for k, v in sample.items():
                timings.setdefault(k, []).append(v)
    med = {k: statistics.median(v) for k, v in timings.items()}
    pilot = noiser(targets)
    print(f"device {device}, B={args.batch}, {s}x{s}, Q={args.queries}, {args.objects} objects/image "
          f"(Np={pilot.num_pilots}, {args.target_dtype} masks), {args.dec_layers} layers, hidden {args.hidden}, {args.points} points, "
          f"{args.reps} reps (median {'CPU' if clock is time.process_time else 'wall'} time)")
    print(f"train step  Mask2Former {med['train_base'] * 1e3:9.1f} ms | MP-Former {med['train_mp'] * 1e3:9.1f} ms | "
          f"ratio {med['train_mp'] / med['train_base']:.3f}x (target <= 1.15x)")
    for part, what in (("decoder", "noiser + decoder forward"), ("criterion", "criterion forward"),
                       ("backward", "backward")):
        b, m = med[f"{part}_base"], med[f"{part}_mp"]
        print(f"  {what:<26}{b * 1e3:9.1f} ms | {m * 1e3:9.1f} ms | +{(m - b) * 1e3:7.1f} ms "
              f"({(m - b) / med['train_base'] * 100:4.1f}% of the baseline step)")
    print(f"inference   without noiser {med['infer_base'] * 1e3:9.1f} ms | noiser constructed, unused "
          f"{med['infer_noiser'] * 1e3:9.1f} ms | ratio {med['infer_noiser'] / med['infer_base']:.3f}x")
    return med


if __name__ == "__main__":
    main()
