# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former vs MP-Former with the shapes demo's settings over several seeds: mean and spread at equal steps and at
equal training time.

Each seed is one run of ``examples/shapes_demo.py`` (the same code, defaults and held-out split as ``make demo
DEMO_ARGS="--seed S"``: both models from the same initial weights on the same data order, side by side in two
one-thread processes). The report gives, per evaluation checkpoint, mean +- standard deviation over seeds of mIoU, PQ,
mask AP and the layer consistency; the step time of both models; and the comparison at equal training time:
Mask2Former's final scores against MP-Former's at the same training seconds (interpolated linearly between its two
neighbouring checkpoints).

Example::

    python benchmarks/mp_vs_baseline.py --seeds 0 1 2                 # the demo's settings, about 9 min per seed
    python benchmarks/mp_vs_baseline.py --seeds 0 1 2 --steps 300     # any demo option can be passed through
    # merge earlier demo runs (each folder holds a results.json), e.g. three `make demo` outputs:
    python benchmarks/mp_vs_baseline.py --combine out/s0 out/s1 out/s2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

import shapes_demo  # noqa: E402

_METRICS = (("miou", "mIoU", 1), ("pq", "PQ", 1), ("ap", "AP", 1), ("pq_th", "PQth", 1), ("pq_st", "PQst", 1),
            ("layer_iou", "L-IoU", 3), ("layer_same_query", "L-same", 3))
_MODES = shapes_demo.MODES


def _mean_std(values):
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _cell(values, digits):
    mean, std = _mean_std(values)
    return f"{mean:.{digits}f} +- {std:.{digits}f}"


def at_seconds(history: dict, key: str, seconds: float) -> float:
    """A metric of one run at ``seconds`` of training, interpolated linearly between the neighbouring checkpoints
    (the first checkpoint's value before it; the last one's after it)."""
    times, values = history["eval_seconds"], history[f"eval_{key}"]
    if seconds <= times[0]:
        return values[0]
    for (t0, v0), (t1, v1) in zip(zip(times, values), zip(times[1:], values[1:])):
        if seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return values[-1]


def report(runs: list[dict], out: str) -> dict:
    """Print the tables for ``runs`` (each a demo ``results.json``) and save ``summary.json`` in ``out``."""
    seeds = [r["args"]["seed"] for r in runs]
    a = runs[0]["args"]
    print(f"\nmean +- std over seeds {seeds}; {a['steps']} steps x batch {a['batch_size']}, {a['image_size']} px, "
          f"{a['dec_layers']} decoder layers, {a['points']} points, {a['val_images']} held-out images; pilots: point "
          f"noise {a['point_noise']}, label noise {a['label_noise']}, _mp loss weight x{a['mp_loss_weight']}")
    summary = {"seeds": seeds, "args": a, "equal_steps": {}, "equal_time": {}, "step_seconds": {}}
    # Equal steps: every checkpoint.
    steps = runs[0]["results"]["mask2former"]["history"]["eval_step"]
    print("\nequal steps")
    print(f"{'step':>6} {'model':<12}" + "".join(f"{name:>16}" for _, name, _ in _METRICS))
    for i, step in enumerate(steps):
        for mode in _MODES:
            cells = [[r["results"][mode]["history"][f"eval_{k}"][i] for r in runs] for k, _, _ in _METRICS]
            summary["equal_steps"].setdefault(mode, []).append(
                {"step": step, **{k: _mean_std(c) for (k, _, _), c in zip(_METRICS, cells)}})
            print(f"{step:>6} {mode:<12}" + "".join(_cell(c, d).rjust(16) for c, (_, _, d) in zip(cells, _METRICS)))
    # Step time (optimisation only, evaluations excluded) and the equal-time comparison.
    print("\nstep time (training seconds / steps, each model on one thread, the two side by side)")
    for mode in _MODES:
        per_step = [1000 * r["results"][mode]["train_seconds"] / r["args"]["steps"] for r in runs]
        summary["step_seconds"][mode] = _mean_std([v / 1000 for v in per_step])
        print(f"  {mode:<12} {_cell(per_step, 0)} ms")
    ratio = [r["results"]["mp-former"]["train_seconds"] / r["results"]["mask2former"]["train_seconds"] for r in runs]
    summary["step_seconds"]["ratio"] = _mean_std(ratio)
    print(f"  MP-Former / Mask2Former: {_cell(ratio, 2)}")
    print("\nequal training time: Mask2Former at its end vs MP-Former at the same training seconds (interpolated)")
    print(f"{'':<12}{'seconds':>16}" + "".join(f"{name:>16}" for _, name, _ in _METRICS[:3]))
    base_seconds = [r["results"]["mask2former"]["train_seconds"] for r in runs]
    base = [[r["results"]["mask2former"][k] for r in runs] for k, _, _ in _METRICS[:3]]
    mp = [[at_seconds(r["results"]["mp-former"]["history"], k, t) for r, t in zip(runs, base_seconds)]
          for k, _, _ in _METRICS[:3]]
    for mode, cells in (("mask2former", base), ("mp-former", mp)):
        summary["equal_time"][mode] = {k: _mean_std(c) for (k, _, _), c in zip(_METRICS[:3], cells)}
        print(f"{mode:<12}{_cell(base_seconds, 0):>16}" + "".join(_cell(c, 1).rjust(16) for c in cells))
    # Per seed: does MP-Former end ahead on all three metrics?
    print("\nper seed, final (equal steps): MP-Former - Mask2Former")
    for r in runs:
        diff = {k: r["results"]["mp-former"][k] - r["results"]["mask2former"][k] for k, _, _ in _METRICS[:3]}
        ahead = all(v > 0 for v in diff.values())
        print(f"  seed {r['args']['seed']}: " + ", ".join(f"{n} {diff[k]:+.1f}" for k, n, _ in _METRICS[:3])
              + ("  (ahead on all three)" if ahead else ""))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print("wrote", os.path.join(out, "summary.json"))
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="outputs/mp_vs_baseline")
    p.add_argument("--combine", nargs="+", metavar="DIR",
                   help="only merge the results.json of earlier demo runs (one folder per seed) and report")
    args, rest = p.parse_known_args(argv)
    folders = args.combine
    if not folders:
        if len(args.seeds) < 3:
            print(f"note: {len(args.seeds)} seed(s); use at least 3 for a spread worth reading")
        folders = []
        for seed in args.seeds:
            folder = os.path.join(args.out, f"seed{seed}")
            shapes_demo.main(rest + ["--seed", str(seed), "--out", folder, "--no-progress"])
            folders.append(folder)
    runs = []
    for folder in folders:
        with open(os.path.join(folder, "results.json")) as f:
            runs.append(json.load(f))
    return report(runs, args.out)


if __name__ == "__main__":
    main()
