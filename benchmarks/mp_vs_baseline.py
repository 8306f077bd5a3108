# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former vs MP-Former on the synthetic shapes data over several seeds: mean and spread at several checkpoints.

Each seed trains both models from the same initial weights on the same data order (see ``examples/shapes_demo.py``,
whose model and training loop this reuses) and evaluates the held-out split at ``--evals`` checkpoints. The table
gives, per checkpoint, mean +- standard deviation over seeds of mIoU, PQ, mask AP and the layer consistency (mean IoU
between consecutive layers' masks for the same matched query, and the rate at which a ground truth keeps its query).
The summary says at which checkpoint MP-Former first reaches the baseline's final mean mIoU / PQ.

Example::

    python benchmarks/mp_vs_baseline.py --seeds 0 1 2 --steps 600 --evals 6
    python benchmarks/mp_vs_baseline.py --seeds 0 1 2 --steps 60 --evals 3 --val-images 32   # quick look
    # seeds in parallel processes, then merged:
    python benchmarks/mp_vs_baseline.py --seeds 1 --out out/s1 & ...; python benchmarks/mp_vs_baseline.py --combine out/s0 out/s1 out/s2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import shapes_demo  # noqa: E402
from _shapes import ShapesDataset  # noqa: E402

_METRICS = (("eval_miou", "mIoU", 1), ("eval_pq", "PQ", 1), ("eval_ap", "AP", 1), ("eval_pq_th", "PQth", 1),
            ("eval_pq_st", "PQst", 1), ("eval_layer_iou", "L-IoU", 3), ("eval_layer_same_query", "L-same", 3))


def _mean_std(values):
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def report(runs: dict, seeds: list, demo_args: dict, out: str) -> dict:
    """Print the per-checkpoint table (mean +- std over seeds) and save ``summary.json`` in ``out``."""
    runs = {mode: histories for mode, histories in runs.items() if histories}
    steps = next(iter(runs.values()))[0]["eval_step"]
    metrics = [m for m in _METRICS if all(m[0] in h for hs in runs.values() for h in hs)]  # older runs lack some
    print(f"\nmean +- std over seeds {seeds}; {demo_args['steps']} steps x batch {demo_args['batch_size']}, "
          f"{demo_args['image_size']}px, {demo_args['dec_layers']} decoder layers, {demo_args['val_images']} held-out "
          f"images, _mp loss weight x{demo_args.get('mp_loss_weight', 1.0)}")
    summary = {"steps": steps, "seeds": seeds, "args": demo_args}
    header = f"{'step':>6} {'model':<12}" + "".join(f"{name:>16}" for _, name, _ in metrics)
    print(header)
    for i, step in enumerate(steps):
        for mode, histories in runs.items():
            cells = []
            for key, _, digits in metrics:
                mean, std = _mean_std([h[key][i] for h in histories])
                summary.setdefault(mode, {}).setdefault(key, []).append((mean, std))
                cells.append(f"{mean:.{digits}f} +- {std:.{digits}f}".rjust(16))
            print(f"{step:>6} {mode:<12}" + "".join(cells))
    for key, name, _ in metrics[:3] if len(runs) == 2 else []:
        final = summary["mask2former"][key][-1][0]
        reached = next((steps[i] for i, (m, _) in enumerate(summary["mp-former"][key]) if m >= final), None)
        when = f"step {reached}" if reached is not None else "not within the run"
        print(f"baseline final mean {name} {final:.1f}: MP-Former reaches it at {when}")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "runs": runs}, f, indent=1)
    print("wrote", os.path.join(out, "summary.json"))
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="outputs/mp_vs_baseline")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="only merge the summary.json of earlier runs (e.g. one process per seed) and report")
    args, rest = p.parse_known_args(argv)
    if args.combine:
        runs, seeds, demo_args = {"mask2former": [], "mp-former": []}, [], None
        for d in args.combine:
            with open(os.path.join(d, "summary.json")) as f:
                data = json.load(f)
            for mode in runs:
                runs[mode].extend(data["runs"].get(mode, []))
            seeds.extend(data["summary"]["seeds"])
            demo_args = data["summary"]["args"]
        return report(runs, seeds, demo_args, args.out)
    if len(args.seeds) < 3:
        print(f"note: {len(args.seeds)} seed(s); use at least 3 for a spread worth reading")
    runs = {"mask2former": [], "mp-former": []}
    start = time.time()
    for seed in args.seeds:
        demo_args = shapes_demo.parse_args(rest + ["--seed", str(seed), "--no-progress", "--grid", "0"])
        if demo_args.threads:
            torch.set_num_threads(demo_args.threads)
        train_set = ShapesDataset(demo_args.train_images, split="train", image_size=demo_args.image_size, seed=seed)
        # One held-out split for every seed, so the seeds differ in initialisation, data order and noise only.
        val_set = ShapesDataset(demo_args.val_images, split="val", image_size=demo_args.image_size, seed=12345)
        for mode in demo_args.modes.split(","):
            result = shapes_demo.train(demo_args, mask_piloted=mode == "mp-former", train_set=train_set,
                                       val_set=val_set, label=f"{mode} seed {seed}")
            runs[mode].append(result["history"])
            print(f"seed {seed} {mode:<12} mIoU {result['miou']:5.1f} PQ {result['pq']:5.1f} AP {result['ap']:5.1f} "
                  f"L-IoU {result['mean_layer_iou']:.3f} L-same {result['mean_layer_same_query']:.3f} "
                  f"({result['train_seconds']:.0f}s; {time.time() - start:.0f}s total)", flush=True)
    return report(runs, args.seeds, vars(demo_args), args.out)


if __name__ == "__main__":
    main()
