# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Peak memory of dense target masks in a Mask2Former training step (CPU): what ~200 instances per image cost.

Each configuration runs in a fresh process (peak resident memory is per process): random outputs of a 1024x1024
Mask2Former (100 queries, 133 classes, 10 predictions with the aux outputs, masks at 256x256) and N target masks of
1024x1024, then the matcher + criterion forward and backward. Prints the peak RSS of each and its excess over the run
with one target.

    python benchmarks/bench_target_memory.py                  # N = 1 and 200, bool and float32 targets
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def one_run(num_targets: int, dtype: str, size: int, batch: int) -> dict:
    import torch

    import mpseg

    torch.manual_seed(0)
    queries, classes, layers = 100, 133, 10

    def prediction():
        return {"pred_logits": torch.randn(batch, queries, classes + 1, requires_grad=True),
                "pred_masks": torch.randn(batch, queries, size // 4, size // 4, requires_grad=True)}

    outputs = prediction()
    outputs["aux_outputs"] = [prediction() for _ in range(layers - 1)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    targets = []
    for _ in range(batch):
        # Rectangles: cheap to draw, any shape costs the same bytes.
        masks = torch.zeros(num_targets, size, size, dtype=getattr(torch, dtype))
        corners = torch.randint(0, size - 64, (num_targets, 2))
        for k, (y, x) in enumerate(corners.tolist()):
            masks[k, y:y + 64, x:x + 64] = 1
        targets.append({"labels": torch.randint(0, classes, (num_targets,)), "masks": masks})
    after_targets = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    criterion = mpseg.SetCriterion(classes, mpseg.HungarianMatcher())
    losses = criterion(outputs, targets)
    losses["loss"].backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"num_targets": num_targets, "dtype": dtype, "before_targets_mib": before / 1024,
            "after_targets_mib": after_targets / 1024, "peak_mib": peak / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--targets", default="1,200")
    p.add_argument("--dtypes", default="bool,float32")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: N,dtype of a single run
    args = p.parse_args(argv)
    if args.one:
        n, dtype = args.one.split(",")
        print(json.dumps(one_run(int(n), dtype, args.size, args.batch)))
        return
    results = []
    for dtype in args.dtypes.split(","):
        for n in (int(v) for v in args.targets.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", f"{n},{dtype}", "--size", str(args.size),
                                  "--batch", str(args.batch)], capture_output=True, text=True, check=True)
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = {r["dtype"]: r["peak_mib"] for r in results if r["num_targets"] == min(int(v) for v in
                                                                                   args.targets.split(","))}
    print(f"{'targets':>8} {'dtype':>8} {'masks MiB':>10} {'peak MiB':>9} {'excess MiB':>11}")
    for r in results:
        masks = r["after_targets_mib"] - r["before_targets_mib"]
        print(f"{r['num_targets']:>8} {r['dtype']:>8} {masks:>10.0f} {r['peak_mib']:>9.0f} "
              f"{r['peak_mib'] - base[r['dtype']]:>11.0f}")


if __name__ == "__main__":
    main()
