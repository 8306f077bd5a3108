# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The multi-scale deformable attention op: C++ kernel against the grid_sample reference, registrations, bad input.

The oracle is ``ms_deform_attn_reference`` (``F.grid_sample``) evaluated in float64 on the very same (rounded) inputs,
so reduced-precision kernels are judged against the exact answer rather than against another rounded computation.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mpseg
from mpseg import _extension
from mpseg.ops import ms_deform_attn, ms_deform_attn_reference
from mpseg.ops.ms_deform_attn import use_backend

# Every test runs on the CPU and, where a GPU is present, on CUDA (tests/conftest.py), with the kernel of that device.
pytestmark = pytest.mark.usefixtures("device")


def device_kernel() -> str:
    """The compiled backend of the test's device ("cpu" or "cuda")."""
    return torch.get_default_device().type


@pytest.fixture(scope="module", autouse=True)
def kernel_loaded():
    # Without the compiled ops these tests would compare the reference with itself: fail loudly instead.
    status = _extension.load()
    assert status.loaded, f"mpseg._C did not load: {status.reason()}"
    assert "cpu" in mpseg.available_backends()
    if os.environ.get("MPSEG_SANITIZE") == "1":  # `make test-sanitize`: make sure the sanitizer build is under test
        assert _extension.build_info()["sanitize"], _extension.build_info()


def level_metadata(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index, int(areas.sum())


def make_inputs(batch, queries, heads, channels, shapes, points, *, dtype=torch.float32, seed=0, spread=0.15):
    """Random inputs; locations in [-spread, 1 + spread] so that some samples fall (partly) outside the maps.

    Drawn on the CPU (the same numbers for every device), then moved to the test's device."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes, level_start_index, rows = level_metadata(shapes)
    levels = spatial_shapes.shape[0]
    cpu = dict(generator=generator, dtype=torch.float64, device="cpu")
    value = torch.randn(batch, rows, heads, channels, **cpu)
    locations = torch.rand(batch, queries, heads, levels, points, 2, **cpu)
    locations = locations * (1 + 2 * spread) - spread
    weights = torch.rand(batch, queries, heads, levels, points, **cpu)
    grad_output = torch.randn(batch, queries, heads * channels, **cpu)
    device = torch.get_default_device()
    cast = [t.to(device=device, dtype=dtype) for t in (value, locations, weights, grad_output)]
    return cast[0], spatial_shapes, level_start_index, cast[1], cast[2], cast[3]


def non_contiguous(t):
    """Same values, every dimension strided (a view into a tensor twice as large in the last dimension)."""
    out = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0]
    assert not out.is_contiguous()
    return out


def run(fn, value, spatial_shapes, level_start_index, locations, weights, grad_output):
    """Output and the three gradients of sum(output * grad_output)."""
    leaves = [t.detach().clone().requires_grad_() for t in (value, locations, weights)]
    out = fn(leaves[0], spatial_shapes, level_start_index, leaves[1], leaves[2])
    (out * grad_output).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


def reference64(value, spatial_shapes, level_start_index, locations, weights, grad_output):
    args = [t.double() for t in (value, locations, weights, grad_output)]
    return run(ms_deform_attn_reference, args[0], spatial_shapes, level_start_index, args[1], args[2], args[3])


def kernel(backend="device"):
    backend = device_kernel() if backend == "device" else backend
    return lambda *args: ms_deform_attn(*args, backend=backend)


def assert_close_scaled(actual, expected, rtol, name):
    """|actual - expected| <= rtol * max|expected| (+ a tiny floor): tolerant of reduced precision, not of errors."""
    assert actual.shape == expected.shape, name
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale + 1e-12, f"{name}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


# (batch, queries, heads, channels per head, level shapes, points): 1-4 levels, odd sizes, 1-8 points, 1-8 heads,
# channels 24 and 48 (not multiples of the vector width), a 1x1 level and a 1-pixel-wide level.
CASES = [
    (2, 7, 1, 1, [(5, 7)], 1),
    (1, 13, 8, 24, [(9, 11), (5, 6), (3, 3)], 4),
    (3, 5, 4, 48, [(6, 5), (3, 3), (2, 1), (1, 1)], 8),
    (2, 9, 3, 32, [(1, 17), (4, 4)], 2),
    (1, 6, 2, 5, [(7, 3), (4, 2), (2, 2)], 3),
    (2, 4, 5, 16, [(8, 8), (4, 4), (2, 2), (1, 2)], 5),
]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.sanitize
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_reference(case, dtype, contiguous):
    inputs = make_inputs(*CASES[case], dtype=dtype, seed=case)
    expected = reference64(*inputs)
    value, spatial_shapes, level_start_index, locations, weights, grad_output = inputs
    if not contiguous:
        value, locations, weights = (non_contiguous(t) for t in (value, locations, weights))
    actual = run(kernel(), value, spatial_shapes, level_start_index, locations, weights, grad_output)
    assert actual[0].dtype == dtype and actual[0].is_contiguous()
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert a.dtype == dtype, name
        assert_close_scaled(a, e, TOLERANCE[dtype], name)


@pytest.mark.sanitize
def test_float16_matches_reference():
    inputs = make_inputs(2, 6, 4, 24, [(7, 5), (3, 3)], 4, dtype=torch.float16, seed=7)
    expected = reference64(*inputs)
    actual = run(kernel(), *inputs)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert a.dtype == torch.float16
        assert_close_scaled(a, e, 5e-3, name)


def test_hand_computed_value():
    # One 2x2 map, one channel, values 1, 2 (top row), 3, 4 (bottom row). Location (0.5, 0.5) is pixel coordinate
    # (0.5, 0.5): the mean of the four pixels = 2.5. (0.25, 0.25) is pixel (0, 0) exactly -> 1. (0, 0) is pixel
    # (-0.5, -0.5): a quarter of pixel (0, 0) -> 0.25 (zero padding). (1.25, 0.5) lies beyond the right edge -> 0.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1, 1)
    spatial_shapes, level_start_index, _ = level_metadata([(2, 2)])
    locations = torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.0, 0.0], [1.25, 0.5]]).view(1, 4, 1, 1, 1, 2)
    weights = torch.tensor([1.0, 1.0, 1.0, 2.0]).view(1, 4, 1, 1, 1)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=device_kernel())
    torch.testing.assert_close(out.view(-1), torch.tensor([2.5, 1.0, 0.25, 0.0]))
    # d out / d x at pixel (0.5, 0.5) = W * (mean of the right column - mean of the left column) = 2 * 1 = 2; d / d y
    # = H * (bottom - top) = 2 * 2 = 4.
    locations.requires_grad_()
    ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights,
                   backend=device_kernel())[0, 0].sum().backward()
    torch.testing.assert_close(locations.grad[0, 0, 0, 0, 0], torch.tensor([2.0, 4.0]))


@pytest.mark.sanitize
def test_gradcheck_float64():
    value, spatial_shapes, level_start_index, locations, weights, _ = make_inputs(
        2, 3, 2, 3, [(4, 5), (2, 3)], 2, dtype=torch.float64, seed=11
    )

    def fn(v, loc, w):
        return ms_deform_attn(v, spatial_shapes, level_start_index, loc, w, backend=device_kernel())

    args = [t.clone().requires_grad_() for t in (value, locations, weights)]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, fast_mode=False)


def test_opcheck():
    value, spatial_shapes, level_start_index, locations, weights, grad_output = make_inputs(
        2, 5, 3, 4, [(4, 5), (2, 3)], 2, dtype=torch.float32, seed=3
    )
    op = torch.ops.mpseg.ms_deform_attn.default
    torch.library.opcheck(op, (value.requires_grad_(), spatial_shapes, level_start_index,
                               locations.requires_grad_(), weights.requires_grad_()))
    torch.library.opcheck(op, (value.detach().double(), spatial_shapes, level_start_index,
                               locations.detach().double(), weights.detach().double()))
    backward = torch.ops.mpseg._ms_deform_attn_backward.default
    torch.library.opcheck(backward, (grad_output, value.detach(), spatial_shapes, level_start_index,
                                     locations.detach(), weights.detach()))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    inputs = make_inputs(2, 6, 4, 8, [(6, 5), (3, 3)], 3, dtype=torch.float32, seed=5)
    eager = run(kernel(None), *inputs)

    def fn(value, spatial_shapes, level_start_index, locations, weights):
        # A little surrounding computation so the op sits inside a real graph.
        return mpseg.ms_deform_attn(value * 1.0, spatial_shapes, level_start_index, locations,
                                    weights.softmax(-1) * weights.shape[-1]) * 1.0

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    value, spatial_shapes, level_start_index, locations, weights, grad_output = inputs
    expected = run(lambda v, s, i, loc, w: fn(v, s, i, loc, w), *inputs)
    actual = run(compiled, *inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert eager[0].shape == actual[0].shape


def test_backend_choice_is_a_compile_time_constant():
    # mpseg marks its backend resolver constant for dynamo without importing torch._dynamo (slow); that marking must
    # stay what torch.compiler.assume_constant_result does.
    from mpseg.ops.ms_deform_attn import _resolve_backend

    marked = torch.compiler.assume_constant_result(lambda: None)
    assert marked._dynamo_marked_constant is True and _resolve_backend._dynamo_marked_constant is True


@pytest.mark.sanitize
@pytest.mark.cpu_only  # the CPU kernel's promise; the CUDA backward accumulates grad_value with atomics
@pytest.mark.parametrize("channels", [32, 40])  # the AVX2 backward's unrolled D = 32, and the baseline loops' D = 40
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_is_bitwise_deterministic_across_runs_and_threads(dtype, channels):
    # 24 backward units (B * M * L) and 512 forward tasks: every thread count below splits the work differently.
    inputs = make_inputs(2, 64, 4, channels, [(12, 9), (6, 5), (3, 3)], 4, dtype=dtype, seed=9, spread=0.0)
    threads = torch.get_num_threads()
    try:
        results = []
        for num_threads in (threads, threads, 1, 2, 3):
            torch.set_num_threads(num_threads)
            results.append(run(kernel(), *inputs))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _cpu_has_avx2_f16c() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx2", "f16c"} <= set(flags)


def _assert_same_bits(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Bit for bit (+0 and -0 differ); NaN matches NaN whatever its payload."""
    assert a.dtype == b.dtype and a.shape == b.shape, name
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b)), f"{name}: NaN in different places"
    differ = (a.view(as_int) != b.view(as_int)) & ~nan
    assert not differ.any(), (f"{name}: {int(differ.sum())} of {a.numel()} elements differ, e.g. "
                              f"{a[differ][:3].tolist()} vs {b[differ][:3].tolist()}")


# (batch, queries, heads, channels, level shapes, points): every D the AVX2 backward unrolls for (8 bf16/fp16 only,
# 16, 32, 64) and D it leaves to the baseline loops (5, 24); 1, 3 and 4 points (eight-sample groups that end inside a
# query); an odd number of queries (the forward's pairs of queries end with a single one); 1-3 levels.
_AVX2_PROBLEMS = [
    (2, 7, 3, 32, [(6, 7), (3, 4), (2, 2)], 4),
    (1, 9, 2, 16, [(5, 9), (3, 3)], 3),
    (2, 5, 2, 64, [(4, 6)], 1),
    (1, 6, 3, 8, [(7, 3), (2, 5)], 4),
    (1, 5, 2, 24, [(5, 5), (2, 3)], 2),
    (1, 4, 2, 5, [(3, 4)], 3),
]


@pytest.mark.sanitize
@pytest.mark.cpu_only  # the two copies of the CPU loops (csrc/ms_deform_attn/cpu/)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_avx2_copy_matches_baseline_bit_for_bit(dtype, monkeypatch):
    # The CPU kernel has a baseline copy of its loops (SSE2 on x86-64) and an AVX2 copy chosen at run time; they make
    # the same IEEE operations in the same order, so every output and gradient has the same bits (results do not
    # depend on the CPU). MPSEG_CPU_KERNEL=generic forces the baseline copy. Inputs include locations outside the
    # maps, on pixel centres and borders (the kinks of the bilinear weights), NaN and infinite locations, negative and
    # infinite attention weights, and an infinite value that only out-of-map corners would reach.
    monkeypatch.delenv("MPSEG_CPU_KERNEL", raising=False)
    expected_copy = "avx2" if _cpu_has_avx2_f16c() else "generic"
    assert _extension.build_info()["cpu_kernel"] == expected_copy
    for seed, problem in enumerate(_AVX2_PROBLEMS):
        batch, queries, heads, channels, shapes, points = problem
        if channels == 8 and dtype in (torch.float32, torch.float64):
            continue  # the float backward's blocks are 16 channels; D = 8 is the bf16/fp16 case
        value, spatial_shapes, level_start_index, locations, weights, grad_output = make_inputs(
            *problem, dtype=torch.float64, seed=seed, spread=0.2)
        # Pixel centres and borders: location (i + 0.5) / W is pixel i's centre, i / W its left border.
        width = float(shapes[0][1])
        locations[:, ::3, :, 0, :, 0] = (torch.randint(-1, shapes[0][1] + 1, locations[:, ::3, :, 0, :, 0].shape,
                                                       generator=torch.Generator().manual_seed(seed)) + 0.5) / width
        locations[:, 1::3, :, 0, :, 1] = torch.randint(-1, shapes[0][0] + 2, locations[:, 1::3, :, 0, :, 1].shape,
                                                        generator=torch.Generator().manual_seed(seed)) / shapes[0][0]
        locations[0, 0, 0, 0, 0, 0] = float("nan")
        locations[0, 1, 0, -1, -1, 1] = float("inf")
        weights[0, 2, :, 0, 0] = -weights[0, 2, :, 0, 0]
        weights[-1, -1, -1, -1, -1] = float("inf")
        value[0, 0, 0, 0] = float("inf")  # row 0 of level 0: read only by corners inside the map
        inputs = [t.to(dtype) if t.is_floating_point() else t
                  for t in (value, spatial_shapes, level_start_index, locations, weights, grad_output)]
        results = {}
        for copy in ("generic", "default"):
            if copy == "generic":
                monkeypatch.setenv("MPSEG_CPU_KERNEL", "generic")
                assert _extension.build_info()["cpu_kernel"] == "generic"
            else:
                monkeypatch.delenv("MPSEG_CPU_KERNEL", raising=False)
            results[copy] = run(kernel(), *inputs)
        for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), results["generic"],
                              results["default"]):
            _assert_same_bits(b, a, f"{problem} {name}")
        # and both are right: compare the finite part with the float64 oracle on the inputs without infinities
    clean = make_inputs(*_AVX2_PROBLEMS[0], dtype=dtype, seed=11, spread=0.2)
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), run(kernel(), *clean),
                          reference64(*clean)):
        assert_close_scaled(a, e, {**TOLERANCE, torch.float16: 5e-3}[dtype], name)


@pytest.mark.sanitize
@pytest.mark.parametrize("batch,queries", [(0, 5), (2, 0)])
def test_empty_batch_or_queries(batch, queries):
    value, spatial_shapes, level_start_index, locations, weights, grad_output = make_inputs(
        batch, queries, 2, 3, [(3, 4)], 2
    )
    for backend in (device_kernel(), "reference"):
        out, grad_value, grad_locations, grad_weights = run(
            kernel(backend), value, spatial_shapes, level_start_index, locations, weights, grad_output
        )
        assert out.shape == (batch, queries, 6)
        assert grad_value.shape == value.shape and not grad_value.any()
        assert grad_locations.shape == locations.shape and grad_weights.shape == weights.shape


@pytest.mark.sanitize
def test_non_finite_and_far_locations_contribute_nothing():
    value, spatial_shapes, level_start_index, locations, weights, grad_output = make_inputs(
        1, 6, 1, 4, [(5, 4), (3, 2)], 1
    )
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 2.0])
    locations[:, :, :, :, :, 0] = bad.view(1, 6, 1, 1, 1)
    out, grad_value, grad_locations, grad_weights = run(kernel(), value, spatial_shapes, level_start_index,
                                                        locations, weights, grad_output)
    assert torch.equal(out, torch.zeros_like(out))
    for grad in (grad_value, grad_locations, grad_weights):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_autocast_runs_in_float32():
    value, spatial_shapes, level_start_index, locations, weights, _ = make_inputs(1, 4, 2, 8, [(4, 4)], 2)
    with torch.autocast(device_kernel(), dtype=torch.bfloat16):
        out = ms_deform_attn(value.bfloat16(), spatial_shapes, level_start_index, locations.bfloat16(),
                             weights.bfloat16(), backend=device_kernel())
    assert out.dtype == torch.float32
    expected = ms_deform_attn(value.bfloat16().float(), spatial_shapes, level_start_index,
                              locations.bfloat16().float(), weights.bfloat16().float(), backend=device_kernel())
    torch.testing.assert_close(out, expected)


def test_double_backward_raises():
    value, spatial_shapes, level_start_index, locations, weights, _ = make_inputs(1, 3, 1, 2, [(3, 3)], 1)
    value.requires_grad_()
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=device_kernel())
    (grad,) = torch.autograd.grad(out.square().sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@pytest.mark.cpu_only  # the automatic choice and the error texts for CPU tensors
def test_backend_selection_and_errors(monkeypatch):
    inputs = make_inputs(1, 3, 2, 4, [(3, 3)], 2)[:5]
    calls = []
    real_reference = ms_deform_attn_reference

    def counting_reference(*args):
        calls.append(1)
        return real_reference(*args)

    import importlib

    dispatch_module = importlib.import_module("mpseg.ops.ms_deform_attn")  # the attribute is shadowed by the function
    monkeypatch.setattr(dispatch_module, "ms_deform_attn_reference", counting_reference)
    ms_deform_attn(*inputs)
    assert calls == []  # automatic choice on CPU: the C++ kernel
    with use_backend("reference"):
        ms_deform_attn(*inputs)
    assert calls == [1]
    ms_deform_attn(*inputs, backend="reference")
    assert calls == [1, 1]
    with pytest.raises(RuntimeError) as info:
        ms_deform_attn(*inputs, backend="cuda")
    message = str(info.value)
    assert "'cuda' cannot run" in message and "cpu: can run" in message and "reference: can run" in message
    assert "cuda: " in message
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton: .*set TRITON_INTERPRET=1"):  # tests/test_triton_backend.py
        ms_deform_attn(*inputs, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        ms_deform_attn(*inputs, backend="fastest")
    with pytest.raises(ValueError, match="backend must be one of"), use_backend("fast"):
        pass


def _bad_inputs():
    """(description, mutate(dict of arguments), exception type, message pattern)."""

    def replace(**changes):
        return lambda args: args.update(changes)

    value, spatial_shapes, level_start_index, locations, weights, _ = make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2)
    return [
        ("value rank", replace(value=value[0]), ValueError, r"value must be 4-d \[B, S, M, D\], got shape \(16, 2, 4\)"),
        ("locations rank", replace(sampling_locations=locations[0]), ValueError, "sampling_locations must be 6-d"),
        ("locations last dim", replace(sampling_locations=locations[..., :1]), ValueError,
         "sampling_locations must be 6-d"),
        ("weights rank", replace(attention_weights=weights[0]), ValueError, "attention_weights must be 5-d"),
        ("batch mismatch", replace(sampling_locations=locations[:1]), ValueError,
         r"sampling_locations must be \[B, Q, M, L, P, 2\] = \(2, 3, 2, 2, 2, 2\)"),
        ("heads mismatch", replace(value=value[:, :, :1]), ValueError, "sampling_locations must be"),
        ("weights mismatch", replace(attention_weights=weights[..., :1]), ValueError,
         r"attention_weights must be \[B, Q, M, L, P\] = \(2, 3, 2, 2, 2\)"),
        ("levels mismatch", replace(spatial_shapes=spatial_shapes[:1]), ValueError, "spatial_shapes must have L = 2"),
        ("start index length", replace(level_start_index=level_start_index[:1]), ValueError,
         "level_start_index must have L = 2"),
        ("shapes rank", replace(spatial_shapes=spatial_shapes.flatten()), ValueError, r"spatial_shapes must be \[L, 2\]"),
        ("shapes sum", replace(spatial_shapes=torch.tensor([[3, 4], [2, 3]])), ValueError,
         "spatial_shapes must add up to value's S = 16"),
        ("shapes negative", replace(spatial_shapes=torch.tensor([[-3, 4], [2, 2]])), ValueError,
         r"spatial_shapes\[0\] must be positive"),
        ("start index wrong", replace(level_start_index=torch.tensor([0, 11])), ValueError,
         r"level_start_index\[1\] must be 12"),
        ("float shapes", replace(spatial_shapes=spatial_shapes.float()), TypeError,
         "spatial_shapes must be an integer tensor"),
        ("float start index", replace(level_start_index=level_start_index.double()), TypeError,
         "level_start_index must be an integer tensor"),
        ("integer value", replace(value=value.long()), TypeError, "value must be a floating-point tensor"),
        ("dtype mismatch", replace(sampling_locations=locations.double()), TypeError,
         "sampling_locations must have value's dtype torch.float32, got torch.float64"),
        ("weights dtype", replace(attention_weights=weights.half()), TypeError, "attention_weights must have"),
        ("device mismatch", replace(spatial_shapes=spatial_shapes.to("meta")), ValueError,
         "spatial_shapes must be on value's device cpu, got meta"),
        ("not a tensor", replace(value=value.tolist()), TypeError, "value must be a torch.Tensor, got list"),
    ]


@pytest.mark.sanitize
@pytest.mark.cpu_only  # on a GPU the level metadata is checked by a device-side assertion (test_no_sync.py)
@pytest.mark.parametrize("backend", ["cpu", "reference", None])
@pytest.mark.parametrize("bad", _bad_inputs(), ids=lambda bad: bad[0])
def test_bad_input_raises_clear_error(bad, backend):
    _, mutate, error, pattern = bad
    value, spatial_shapes, level_start_index, locations, weights, _ = make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2)
    args = dict(value=value, spatial_shapes=spatial_shapes, level_start_index=level_start_index,
                sampling_locations=locations, attention_weights=weights)
    mutate(args)
    with pytest.raises(error, match=pattern):
        ms_deform_attn(**args, backend=backend)


@pytest.mark.sanitize
@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda a: a.__setitem__(1, torch.tensor([[3, 4], [1, 3]])), "spatial_shapes must add up to S = 16"),
        (lambda a: a.__setitem__(1, torch.tensor([[30, 40], [2, 2]])), "describe more rows than value has"),
        (lambda a: a.__setitem__(2, torch.tensor([0, 13])), r"level_start_index\[1\] must be 12"),
        (lambda a: a.__setitem__(1, torch.tensor([[3, 4], [0, 2]])), r"spatial_shapes\[1\] must be positive"),
        (lambda a: a.__setitem__(3, a[3][..., :1]), r"sampling_locations must be \[B, Q, M, L, P, 2\]"),
        (lambda a: a.__setitem__(4, a[4].double()), "must share one dtype"),
        (lambda a: a.__setitem__(1, a[1].int()), "must be int64"),
    ],
)
@pytest.mark.cpu_only  # the CUDA op skips inconsistent levels on the device instead of reading them on the host
def test_direct_op_call_checks_inputs(mutate, pattern):
    # torch.ops.mpseg.* bypasses the Python checks: the C++ checks must still refuse anything that could read out of
    # bounds, with a message naming the argument.
    args = list(make_inputs(2, 3, 2, 4, [(3, 4), (2, 2)], 2)[:5])
    mutate(args)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.mpseg.ms_deform_attn(*args)
    grad_output = torch.zeros(2, 3, 8, dtype=args[0].dtype)
    with pytest.raises(RuntimeError, match=pattern):
        torch.ops.mpseg._ms_deform_attn_backward(grad_output, *args)


# Location coordinates: mostly inside or near the map, plus the special values a fuzzer should try.
_COORDINATE = st.one_of(
    st.floats(-0.75, 1.75, allow_nan=False, width=32),
    st.sampled_from([0.0, 1.0, 0.5, -0.5, 1.5, float("nan"), float("inf"), -float("inf"), 1e20, -1e20]),
)


@st.composite
def _problems(draw):
    levels = draw(st.integers(1, 3))
    shapes = [(draw(st.integers(1, 5)), draw(st.integers(1, 5))) for _ in range(levels)]
    batch, queries = draw(st.integers(0, 2)), draw(st.integers(0, 3))
    heads, channels, points = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 3))
    rows = sum(h * w for h, w in shapes)
    elements = st.floats(-2, 2, allow_nan=False, width=32)
    value = draw(hnp.arrays(np.float32, (batch, rows, heads, channels), elements=elements))
    locations = draw(hnp.arrays(np.float32, (batch, queries, heads, levels, points, 2), elements=_COORDINATE))
    weights = draw(hnp.arrays(np.float32, (batch, queries, heads, levels, points), elements=elements))
    grad_output = draw(hnp.arrays(np.float32, (batch, queries, heads * channels), elements=elements))
    return shapes, value, locations, weights, grad_output


@pytest.mark.sanitize
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(problem=_problems())
def test_property_kernel_equals_reference(problem):
    shapes, *arrays = problem
    spatial_shapes, level_start_index, _ = level_metadata(shapes)
    value, locations, weights, grad_output = (torch.from_numpy(a).double().to(torch.get_default_device())
                                              for a in arrays)
    inputs = (value, spatial_shapes, level_start_index, locations, weights, grad_output)
    actual = run(kernel(), *inputs)
    expected = reference64(*inputs)
    for name, a, e in zip(("output", "grad_value", "grad_weights"), (actual[0], actual[1], actual[3]),
                          (expected[0], expected[1], expected[3])):
        assert torch.isfinite(a).all(), name
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9, msg=name)
    # The location gradient has a kink where a pixel coordinate is an integer (a corner changes); there the two
    # implementations may round to different sides, so compare it away from kinks (and everywhere check finiteness).
    assert torch.isfinite(actual[2]).all()
    size = spatial_shapes.flip(-1).double().view(1, 1, 1, -1, 1, 2)  # (W, H) per level
    pixel = locations * size - 0.5
    near_kink = ((pixel - pixel.round()).abs() < 1e-6) & torch.isfinite(pixel)
    # A whole sample is affected when either coordinate sits on a kink.
    near_kink = near_kink.any(-1, keepdim=True).expand_as(near_kink)
    torch.testing.assert_close(actual[2][~near_kink], expected[2][~near_kink], rtol=1e-9, atol=1e-9)


@pytest.mark.cpu_only  # a CPU timing ratio (gpu-check measures the GPU)
def test_kernel_faster_than_reference():
    # A loose ratio on a mid-sized problem (never absolute times): the kernel is well over 10x faster in
    # benchmarks/bench_ms_deform_attn.py; here it only has to win at all.
    import time

    inputs = make_inputs(1, 1024, 8, 32, [(32, 32), (16, 16), (8, 8)], 4, seed=1, spread=0.0)[:5]

    def best_of(fn, repeats=3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn(*inputs)
            times.append(time.perf_counter() - start)
        return min(times)

    assert best_of(kernel()) < best_of(ms_deform_attn_reference)


@pytest.mark.sanitize
def test_samples_the_last_row_of_the_last_level():
    # Level offsets far into S: a 1 x 70000 level after a 300 x 300 one, sampled at the centre of its last pixel.
    shapes = [(300, 300), (1, 70000)]
    spatial_shapes, level_start_index, rows = level_metadata(shapes)
    value = torch.zeros(1, rows, 1, 1)
    value[0, -1] = 3.0
    locations = torch.tensor([[0.5, 0.5], [(69999 + 0.5) / 70000, 0.5]]).view(1, 1, 1, 2, 1, 2)
    weights = torch.ones(1, 1, 1, 2, 1)
    out = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend=device_kernel())
    assert out.item() == pytest.approx(3.0)
    assert math.isfinite(out.item())
