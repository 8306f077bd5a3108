# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Benchmark: the C++ kernel of ``mpseg.ms_deform_attn`` against the pure-PyTorch reference (``grid_sample``).

Shapes (8 heads, 32 channels per head, 4 points, one query per value position as in an encoder layer):

- Mask2Former's pixel decoder on a 512x512 image (levels 64x64, 32x32, 16x16), batch 1 and 2;
- the same on a 1024x2048 image (levels 128x256, 64x128, 32x64), batch 1;
- Deformable DETR's 4-level encoder on an 800x1333 image (levels 100x167, 50x84, 25x42, 13x21), batch 1.

Sampling locations are realistic rather than uniform: each query's reference point is its own pixel centre, plus
offsets ~ N(0, 2 pixels) per level; attention weights are a softmax. Times are medians of ``torch.utils.benchmark``
(``adaptive_autorange``); "fwd+bwd" is forward plus backward to all three inputs. Ratios are reference / kernel, from the
same run. Peak memory of the forward: the peak of the running sum of the CPU allocations and frees that
``torch.profiler`` (``profile_memory=True``) records during one call (each op's net allocation counted at its start),
inputs excluded, output included: the kernel needs no memory beyond its output when the two columns agree.

Usage: ``python benchmarks/bench_ms_deform_attn.py [--quick] [--threads 2] [--dtype float32]``;
``--device cuda [--report PATH]`` writes the GPU report of ``bench_gpu_report.py`` instead (``make gpu-check``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch
from torch.utils import benchmark

import mpseg
from mpseg import _extension


@dataclass
class Case:
    name: str
    batch: int
    shapes: list[tuple[int, int]]
    heads: int = 8
    channels: int = 32
    points: int = 4


CASES = [
    Case("Mask2Former 512x512", 1, [(64, 64), (32, 32), (16, 16)]),
    Case("Mask2Former 512x512", 2, [(64, 64), (32, 32), (16, 16)]),
    Case("Mask2Former 1024x2048", 1, [(128, 256), (64, 128), (32, 64)]),
    Case("Deformable DETR 800x1333", 1, [(100, 167), (50, 84), (25, 42), (13, 21)]),
]
QUICK_CASES = [Case("quick 128x128", 1, [(16, 16), (8, 8), (4, 4)])]


def make_inputs(case: Case, dtype: torch.dtype, generator: torch.Generator):
    spatial_shapes = torch.tensor(case.shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    rows, levels = int(areas.sum()), len(case.shapes)
    centres = []
    for height, width in case.shapes:
        ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                                indexing="ij")
        centres.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2))
    reference = torch.cat(centres)  # [S, 2]: one query per value position
    size = spatial_shapes.flip(-1).float()  # (W, H)
    offsets = torch.randn(case.batch, rows, case.heads, levels, case.points, 2, generator=generator) * 2.0
    locations = reference[None, :, None, None, None, :] + offsets / size[None, None, None, :, None, :]
    weights = torch.randn(case.batch, rows, case.heads, levels * case.points, generator=generator).softmax(-1)
    weights = weights.view(case.batch, rows, case.heads, levels, case.points)
    value = torch.randn(case.batch, rows, case.heads, case.channels, generator=generator)
    return [t.to(dtype) for t in (value, locations, weights)], spatial_shapes, level_start_index


def implementations():
    return {
        "kernel": lambda *args: mpseg.ms_deform_attn(*args, backend="cpu"),
        "reference": mpseg.ms_deform_attn_reference,
    }


def time_median(fn, threads: int, max_time: float) -> float:
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
    fn()  # warm-up
    return timer.adaptive_autorange(threshold=0.1, min_run_time=0.05, max_run_time=max_time).median


def peak_forward_memory(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    # Allocations inside an op are attributed to that op (net of its own frees); frees of Python temporaries appear
    # as "[memory]" events. Leaf events only, so no allocation is counted twice.
    events = [e for e in prof.events() if e.name == "[memory]" or not e.cpu_children]
    events.sort(key=lambda e: e.time_range.start)
    running = peak = 0
    for event in events:
        running += event.self_cpu_memory_usage if event.name != "[memory]" else event.cpu_memory_usage
        peak = max(peak, running)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, short timings (< 30 s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    parser.add_argument("--max-time", type=float, default=None, help="seconds per measurement (default 3, quick 0.5)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU report of bench_gpu_report.py (its options follow: --report, --smoke, ...)")
    args, rest = parser.parse_known_args()
    if args.device == "cuda":
        from bench_gpu_report import main as gpu_report

        gpu_report(["--device", "cuda", *rest])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    max_time = args.max_time or (0.5 if args.quick else 3.0)
    status = _extension.load()
    if not status.loaded:
        sys.exit(f"mpseg._C is not available ({status.reason()}): nothing to benchmark against the reference")
    cases = QUICK_CASES if args.quick else CASES
    print(f"mpseg {mpseg.__version__}, torch {torch.__version__}, {args.threads} threads, {args.dtype}, "
          f"extension {status.source}", flush=True)
    rows = []
    steps = len(cases) * 2 * 3
    step = 0
    for case in cases:
        generator = torch.Generator().manual_seed(0)
        (value, locations, weights), spatial_shapes, level_start_index = make_inputs(case, dtype, generator)
        row = {"case": f"{case.name} B={case.batch}", "S": value.shape[1]}
        for impl_name, impl in implementations().items():
            def forward():
                return impl(value, spatial_shapes, level_start_index, locations, weights)

            leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]
            grad_output = torch.randn(case.batch, value.shape[1], case.heads * case.channels, dtype=dtype)

            def forward_backward():
                out = impl(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
                out.backward(grad_output)

            for kind, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                step += 1
                print(f"[{step}/{steps}] {row['case']}: {impl_name} {kind} ...", end=" ", file=sys.stderr, flush=True)
                start = time.perf_counter()
                row[f"{kind} {impl_name}"] = time_median(fn, args.threads, max_time)
                print(f"{row[f'{kind} {impl_name}'] * 1e3:.1f} ms (measured in {time.perf_counter() - start:.0f} s)",
                      file=sys.stderr, flush=True)
                for leaf in leaves:
                    leaf.grad = None
            step += 1
            print(f"[{step}/{steps}] {row['case']}: {impl_name} forward memory ...", file=sys.stderr, flush=True)
            row[f"mem {impl_name}"] = peak_forward_memory(forward)
        row["output"] = case.batch * value.shape[1] * case.heads * case.channels * value.element_size()
        rows.append(row)

    mib = 2.0**20
    header = ("| case | S | fwd kernel ms | fwd reference ms | fwd speed-up | fwd+bwd kernel ms | fwd+bwd reference ms "
              "| fwd+bwd speed-up | fwd peak MiB kernel | fwd peak MiB reference | output MiB |")
    print()
    print(header)
    print("|" + "|".join(["---"] * (header.count("|") - 1)) + "|")
    for r in rows:
        print(f"| {r['case']} | {r['S']} | {r['fwd kernel'] * 1e3:.1f} | {r['fwd reference'] * 1e3:.1f} | "
              f"{r['fwd reference'] / r['fwd kernel']:.1f}x | {r['fwd+bwd kernel'] * 1e3:.1f} | "
              f"{r['fwd+bwd reference'] * 1e3:.1f} | {r['fwd+bwd reference'] / r['fwd+bwd kernel']:.1f}x | "
              f"{r['mem kernel'] / mib:.1f} | {r['mem reference'] / mib:.1f} | {r['output'] / mib:.1f} |")


if __name__ == "__main__":
    main()
