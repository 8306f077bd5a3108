# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The CUDA backward's decomposition, run on the CPU, against the float64 oracle.

No GPU has run ``csrc/ms_deform_attn/cuda/ms_deform_attn_kernel.cu`` in CI. Its backward gives a warp one (b, q, m)
task, splits the 32 lanes into groups of ``group`` lanes (one sample per group and pass, lanes over channels), sums
the lanes' partial dot products with an xor butterfly and lets each group's first lane write the sample's gradients.
``torch.ops.mpseg._ms_deform_attn_backward_warp_emulation`` (``csrc/ms_deform_attn/warp_emulation.cpp``) walks exactly
those warps, passes and lanes with the same ``__host__ __device__`` functions (``warp_split``, ``lane_corner_partials``,
``sample_gradients`` in ``sampling.h``), the butterfly emulated in the same summation order. Only the shuffle and
atomic instructions themselves are not exercised here (``make gpu-check`` runs the real kernel on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from test_ms_deform_attn import CASES, TOLERANCE, assert_close_scaled, make_inputs, reference64

from mpseg import _extension


@pytest.fixture(scope="module", autouse=True)
def loaded():
    status = _extension.load()
    assert status.loaded, f"mpseg._C did not load: {status.reason()}"


def emulate(value, spatial_shapes, level_start_index, locations, weights, grad_output, index_bits=0):
    return torch.ops.mpseg._ms_deform_attn_backward_warp_emulation(
        grad_output, value, spatial_shapes, level_start_index, locations, weights, index_bits
    )


@pytest.mark.parametrize("index_bits", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_warp_decomposition_matches_oracle(case, dtype, index_bits):
    # CASES cover channels 1, 5, 16, 24, 32, 48 (groups of 1, 8, 16 and 32 lanes; 1 and 2 channel steps), 1-8 points
    # (passes that leave lanes idle), 1-4 levels and locations partly outside the maps.
    inputs = make_inputs(*CASES[case], dtype=dtype, seed=100 + case)
    _, grad_value, grad_locations, grad_weights = reference64(*inputs)
    value, spatial_shapes, level_start_index, locations, weights, grad_output = inputs
    actual = emulate(value, spatial_shapes, level_start_index, locations, weights, grad_output, index_bits)
    tolerance = TOLERANCE.get(dtype, 5e-3)
    for name, a, e in zip(("grad_value", "grad_locations", "grad_weights"), actual, (grad_value, grad_locations,
                                                                                      grad_weights)):
        assert a.dtype == dtype, name
        assert_close_scaled(a, e, tolerance, name)


def test_warp_decomposition_equals_the_cpu_kernel_in_float64():
    # Same formulas, different summation order: equal to rounding in float64.
    inputs = make_inputs(2, 5, 3, 40, [(6, 7), (3, 2)], 3, dtype=torch.float64, seed=3)
    value, spatial_shapes, level_start_index, locations, weights, grad_output = inputs
    expected = torch.ops.mpseg._ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                                         locations, weights)
    actual = emulate(*inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_nan_and_outside_locations_give_zero_gradients():
    inputs = list(make_inputs(1, 4, 2, 8, [(4, 4)], 2, dtype=torch.float32, seed=5))
    locations = inputs[3].clone()
    locations[0, 0] = float("nan")
    locations[0, 1] = float("inf")
    locations[0, 2] = 3.0  # far outside
    inputs[3] = locations
    _, grad_locations, grad_weights = emulate(*inputs)
    assert torch.all(grad_locations[0, :3] == 0) and torch.all(grad_weights[0, :3] == 0)
    assert torch.isfinite(grad_locations).all() and grad_weights[0, 3].abs().sum() > 0


def test_empty_inputs():
    for shape in [(0, 4), (2, 0)]:
        inputs = make_inputs(shape[0], shape[1], 2, 8, [(3, 3)], 2, dtype=torch.float32)
        grads = emulate(*inputs)
        assert [tuple(g.shape) for g in grads] == [tuple(inputs[0].shape), tuple(inputs[3].shape),
                                                   tuple(inputs[4].shape)]


@pytest.mark.parametrize(
    "channels, group, samples",
    [(1, 1, 32), (2, 2, 16), (5, 8, 4), (8, 8, 4), (16, 16, 2), (24, 32, 1), (32, 32, 1), (33, 32, 1), (256, 32, 1)],
)
def test_warp_split(channels, group, samples):
    # The smallest power-of-two group that covers the channels (at most a warp); the warp's 32 lanes hold 32 / group
    # samples per pass.
    plan = torch.ops.mpseg._ms_deform_attn_warp_plan(channels, 10, 10, 10)
    assert plan[:2] == [group, samples]


def test_index_width_choice():
    limit = 2**31 - 1
    plan = torch.ops.mpseg._ms_deform_attn_warp_plan
    assert plan(32, limit, limit // 2, limit)[2] == 1
    assert plan(32, limit + 1, 1, 1)[2] == 0  # value (and grad_value) offsets
    assert plan(32, 1, limit // 2 + 1, 1)[2] == 0  # two location coordinates per sample
    assert plan(32, 1, 1, limit + 1)[2] == 0  # output / grad_output offsets
    value, shapes, starts, locations, weights, grad_output = make_inputs(1, 2, 1, 4, [(2, 2)], 1)
    emulate(value, shapes, starts, locations, weights, grad_output, 64)  # either width may be forced where it fits
    with pytest.raises(RuntimeError, match="index_bits must be 0, 32 or 64"):
        emulate(value, shapes, starts, locations, weights, grad_output, 16)
