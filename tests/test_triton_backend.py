# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The Triton backend (``backend="triton"``, ``torch.ops.mpseg_triton``) against the float64 oracle and the other
paths.

Without a GPU (CI) every test runs the kernels under Triton's interpreter on CPU tensors: the ``triton_device`` fixture (named apart from conftest's ``device``) sets
``TRITON_INTERPRET=1`` for the test (mpseg picks compiled or interpreted kernels when a kernel is launched, so the
variable needs no special import order). On a machine with a CUDA GPU the same tests run a second time on ``cuda``,
compiled, with the same oracles and tolerances. Nothing here is skipped in CI: the backend must be available on CPU
under the interpreter, and a test fails if it is not.

Shapes are tiny: the interpreter runs every program of the grid in Python.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import mpseg
from mpseg import _config
from mpseg.ops import _triton, ms_deform_attn, ms_deform_attn_reference
from mpseg.ops import point_sampling as ps
from mpseg.ops.ms_deform_attn import use_backend
from test_ms_deform_attn import assert_close_scaled, make_inputs, non_contiguous, reference64, run
from test_point_sample import test_mask_kernel_edges_nonfinite_and_bad_index as _check_mask_edges
from test_point_sample import test_mask_kernel_equals_torch_path as _check_mask_reads
from test_point_sample import test_select_kernel_keeps_the_topk_set_in_candidate_order as _check_selection
from test_point_sample import test_select_kernel_ties_nan_and_extremes as _check_selection_edges

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cpu: the interpreter; cuda: compiled kernels


@pytest.fixture(params=DEVICES)
def triton_device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _triton.why_not(request.param) is None, _triton.why_not(request.param)
    _triton.load()
    return torch.device(request.param)


def triton_kernel(*args):
    return ms_deform_attn(*args, backend="triton")


def to(device, tensors):
    return [t.to(device) for t in tensors]


# (batch, queries, heads, channels per head, level shapes, points): 1-4 levels of odd sizes, 1-8 heads, channels 24, 32
# and 48 (two are not powers of 2: masked channel lanes), 1-8 points, a 1x1 level and a 1-pixel-wide one.
CASES = [
    (2, 5, 1, 24, [(5, 7)], 1),
    (1, 6, 8, 32, [(9, 11), (5, 6), (3, 3)], 4),
    (2, 3, 4, 48, [(6, 5), (3, 3), (2, 1), (1, 1)], 8),
    (1, 7, 3, 24, [(1, 17), (4, 4)], 2),
]
# fp32 accumulation for the half types; the bound is relative to the largest value of each result.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_msda_matches_float64_oracle(triton_device, case, dtype, contiguous):
    inputs = make_inputs(*CASES[case], dtype=dtype, seed=case)
    expected = reference64(*inputs)
    value, spatial_shapes, level_start_index, locations, weights, grad_output = to(triton_device, inputs)
    if not contiguous:
        value, locations, weights = (non_contiguous(t) for t in (value, locations, weights))
    actual = run(triton_kernel, value, spatial_shapes, level_start_index, locations, weights, grad_output)
    assert actual[0].is_contiguous() and actual[0].device.type == triton_device.type
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert a.dtype == dtype, name
        assert_close_scaled(a.cpu(), e, TOLERANCE[dtype], name)


def test_msda_non_finite_and_far_locations(triton_device):
    # NaN, +-inf and huge locations read nothing and get zero gradients (no float-to-int conversion of them); a
    # location just outside the map still reads its border row, as grid_sample's zero padding does.
    inputs = make_inputs(1, 7, 2, 24, [(5, 4), (3, 2)], 2)
    value, spatial_shapes, level_start_index, locations, weights, grad_output = inputs
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 2.0, 1.1])
    locations[:, :, :, :, :, 0] = bad.view(1, 7, 1, 1, 1).to(locations.dtype)
    locations[0, 3, 1, 1, 0, 1] = float("nan")  # a NaN y with a finite x
    expected = reference64(value, spatial_shapes, level_start_index, locations, weights, grad_output)
    actual = run(triton_kernel, *to(triton_device, inputs))
    for name, a, e in zip(("output", "grad_value", "grad_locations", "grad_weights"), actual, expected):
        assert torch.isfinite(a).all(), name
        assert_close_scaled(a.cpu(), e, 2e-5, name)
    assert not actual[0][0, :6].any()  # queries 0-5 sample only non-finite or far locations
    assert not actual[2][0, :6].any() and not actual[3][0, :6].any()


@pytest.mark.parametrize("batch,queries", [(0, 5), (2, 0)])
def test_msda_empty_batch_or_queries(triton_device, batch, queries):
    inputs = to(triton_device, make_inputs(batch, queries, 2, 24, [(3, 4)], 2))
    out, grad_value, grad_locations, grad_weights = run(triton_kernel, *inputs)
    assert out.shape == (batch, queries, 48)
    assert grad_value.shape == inputs[0].shape and not grad_value.any()
    assert grad_locations.shape == inputs[3].shape and grad_weights.shape == inputs[4].shape


def test_msda_inconsistent_levels_never_read_out_of_bounds(triton_device):
    # A direct op call skips the wrapper's level check; the kernels treat a level that does not fit value as empty.
    value, spatial_shapes, level_start_index, locations, weights, _ = to(
        triton_device, make_inputs(1, 4, 1, 24, [(3, 3)], 2))
    too_big = torch.tensor([[30, 30]], device=triton_device)
    out = torch.ops.mpseg_triton.ms_deform_attn(value, too_big, level_start_index, locations, weights)
    assert not out.any()


def test_msda_tuning_and_64bit_index_path_give_the_same_result(triton_device, monkeypatch):
    # Block sizes are tuning parameters, and the 64-bit offset path (for tensors past 2**31 elements) is the same
    # arithmetic: small blocks and forced 64-bit offsets agree with the defaults.
    inputs = to(triton_device, make_inputs(2, 9, 3, 24, [(5, 6), (2, 3)], 3, seed=4))
    default = run(triton_kernel, *inputs)
    monkeypatch.setattr(_triton.TUNING, "msda_forward_block", 64)
    monkeypatch.setattr(_triton.TUNING, "msda_backward_block", 32)
    monkeypatch.setattr(_triton.ops, "_needs_int64", lambda *tensors: True)
    for name, a, b in zip(("output", "grad_value", "grad_locations", "grad_weights"), run(triton_kernel, *inputs),
                          default):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


def test_msda_opcheck(triton_device):
    value, spatial_shapes, level_start_index, locations, weights, grad_output = to(
        triton_device, make_inputs(1, 3, 2, 24, [(3, 4), (2, 2)], 2))
    value.requires_grad_()
    locations.requires_grad_()
    weights.requires_grad_()
    torch.library.opcheck(torch.ops.mpseg_triton.ms_deform_attn,
                          (value, spatial_shapes, level_start_index, locations, weights))
    torch.library.opcheck(torch.ops.mpseg_triton._ms_deform_attn_backward,
                          (grad_output, value.detach(), spatial_shapes, level_start_index, locations.detach(),
                           weights.detach()))


def test_msda_compile_fullgraph_matches_eager(triton_device):
    inputs = to(triton_device, make_inputs(1, 4, 2, 24, [(4, 5), (2, 3)], 2, seed=9))

    def fn(value, spatial_shapes, level_start_index, locations, weights):
        return ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights, backend="triton") * 2

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = run(fn, *inputs)
    for a, b in zip(run(compiled, *inputs), eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_msda_autocast_runs_in_float32(triton_device):
    value, spatial_shapes, level_start_index, locations, weights, _ = to(
        triton_device, make_inputs(1, 4, 2, 24, [(4, 4)], 2))
    with torch.autocast(triton_device.type, dtype=torch.bfloat16):
        out = triton_kernel(value.bfloat16(), spatial_shapes, level_start_index, locations.bfloat16(),
                            weights.bfloat16())
    assert out.dtype == torch.float32


def test_msda_double_backward_raises(triton_device):
    value, spatial_shapes, level_start_index, locations, weights, _ = to(
        triton_device, make_inputs(1, 3, 1, 24, [(3, 3)], 1))
    value.requires_grad_()
    out = triton_kernel(value, spatial_shapes, level_start_index, locations, weights)
    (grad,) = torch.autograd.grad(out.sum(), value, create_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass only"):
        grad.sum().backward()


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_backend_selection_by_context_and_environment(triton_device, monkeypatch):
    inputs = to(triton_device, make_inputs(1, 3, 2, 24, [(3, 4)], 2))[:5]
    with use_backend("triton"), _OpLog() as log:
        out = ms_deform_attn(*inputs)
    assert "mpseg_triton.ms_deform_attn" in log.names
    torch.testing.assert_close(out.cpu(), ms_deform_attn_reference(*[t.cpu() for t in inputs]), rtol=1e-5, atol=1e-5)
    # MPSEG_MSDA_BACKEND=triton (read once at import: re-read here as the import would).
    monkeypatch.setenv("MPSEG_MSDA_BACKEND", "triton")
    monkeypatch.setattr(_config, "_MSDA_BACKEND", _config._read_env_backend()[0])
    assert _config.msda_backend() == "triton"
    assert "triton" in mpseg.available_backends(triton_device)
    # The automatic choice never picks Triton.
    monkeypatch.setattr(_config, "_MSDA_BACKEND", None)
    with _OpLog() as log:
        ms_deform_attn(*inputs)
    assert "mpseg_triton.ms_deform_attn" not in log.names


def test_backend_errors_say_why(monkeypatch):
    inputs = make_inputs(1, 3, 2, 24, [(3, 4)], 2)[:5]
    # CPU tensors outside the interpreter.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "triton" not in mpseg.available_backends("cpu")
    with pytest.raises(RuntimeError, match=r"backend 'triton' cannot run on cpu tensors\..*triton: inputs are on cpu: "
                                           r"Triton compiles for GPUs; set TRITON_INTERPRET=1"):
        ms_deform_attn(*inputs, backend="triton")
    with use_backend("triton"), pytest.raises(RuntimeError, match="Triton point kernels .* TRITON_INTERPRET=1"):
        mpseg.sample_masks_at_points(torch.ones(2, 4, 4, dtype=torch.bool), torch.rand(5, 2))
    # Triton not importable (a CPU-only torch wheel has none).
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_triton, "_IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    with pytest.raises(RuntimeError, match=r"triton: triton is not importable \(ModuleNotFoundError"):
        ms_deform_attn(*inputs, backend="triton")
    # Other devices.
    assert "Triton runs on cuda" in (_triton.why_not("mps") or "") or "not importable" in _triton.why_not("mps")


def test_other_backends_never_import_triton():
    # A first `import triton` costs seconds: a process that runs the other backends must not pay it.
    code = (
        "import sys, torch, mpseg\n"
        "v = torch.randn(1, 12, 2, 4); s = torch.tensor([[3, 4]]); st = torch.tensor([0])\n"
        "mpseg.ms_deform_attn(v, s, st, torch.rand(1, 5, 2, 1, 2, 2), torch.rand(1, 5, 2, 1, 2))\n"
        "mpseg.available_backends(); mpseg.available_backends('cpu')\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_tuning_parameters_are_checked():
    assert _triton._parse_tuning("msda_forward_block=4096, select_radix_bits=8") == _triton.TritonTuning(
        msda_forward_block=4096, select_radix_bits=8)
    with pytest.raises(ValueError, match="MPSEG_TRITON_TUNING: expected name=int pairs"):
        _triton._parse_tuning("block=3")
    with pytest.raises(ValueError, match="must be a power of 2, got 100"):
        _triton.TritonTuning(points_block=100)
    with pytest.raises(ValueError, match="select_radix_bits must be 1, 2, 4 or 8, got 3"):
        _triton.TritonTuning(select_radix_bits=3)


# Point kernels of the mask losses: the C++ kernels' tests, run on the Triton ops (same schemas, same messages).


@pytest.fixture
def interpreted_ops(monkeypatch):
    """torch.ops.mpseg_triton with the interpreter on: the shared tests build CPU tensors (the device runs are
    test_point_kernels_on_device_equal_the_cpu_paths and test_point_kernels_opcheck_and_compile)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _triton.load()
    return torch.ops.mpseg_triton


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.float16, torch.float32])
@pytest.mark.parametrize("coord_dtype", [torch.float32, torch.float64])
def test_mask_reads_equal_torch_path_bitwise(interpreted_ops, mask_dtype, coord_dtype):
    _check_mask_reads(interpreted_ops, mask_dtype, coord_dtype)


def test_mask_reads_edges_nonfinite_and_bad_index(interpreted_ops):
    _check_mask_edges(interpreted_ops)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("radix_bits", [4, 8])
def test_selection_keeps_the_topk_set(interpreted_ops, monkeypatch, dtype, radix_bits):
    monkeypatch.setattr(_triton.TUNING, "select_radix_bits", radix_bits)
    _check_selection(interpreted_ops, dtype)


def test_selection_ties_nan_and_extremes(interpreted_ops):
    _check_selection_edges(interpreted_ops)


def test_point_kernels_on_device_equal_the_cpu_paths(triton_device):
    g = torch.Generator().manual_seed(31)
    masks = torch.rand(4, 13, 9, generator=g) > 0.5
    coords = torch.rand(3, 70, 2, generator=g) * 1.4 - 0.2
    index = torch.tensor([3, 0, 3])
    with use_backend("triton"):
        values = mpseg.sample_masks_at_points(masks.to(triton_device), coords.to(triton_device),
                                              mask_index=index.to(triton_device),
                                              canvas_size=(15, 10))
    expected = ps._sample_masks_at_points_torch(masks, coords, index, (15, 10), torch.float32)
    torch.testing.assert_close(values.cpu(), expected, rtol=0, atol=0)
    # The selection through the public function: same generator draws, the kept set equal to the C++ kernel's (same
    # arithmetic, ties to the first candidates) and to the PyTorch path's up to rounding ties.
    logits = torch.randn(5, 1, 11, 13, generator=g, dtype=torch.float64)
    with use_backend("triton"):
        ours = mpseg.sample_uncertain_points(logits.to(triton_device), 40,
                                             generator=torch.Generator(triton_device).manual_seed(3))
    candidates = ps.uniform_points(5, 120, device=triton_device,
                                   generator=torch.Generator(triton_device).manual_seed(3)).cpu()
    assert ours.shape == (5, 40, 2)
    kept = ps._select_uncertain_points_torch(logits, candidates, 30, ps.logit_uncertainty)
    for n in range(5):
        assert sorted(map(tuple, ours[n, :30].cpu().tolist())) == sorted(map(tuple, kept[n].tolist()))
    if mpseg._extension.load().loaded:
        cpp = torch.ops.mpseg._select_uncertain_points(logits[:, 0], candidates, 30)
        torch.testing.assert_close(ours[:, :30].cpu(), cpp, rtol=0, atol=0)


def test_point_kernels_opcheck_and_compile(triton_device):
    triton_ops = torch.ops.mpseg_triton
    g = torch.Generator().manual_seed(24)
    masks = (torch.rand(3, 9, 11, generator=g) > 0.5).to(triton_device)
    coords = torch.rand(4, 20, 2, generator=g).to(triton_device)
    index = torch.tensor([2, 0, 1, 2], device=triton_device)
    logits = torch.randn(4, 6, 7, generator=g).to(triton_device)
    torch.library.opcheck(triton_ops._sample_masks_at_points, (masks, coords, index, 10, 12))
    torch.library.opcheck(triton_ops._select_uncertain_points, (logits, coords, 5))

    def fn(logits, coords, masks, index):
        kept = triton_ops._select_uncertain_points(logits, coords, 5)
        return triton_ops._sample_masks_at_points(masks, kept, index, 9, 11)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, coords, masks, index), fn(logits, coords, masks, index),
                               rtol=0, atol=0)
