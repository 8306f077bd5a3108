# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""point_sample, sample_masks_at_points and importance sampling against hand-written bilinear lookups and HF."""

import itertools
import math

import pytest
import torch

import mpseg
from mpseg.ops.point_sampling import (
    logit_uncertainty,
    point_sample,
    sample_masks_at_points,
    sample_uncertain_points,
    uniform_points,
)


def bilinear_loop(image, x, y):
    """One value of a [H, W] map at normalised (x, y): align_corners=False, zero padding, written out by hand."""
    height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = 0.0
    for dy, dx in itertools.product((0, 1), (0, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (1 - abs(px - xi)) * (1 - abs(py - yi))
        if 0 <= xi < width and 0 <= yi < height:
            total += weight * float(image[yi, xi])
    return total


def test_point_sample_is_exported_and_hand_checked():
    assert mpseg.point_sample is point_sample
    image = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.5, 0.5], [0.0, 0.0], [1.0, 0.25]]])
    # Pixel centres read the pixel; the middle averages all four; the corner (0, 0) is a quarter of pixel (0, 0)
    # and three zero-padding neighbours; the right edge at a pixel row mixes half of pixel (0, 1) with padding.
    expected = torch.tensor([[[1.0, 2.0, 3.0, 2.5, 0.25, 1.0]]])
    torch.testing.assert_close(point_sample(image, coords), expected)


def test_point_sample_matches_loop_reference_and_grid_form():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 5, 7, generator=g, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2  # some outside the map
    out = point_sample(image, coords)
    assert out.shape == (2, 3, 11)
    for n, c, p in itertools.product(range(2), range(3), range(11)):
        ref = bilinear_loop(image[n, c], float(coords[n, p, 0]), float(coords[n, p, 1]))
        assert abs(float(out[n, c, p]) - ref) < 1e-12
    grid_out = point_sample(image, coords.view(2, 1, 11, 2))
    torch.testing.assert_close(grid_out.view(2, 3, 11), out)


@pytest.mark.parametrize("dtype", [torch.bool, torch.uint8, torch.float32])
def test_sample_masks_at_points_equals_point_sample_on_float(dtype):
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(4, 37, 23, generator=g)
    masks = (masks > 0.5).to(dtype) if dtype != torch.float32 else masks
    shared = torch.rand(300, 2, generator=g) * 1.2 - 0.1
    per_row = torch.rand(4, 300, 2, generator=g)
    reference_input = masks.float().unsqueeze(1)
    expected_shared = point_sample(reference_input, shared.expand(4, -1, -1)).squeeze(1)
    expected_rows = point_sample(reference_input, per_row).squeeze(1)
    torch.testing.assert_close(sample_masks_at_points(masks, shared), expected_shared, atol=1e-5, rtol=0)
    torch.testing.assert_close(sample_masks_at_points(masks, per_row), expected_rows, atol=1e-5, rtol=0)
    # mask_index picks (and repeats) masks without copying them.
    index = torch.tensor([3, 0, 3])
    rows = torch.rand(3, 300, 2, generator=g)
    expected_index = point_sample(reference_input[index], rows).squeeze(1)
    torch.testing.assert_close(
        sample_masks_at_points(masks, rows, mask_index=index), expected_index, atol=1e-5, rtol=0
    )


def test_sample_masks_at_points_canvas_equals_zero_padding():
    g = torch.Generator().manual_seed(2)
    masks = torch.rand(3, 20, 30, generator=g) > 0.3
    padded = torch.zeros(3, 32, 40)
    padded[:, :20, :30] = masks.float()
    coords = torch.rand(3, 500, 2, generator=g)
    expected = point_sample(padded.unsqueeze(1), coords).squeeze(1)
    torch.testing.assert_close(
        sample_masks_at_points(masks, coords, canvas_size=(32, 40)), expected, atol=1e-5, rtol=0
    )
    with pytest.raises(ValueError, match="canvas_size"):
        sample_masks_at_points(masks, coords, canvas_size=(10, 40))


def test_sample_masks_at_points_empty_and_errors():
    assert sample_masks_at_points(torch.zeros(0, 8, 8, dtype=torch.bool), torch.rand(5, 2)).shape == (0, 5)
    out = sample_masks_at_points(torch.ones(2, 8, 8, dtype=torch.bool), torch.rand(2, 0, 2))
    assert out.shape == (2, 0)
    with pytest.raises(ValueError, match=r"masks must be a 3-D Tensor"):
        sample_masks_at_points(torch.ones(8, 8), torch.rand(5, 2))
    with pytest.raises(ValueError, match=r"R = 2 rows"):
        sample_masks_at_points(torch.ones(2, 8, 8), torch.rand(3, 5, 2))
    with pytest.raises(TypeError, match="floating-point"):
        sample_masks_at_points(torch.ones(2, 8, 8), torch.ones(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"input must be a 4-D Tensor"):
        point_sample(torch.ones(2, 8, 8), torch.rand(2, 5, 2))
    with pytest.raises(ValueError, match=r"N = input.shape\[0\] = 2"):
        point_sample(torch.ones(2, 1, 8, 8), torch.rand(3, 5, 2))


def test_uniform_points_generator_and_range():
    a = uniform_points(3, 1000, generator=torch.Generator().manual_seed(5))
    b = uniform_points(3, 1000, generator=torch.Generator().manual_seed(5))
    assert a.shape == (3, 1000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) < 1
    with pytest.raises(ValueError, match=r"generator is on cpu but the points are drawn on meta"):
        uniform_points(2, 10, device="meta", generator=torch.Generator())
    # The generator is the only source: the global RNG is untouched.
    state = torch.get_rng_state()
    uniform_points(2, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_sample_uncertain_points_selects_most_uncertain():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 1, 16, 16, generator=g) * 4
    num_points, ratio = 40, 0.75
    coords = sample_uncertain_points(
        logits, num_points, oversample_ratio=3.0, importance_sample_ratio=ratio,
        generator=torch.Generator().manual_seed(9),
    )
    assert coords.shape == (4, num_points, 2)
    # Replay the two draws and pick the top uncertain candidates with an independent loop.
    replay = torch.Generator().manual_seed(9)
    candidates = torch.rand(4, 120, 2, generator=replay)
    fill = torch.rand(4, num_points - 30, 2, generator=replay)
    for n in range(4):
        values = [-abs(bilinear_loop(logits[n, 0], float(x), float(y))) for x, y in candidates[n]]
        order = sorted(range(120), key=lambda i: -values[i])[:30]
        assert sorted(map(tuple, candidates[n, order].tolist())) == sorted(map(tuple, coords[n, :30].tolist()))
        torch.testing.assert_close(coords[n, 30:], fill[n])


def test_sample_uncertain_points_matches_transformers():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    logits = torch.randn(5, 1, 24, 24, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(11)
    ours = sample_uncertain_points(logits, 100, oversample_ratio=3.0, importance_sample_ratio=0.75)
    torch.manual_seed(11)
    # The method does not use `self`; call it unbound.
    theirs = Mask2FormerLoss.sample_points_using_uncertainty(None, logits, logit_uncertainty, 100, 3.0, 0.75)
    # The same uncertain points (as a set: the order within them is free) and the same random fill.
    for row_ours, row_theirs in zip(ours, theirs):
        assert sorted(map(tuple, row_ours[:75].tolist())) == sorted(map(tuple, row_theirs[:75].tolist()))
    torch.testing.assert_close(ours[:, 75:], theirs[:, 75:], rtol=0, atol=0)


def test_sample_uncertain_points_empty_and_errors():
    assert sample_uncertain_points(torch.zeros(0, 1, 8, 8), 10).shape == (0, 10, 2)
    only_random = sample_uncertain_points(
        torch.zeros(2, 1, 8, 8), 10, importance_sample_ratio=0.0, generator=torch.Generator().manual_seed(0)
    )
    replay = torch.Generator().manual_seed(0)
    torch.rand(2, 30, 2, generator=replay)
    torch.testing.assert_close(only_random, torch.rand(2, 10, 2, generator=replay))
    with pytest.raises(ValueError, match=r"logits must be a Tensor \[N, 1, H, W\]"):
        sample_uncertain_points(torch.zeros(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="oversample_ratio"):
        sample_uncertain_points(torch.zeros(2, 1, 8, 8), 10, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        sample_uncertain_points(torch.zeros(2, 1, 8, 8), 10, importance_sample_ratio=1.5)
