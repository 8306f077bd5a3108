# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Benchmark: the C++ CPU kernel of ``mpseg.ms_deform_attn`` against the machine's own peaks and the reference.

Shapes (8 heads, 32 channels per head, 4 points, one query per value position as in an encoder layer): Mask2Former's
pixel decoder on a 512x512 image (levels 64x64, 32x32, 16x16), batch 1; with ``--all-cases`` also batch 2, a 1024x2048
image (levels 128x256, 64x128, 32x64) and Deformable DETR's 4-level encoder on 800x1333.

Two location patterns: "near" (each query's reference point is its own pixel centre plus offsets ~ N(0, 2 pixels) per
level, as after training) and "uniform" (uniform over the whole maps: the worst case for the caches). Attention weights
are a softmax.

Every row reports, next to the time, the achieved arithmetic rate and the effective memory bandwidth, and relates them
to the machine's peaks measured in the same run with the same threads:

- GFLOP/s: 8 * D flops per sample in the forward (4 corners x D channels x a multiply-add) and 24 * D forward +
  backward (the backward adds, per corner, the dot product with grad_output and the update of grad_value);
  bilinear setup and index arithmetic are not counted. Peak: a float32 ``torch.mm`` of 2048 x 2048 matrices.
- GB/s: the compulsory traffic (every input read once, every output written once) divided by the time. Peak: copying
  a 256 MiB tensor (read + write counted).

Times are medians of ``torch.utils.benchmark`` (``adaptive_autorange``); "fwd+bwd" is forward plus backward to all three
inputs through autograd. "x ref" is reference time / kernel time (``mpseg.ms_deform_attn_reference``, grid_sample),
from the same run and threads; "x baseline loops" is the same kernel with ``MPSEG_CPU_KERNEL=generic`` (the loops
compiled for the baseline instruction set, which give the same bits) / kernel time. A thread-scaling table follows (1 thread to all cores).

Usage: ``python benchmarks/bench_ms_deform_attn.py [--quick] [--all-cases] [--threads N] [--dtype float32]``;
``--device cuda [--report PATH]`` writes the GPU report of ``bench_gpu_report.py`` instead (``make gpu-check``).
"""

from __future__ import annotations

import argparse
import os
import platform
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


MAIN_CASE = Case("Mask2Former 512x512", 1, [(64, 64), (32, 32), (16, 16)])
MORE_CASES = [
    Case("Mask2Former 512x512", 2, [(64, 64), (32, 32), (16, 16)]),
    Case("Mask2Former 1024x2048", 1, [(128, 256), (64, 128), (32, 64)]),
    Case("Deformable DETR 800x1333", 1, [(100, 167), (50, 84), (25, 42), (13, 21)]),
]
CASES = [MAIN_CASE, *MORE_CASES]  # every shape (the GPU report, bench_gpu_report.py, runs them all)
QUICK_CASE = Case("quick 128x128", 1, [(16, 16), (8, 8), (4, 4)])
PATTERNS = ("near", "uniform")


def make_inputs(case: Case, dtype: torch.dtype, generator: torch.Generator, pattern: str = "near"):
    spatial_shapes = torch.tensor(case.shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    rows, levels = int(areas.sum()), len(case.shapes)
    if pattern == "near":
        centres = []
        for height, width in case.shapes:
            ys, xs = torch.meshgrid((torch.arange(height) + 0.5) / height, (torch.arange(width) + 0.5) / width,
                                    indexing="ij")
            centres.append(torch.stack([xs, ys], dim=-1).reshape(-1, 2))
        reference = torch.cat(centres)  # [S, 2]: one query per value position
        size = spatial_shapes.flip(-1).float()  # (W, H)
        offsets = torch.randn(case.batch, rows, case.heads, levels, case.points, 2, generator=generator) * 2.0
        locations = reference[None, :, None, None, None, :] + offsets / size[None, None, None, :, None, :]
    elif pattern == "uniform":
        locations = torch.rand(case.batch, rows, case.heads, levels, case.points, 2, generator=generator)
    else:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    weights = torch.randn(case.batch, rows, case.heads, levels * case.points, generator=generator).softmax(-1)
    weights = weights.view(case.batch, rows, case.heads, levels, case.points)
    value = torch.randn(case.batch, rows, case.heads, case.channels, generator=generator)
    return [t.to(dtype) for t in (value, locations, weights)], spatial_shapes, level_start_index


def work(case: Case, rows: int, element_size: int) -> dict[str, tuple[float, float]]:
    """(flops, compulsory bytes) of the forward and of forward + backward."""
    samples = case.batch * rows * case.heads * len(case.shapes) * case.points
    value = case.batch * rows * case.heads * case.channels * element_size  # also the size of output and grad_value
    loc_weights = samples * 3 * element_size
    return {
        "fwd": (8.0 * case.channels * samples, value + loc_weights + value),
        # forward, then backward: grad_output, value, locations and weights in; their three gradients out
        "fwd+bwd": (24.0 * case.channels * samples, (2 * value + loc_weights) + (2 * value + loc_weights) +
                    (value + loc_weights)),
    }


def time_median(fn, threads: int, max_time: float) -> float:
    timer = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=threads)
    fn()  # warm-up
    return timer.adaptive_autorange(threshold=0.1, min_run_time=0.05, max_run_time=max_time).median


def machine_peaks(threads: int, max_time: float) -> tuple[float, float]:
    """(GFLOP/s of a float32 2048^2 matmul, GB/s of a 256 MiB copy) with `threads` threads."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = time_median(lambda: torch.mm(a, b), threads, max_time)
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    copy = time_median(lambda: dst.copy_(src), threads, max_time)
    return 2 * 2048**3 / matmul / 1e9, 2 * src.numel() * src.element_size() / copy / 1e9


def measure(case: Case, dtype: torch.dtype, pattern: str, threads: int, max_time: float, impls: list[str]):
    """Median seconds of fwd and fwd+bwd for each implementation."""
    generator = torch.Generator().manual_seed(0)
    (value, locations, weights), spatial_shapes, level_start_index = make_inputs(case, dtype, generator, pattern)
    grad_output = torch.randn(case.batch, value.shape[1], case.heads * case.channels, generator=generator).to(dtype)
    functions = {"kernel": lambda *args: mpseg.ms_deform_attn(*args, backend="cpu"),
                 "reference": mpseg.ms_deform_attn_reference}
    functions["baseline loops"] = functions["kernel"]  # timed with MPSEG_CPU_KERNEL=generic (below)
    times = {}
    for name in impls:
        impl = functions[name]
        forced = os.environ.pop("MPSEG_CPU_KERNEL", None)
        if name == "baseline loops":
            os.environ["MPSEG_CPU_KERNEL"] = "generic"  # read by the kernel at every call
        leaves = [t.clone().requires_grad_() for t in (value, locations, weights)]

        def forward():
            return impl(value, spatial_shapes, level_start_index, locations, weights)

        def forward_backward():
            for leaf in leaves:
                leaf.grad = None
            impl(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2]).backward(grad_output)

        try:
            for kind, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
                start = time.perf_counter()
                times[name, kind] = time_median(fn, threads, max_time)
                print(f"  {case.name} B={case.batch} {pattern} {threads} threads: {name} {kind} "
                      f"{times[name, kind] * 1e3:.2f} ms (measured in {time.perf_counter() - start:.1f} s)",
                      file=sys.stderr, flush=True)
        finally:
            os.environ.pop("MPSEG_CPU_KERNEL", None)
            if forced is not None:
                os.environ["MPSEG_CPU_KERNEL"] = forced
    return times, value.shape[1], value.element_size()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one tiny shape, short timings (< 30 s)")
    parser.add_argument("--all-cases", action="store_true", help="also batch 2, 1024x2048 and Deformable DETR")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of the main table (all cores)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--max-time", type=float, default=None, help="seconds per measurement (default 1, quick 0.2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the GPU report of bench_gpu_report.py (its options follow: --report, --smoke, ...)")
    args, rest = parser.parse_known_args()
    if args.device == "cuda":
        from bench_gpu_report import main as gpu_report

        gpu_report(["--device", "cuda", *rest])
        return
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    dtype = getattr(torch, args.dtype)
    max_time = args.max_time or (0.2 if args.quick else 1.0)
    status = _extension.load()
    if not status.loaded:
        sys.exit(f"mpseg._C is not available ({status.reason()}): nothing to benchmark against the reference")
    main_case = QUICK_CASE if args.quick else MAIN_CASE
    cases = [main_case] + (MORE_CASES if args.all_cases and not args.quick else [])
    thread_counts = sorted({1, args.threads} | ({2} if args.threads >= 2 else set()))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"mpseg {mpseg.__version__}, torch {torch.__version__}, {args.dtype}, extension {status.source}, "
          f"CPU loops {_extension.build_info().get('cpu_kernel')}, "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} CPUs "
          f"({platform.processor() or platform.machine()}), load average {load:.2f} at start", flush=True)

    peaks = {}
    for threads in thread_counts:
        peaks[threads] = machine_peaks(threads, max_time)
        print(f"  peaks with {threads} threads: {peaks[threads][0]:.1f} GFLOP/s fp32 matmul, "
              f"{peaks[threads][1]:.1f} GB/s copy", file=sys.stderr, flush=True)

    print()
    print(f"Machine peaks, measured in this run: " + "; ".join(
        f"{t} threads: {peaks[t][0]:.1f} GFLOP/s (fp32 2048^2 matmul), {peaks[t][1]:.1f} GB/s (256 MiB copy)"
        for t in thread_counts))
    print()
    header = ("| case | locations | threads | pass | kernel ms | GFLOP/s | % of matmul peak | GB/s | % of copy peak "
              "| reference ms | x ref | baseline loops ms | x baseline loops |")
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    scaling = {}
    for case in cases:
        for pattern in PATTERNS:
            threads = args.threads
            times, rows, element_size = measure(case, dtype, pattern, threads, max_time,
                                                ["kernel", "reference", "baseline loops"])
            for kind, (flops, nbytes) in work(case, rows, element_size).items():
                kernel_s, reference_s = times["kernel", kind], times["reference", kind]
                baseline_s = times["baseline loops", kind]
                gflops, gbs = flops / kernel_s / 1e9, nbytes / kernel_s / 1e9
                lines.append(
                    f"| {case.name} B={case.batch} | {pattern} | {threads} | {kind} | {kernel_s * 1e3:.2f} | "
                    f"{gflops:.1f} | {100 * gflops / peaks[threads][0]:.0f}% | {gbs:.1f} | "
                    f"{100 * gbs / peaks[threads][1]:.0f}% | {reference_s * 1e3:.1f} | {reference_s / kernel_s:.1f}x | "
                    f"{baseline_s * 1e3:.1f} | {baseline_s / kernel_s:.2f}x |"
                )
            if case is main_case:
                scaling[pattern, threads] = times
    print("\n".join(lines))

    # Thread scaling of the kernel on the main case: 1 thread to all cores.
    print()
    header = "| locations | pass | " + " | ".join(f"{t} threads ms" for t in thread_counts) + " | speed-up 1 -> " + \
        f"{thread_counts[-1]} |"
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for pattern in PATTERNS:
        for threads in thread_counts:
            if (pattern, threads) not in scaling:
                scaling[pattern, threads] = measure(main_case, dtype, pattern, threads, max_time, ["kernel"])[0]
        for kind in ("fwd", "fwd+bwd"):
            row = [scaling[pattern, t]["kernel", kind] for t in thread_counts]
            lines.append(f"| {pattern} | {kind} | " + " | ".join(f"{s * 1e3:.2f}" for s in row) +
                         f" | {row[0] / row[-1]:.2f}x |")
    print(f"Thread scaling, {main_case.name} B={main_case.batch}:")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
