# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The MSDeformAttn module: Deformable DETR's parameters and initialisation, 2-d/4-d reference points, padding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mpseg import MSDeformAttn

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")


def level_metadata(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return spatial_shapes, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]]), int(areas.sum())


def randomise(module, generator):
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype) * 0.3)


def manual_forward(module, query, reference_points, memory, shapes, padding_mask=None):
    """Deformable attention written out level by level with grid_sample: independent of the op and its reference."""
    batch, queries, channels = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    head_dim = channels // heads
    value = F.linear(memory, module.value_proj.weight, module.value_proj.bias)
    if padding_mask is not None:
        value = value * (~padding_mask)[..., None]
    offsets = F.linear(query, module.sampling_offsets.weight, module.sampling_offsets.bias)
    offsets = offsets.reshape(batch, queries, heads, levels, points, 2)
    logits = F.linear(query, module.attention_weights.weight, module.attention_weights.bias)
    weights = logits.reshape(batch, queries, heads, levels * points).softmax(-1)
    weights = weights.reshape(batch, queries, heads, levels, points)
    output = torch.zeros(batch, queries, heads, head_dim, dtype=query.dtype)
    start = 0
    for level, (height, width) in enumerate(shapes):
        value_l = value[:, start : start + height * width].reshape(batch, height, width, heads, head_dim)
        start += height * width
        for head in range(heads):
            image = value_l[..., head, :].permute(0, 3, 1, 2)  # [B, D, H, W]
            if reference_points.shape[-1] == 2:
                xy = reference_points[:, :, level][:, :, None, :] + offsets[:, :, head, level] / torch.tensor(
                    [width, height], dtype=query.dtype)
            else:
                box = reference_points[:, :, level]
                xy = box[:, :, None, :2] + offsets[:, :, head, level] / points * box[:, :, None, 2:] * 0.5
            sampled = F.grid_sample(image, 2 * xy - 1, mode="bilinear", padding_mode="zeros", align_corners=False)
            # sampled: [B, D, Q, P]
            output[:, :, head] += torch.einsum("bdqp,bqp->bqd", sampled, weights[:, :, head, level])
    return F.linear(output.reshape(batch, queries, channels), module.output_proj.weight, module.output_proj.bias)


def test_parameter_names_shapes_and_initialisation():
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=8, n_points=4)
    shapes = {name: tuple(p.shape) for name, p in module.state_dict().items()}
    assert shapes == {
        "sampling_offsets.weight": (8 * 3 * 4 * 2, 32), "sampling_offsets.bias": (8 * 3 * 4 * 2,),
        "attention_weights.weight": (8 * 3 * 4, 32), "attention_weights.bias": (8 * 3 * 4,),
        "value_proj.weight": (32, 32), "value_proj.bias": (32,),
        "output_proj.weight": (32, 32), "output_proj.bias": (32,),
    }
    assert not module.sampling_offsets.weight.any()
    bias = module.sampling_offsets.bias.view(8, 3, 4, 2)
    # Head 0 looks right, head 1 diagonally down-right (45 degrees, scaled to max |coord| = 1), head 2 down, head 4
    # left; point p at distance p + 1; the same on every level.
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]]))
    torch.testing.assert_close(bias[1, 2, 1], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(bias[2, 1, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[4, 0, 3], torch.tensor([-4.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 0], bias[:, 2])
    assert not module.attention_weights.weight.any() and not module.attention_weights.bias.any()
    bound = math.sqrt(6.0 / (32 + 32))
    for proj in (module.value_proj, module.output_proj):
        assert proj.weight.abs().max() <= bound and proj.weight.std() > bound / 4
        assert not proj.bias.any()


@pytest.mark.parametrize("box", [False, True], ids=["points", "boxes"])
def test_forward_backward_matches_manual_computation(box):
    generator = torch.Generator(torch.get_default_device()).manual_seed(0)
    shapes = [(6, 7), (3, 4)]
    spatial_shapes, level_start_index, rows = level_metadata(shapes)
    module = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3).double()
    randomise(module, generator)
    query = torch.randn(2, 5, 16, generator=generator, dtype=torch.float64)
    memory = torch.randn(2, rows, 16, generator=generator, dtype=torch.float64)
    reference = torch.rand(2, 5, 2, 4 if box else 2, generator=generator, dtype=torch.float64)
    padding = torch.rand(2, rows, generator=generator) < 0.2
    out = module(query, reference, memory, spatial_shapes, level_start_index, padding)
    expected = manual_forward(module, query, reference, memory, shapes, padding)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # Parameter gradients through the op's backward equal those of the manual computation.
    grad_output = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad((out * grad_output).sum(), list(module.parameters()))
    expected_grads = torch.autograd.grad((expected * grad_output).sum(), list(module.parameters()))
    for name, g, e in zip([n for n, _ in module.named_parameters()], grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10, msg=name)


def test_padding_mask_removes_padded_positions():
    generator = torch.Generator(torch.get_default_device()).manual_seed(1)
    spatial_shapes, level_start_index, rows = level_metadata([(5, 5)])
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=4)
    randomise(module, generator)
    query = torch.randn(1, 3, 8, generator=generator)
    reference = torch.rand(1, 3, 1, 2, generator=generator)
    memory = torch.randn(1, rows, 8, generator=generator)
    mask = torch.zeros(1, rows, dtype=torch.bool)
    mask[0, 10:] = True
    changed = memory.clone()
    changed[0, 10:] = 100.0
    out = module(query, reference, memory, spatial_shapes, level_start_index, mask)
    torch.testing.assert_close(module(query, reference, changed, spatial_shapes, level_start_index, mask), out)
    assert not torch.allclose(module(query, reference, changed, spatial_shapes, level_start_index), out)


def test_reference_and_kernel_backends_agree_in_module():
    from mpseg.ops.ms_deform_attn import use_backend

    generator = torch.Generator(torch.get_default_device()).manual_seed(2)
    spatial_shapes, level_start_index, rows = level_metadata([(8, 8), (4, 4), (2, 2)])
    module = MSDeformAttn(d_model=32, n_levels=3, n_heads=4, n_points=2)
    query = torch.randn(2, 9, 32, generator=generator)
    reference = torch.rand(2, 9, 3, 2, generator=generator)
    memory = torch.randn(2, rows, 32, generator=generator)
    out = module(query, reference, memory, spatial_shapes, level_start_index)
    with use_backend("reference"):
        expected = module(query, reference, memory, spatial_shapes, level_start_index)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, got d_model=30, n_heads=8"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="n_points must be a positive int"):
        MSDeformAttn(n_points=0)
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=1)
    spatial_shapes, level_start_index, rows = level_metadata([(3, 3)])
    query, memory = torch.randn(1, 2, 8), torch.randn(1, rows, 8)
    with pytest.raises(ValueError, match=r"reference_points must be \[B=1, Q=2, L=1, 2 or 4\], got \(1, 2, 1, 3\)"):
        module(query, torch.rand(1, 2, 1, 3), memory, spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="input_flatten must be"):
        module(query, torch.rand(1, 2, 1, 2), memory[..., :4], spatial_shapes, level_start_index)
    with pytest.raises(ValueError, match="input_padding_mask must be bool"):
        module(query, torch.rand(1, 2, 1, 2), memory, spatial_shapes, level_start_index, torch.zeros(1, rows))
