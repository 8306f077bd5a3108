# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""GPU report: ``mpseg.ms_deform_attn`` backends on one GPU, and the training throughput of an R50 MP-Former.

Run by ``make gpu-check`` (through ``benchmarks/bench_ms_deform_attn.py --device cuda``); writes one markdown report.

1. Which backend the automatic choice picks on this GPU (documented as "not measured yet": this report is the
   measurement), and the build (CUDA version, architectures).
2. Multi-scale deformable attention at the shapes of ``bench_ms_deform_attn.py`` (Mask2Former 512x512 and 1024x2048,
   Deformable DETR 800x1333), float32 / bfloat16 / float16, for the CUDA kernel, the Triton kernel and the PyTorch
   reference: median forward and forward+backward times (``torch.utils.benchmark``, which synchronises the device),
   peak memory above the inputs (``torch.cuda.max_memory_allocated``) and the largest error against the float64
   reference on the same inputs. A backend that cannot run here (Triton not installed or not merged) is reported with
   its error, not measured.
3. One MP-Former training step (timm ResNet-50, Mask2Former pixel decoder and 9-layer decoder with 100 queries, mask
   pilots, SetCriterion with 12544 points, AdamW) on 512x512 images: images/s over timed steps after warm-up, float32
   and bfloat16 autocast, and its peak memory.

``--device cpu --smoke`` runs every step with tiny shapes on the CPU (the CI test of this file, no GPU needed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark

import mpseg
from mpseg import _extension

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_ms_deform_attn import CASES, Case, make_inputs  # noqa: E402

BACKENDS = ("cuda", "triton", "reference")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMOKE_CASES = [Case("smoke 16x16", 1, [(4, 4), (2, 2)], heads=2, channels=8, points=2)]  # the CPU test of this file


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak_above(device: torch.device, base: int) -> float | None:
    if device.type != "cuda":
        return None  # CPU peaks are bench_ms_deform_attn.py's business
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2.0**20


def _median_seconds(fn, max_time: float) -> float:
    fn()  # warm-up (and compilation of lazily built kernels)
    timer = benchmark.Timer("fn()", globals={"fn": fn})
    return timer.blocked_autorange(min_run_time=max_time).median


def auto_backend(device: torch.device) -> str:
    """The backend ``mpseg.ms_deform_attn`` picks by itself for tensors on ``device``."""
    from mpseg.ops.ms_deform_attn import _resolve_backend

    return _resolve_backend(None, device.type)


def measure_op(case: Case, dtype: torch.dtype, backend: str, device: torch.device, max_time: float) -> dict:
    """Times, peak memory and error of one backend on one case; ``{"error": ...}`` if it cannot run."""
    generator = torch.Generator().manual_seed(0)
    (value, locations, weights), shapes, starts = make_inputs(case, torch.float64, generator)
    shapes, starts = mpseg.level_metadata([tuple(s) for s in shapes.tolist()], device)
    exact = [t.to(device) for t in (value, locations, weights)]
    inputs = [t.to(dtype) for t in exact]
    try:
        out = mpseg.ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], backend=backend)
    except Exception as error:  # not installed, not merged, cannot run on this device: reported, not measured
        return {"error": _short(error)}
    oracle = mpseg.ms_deform_attn_reference(exact[0], shapes, starts, exact[1], exact[2])
    result = {"max_err": (out.double() - oracle).abs().max().item()}
    del out, oracle

    def forward():
        return mpseg.ms_deform_attn(inputs[0], shapes, starts, inputs[1], inputs[2], backend=backend)

    leaves = [t.clone().requires_grad_() for t in inputs]
    grad_output = torch.randn(case.batch, value.shape[1], case.heads * case.channels, dtype=dtype, device=device)

    def forward_backward():
        out = mpseg.ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], backend=backend)
        out.backward(grad_output)
        for leaf in leaves:
            leaf.grad = None

    try:
        result["fwd_ms"] = _median_seconds(forward, max_time) * 1e3
        base = _reset_peak(device)
        forward()
        result["fwd_peak_mib"] = _peak_above(device, base)
        result["fwdbwd_ms"] = _median_seconds(forward_backward, max_time) * 1e3
        base = _reset_peak(device)
        forward_backward()
        result["fwdbwd_peak_mib"] = _peak_above(device, base)
    except Exception as error:
        result["error"] = _short(error)
    return result


def op_section(cases: list[Case], dtypes, device: torch.device, max_time: float, log) -> list[str]:
    lines = [
        "## Multi-scale deformable attention",
        "",
        "Median times in ms (lower is better); peak MiB above the inputs; max |error| against the float64 reference "
        "on the same inputs. Speed-ups are reference time / backend time, from this run.",
        "",
        "| case | dtype | backend | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up | fwd peak MiB | "
        "fwd+bwd peak MiB | max error |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        for dtype in dtypes:
            results = {}
            for backend in BACKENDS:
                log(f"{case.name} B={case.batch} {dtype} {backend}")
                results[backend] = measure_op(case, dtype, backend, device, max_time)
            ref = results["reference"]
            for backend, r in results.items():
                label = f"| {case.name} B={case.batch} | {str(dtype).replace('torch.', '')} | {backend} |"
                if "fwd_ms" not in r:
                    lines.append(f"{label} not measured: {r.get('error', '?')} | | | | | | |")
                    continue

                def ratio(key):
                    return f"{ref[key] / r[key]:.1f}x" if key in ref and key in r else "-"

                def mib(key):
                    return "-" if r.get(key) is None else f"{r[key]:.1f}"

                lines.append(
                    f"{label} {r['fwd_ms']:.3f} | {r.get('fwdbwd_ms', float('nan')):.3f} | {ratio('fwd_ms')} | "
                    f"{ratio('fwdbwd_ms')} | {mib('fwd_peak_mib')} | {mib('fwdbwd_peak_mib')} | {r['max_err']:.2e} |"
                )
    return lines


def training_section(device: torch.device, smoke: bool, log) -> list[str]:
    """Images/s of MP-Former training steps (the model of examples/compose_timm.py plus pilots and the criterion)."""
    sys.path.insert(0, str(HERE.parent / "examples"))
    from compose_timm import Mask2Former

    num_classes = 150
    size, batch, steps, warmup = (64, 2, 1, 0) if smoke else (512, 8, 10, 3)
    backbone, queries, points = ("resnet18", 10, 64) if smoke else ("resnet50", 100, 12544)
    lines = [
        "## Training step",
        "",
        f"MP-Former: timm {backbone} (random weights), MSDeformAttnPixelDecoder, MaskedAttentionDecoder (9 layers, "
        f"{queries} queries), MaskPilotNoiser, SetCriterion ({points} points), AdamW; {batch} images of {size}x{size} "
        f"with 8 objects each; {steps} timed steps after {warmup} warm-up steps.",
        "",
        "| precision | images/s | ms/step | peak GiB |",
        "|---|---|---|---|",
    ]
    for precision in ("float32",) if smoke else ("float32", "bfloat16 autocast"):
        log(f"training step, {precision}")
        torch.manual_seed(0)
        try:
            model = Mask2Former(num_classes, backbone, num_queries=queries).to(device).train()
            noiser = mpseg.MaskPilotNoiser(num_classes).to(device)
            matcher = mpseg.HungarianMatcher(num_points=points)
            criterion = mpseg.SetCriterion(num_classes, matcher, num_points=points).to(device)
            optimizer = torch.optim.AdamW([*model.parameters(), *noiser.parameters()], lr=1e-4)
            images = torch.randn(batch, 3, size, size, device=device)
            targets = [
                {"labels": torch.randint(0, num_classes, (8,), device=device),
                 "masks": torch.rand(8, size, size, device=device) > 0.5}
                for _ in range(batch)
            ]
            autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision != "float32")

            def step():
                with autocast:
                    outputs = model(images, noiser(targets))
                    losses = criterion(outputs, targets)
                optimizer.zero_grad(set_to_none=True)
                (losses["loss"] + noiser.dummy_loss()).backward()
                optimizer.step()

            for _ in range(warmup):
                step()
            base = _reset_peak(device)
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            seconds = (time.perf_counter() - start) / steps
            peak = _peak_above(device, base)
            peak_text = "-" if peak is None else f"{(peak * 2.0**20 + base) / 2.0**30:.2f}"
            lines.append(f"| {precision} | {batch / seconds:.1f} | {seconds * 1e3:.0f} | {peak_text} |")
            del model, optimizer, images, targets
        except Exception as error:
            lines.append(f"| {precision} | failed: {_short(error)} | | |")
    return lines


def header(device: torch.device) -> list[str]:
    info = _extension.build_info() if _extension.load().loaded else {}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    try:
        import triton

        triton_version = triton.__version__
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        triton_version = f"not available ({_short(error)})"
    try:
        choice = auto_backend(device)
    except Exception as error:
        choice = f"none ({_short(error)})"
    return [
        "# mpseg GPU check",
        "",
        f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Device: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}); triton {triton_version}",
        f"- mpseg {mpseg.__version__}, extension: {_extension.status().source or 'not loaded'}; built with CUDA "
        f"{info.get('cuda_version')} for architectures {info.get('cuda_archs')}",
        f"- Automatic backend of `mpseg.ms_deform_attn` for {device.type} tensors: **{choice}** (documented as not "
        "measured yet: compare it with the fastest row per case below)",
        "",
    ]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--report", type=Path, default=Path("build/gpu-check/report.md"))
    parser.add_argument("--tests", type=Path, default=None, help="a pytest summary to include in the report")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and one dtype, for a CPU test of this file")
    parser.add_argument("--max-time", type=float, default=None, help="seconds per timing (default 0.2, smoke 0.01)")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu_report: no CUDA GPU found")
    max_time = args.max_time or (0.01 if args.smoke else 0.2)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    lines = header(device)
    if args.tests is not None and args.tests.is_file():
        lines += ["## Tests on the GPU", "", "```", args.tests.read_text().strip()[-6000:], "```", ""]
    cases = SMOKE_CASES if args.smoke else CASES
    dtypes = (torch.float32,) if args.smoke else DTYPES
    lines += op_section(cases, dtypes, device, max_time, log) + [""]
    if not args.skip_training:
        lines += training_section(device, args.smoke, log) + [""]
    lines.append(f"Report written in {time.perf_counter() - started:.0f} s.")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nreport: {os.path.relpath(args.report)}", file=sys.stderr)
    return args.report


if __name__ == "__main__":
    main()
