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

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")


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
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
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
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
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
    g = torch.Generator(torch.get_default_device()).manual_seed(2)
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
    a = uniform_points(3, 1000, generator=torch.Generator(torch.get_default_device()).manual_seed(5))
    b = uniform_points(3, 1000, generator=torch.Generator(torch.get_default_device()).manual_seed(5))
    assert a.shape == (3, 1000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) < 1
    with pytest.raises(ValueError, match=r"generator is on cpu but the points are drawn on meta"):
        uniform_points(2, 10, device="meta", generator=torch.Generator(torch.get_default_device()))
    # The generator is the only source: the global RNG is untouched.
    state = torch.get_rng_state()
    uniform_points(2, 10, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())


def test_sample_uncertain_points_selects_most_uncertain():
    g = torch.Generator(torch.get_default_device()).manual_seed(3)
    logits = torch.randn(4, 1, 16, 16, generator=g) * 4
    num_points, ratio = 40, 0.75
    coords = sample_uncertain_points(
        logits, num_points, oversample_ratio=3.0, importance_sample_ratio=ratio,
        generator=torch.Generator(torch.get_default_device()).manual_seed(9),
    )
    assert coords.shape == (4, num_points, 2)
    # Replay the two draws and pick the top uncertain candidates with an independent loop.
    replay = torch.Generator(torch.get_default_device()).manual_seed(9)
    candidates = torch.rand(4, 120, 2, generator=replay)
    fill = torch.rand(4, num_points - 30, 2, generator=replay)
    for n in range(4):
        values = [-abs(bilinear_loop(logits[n, 0], float(x), float(y))) for x, y in candidates[n]]
        order = sorted(range(120), key=lambda i: -values[i])[:30]
        assert sorted(map(tuple, candidates[n, order].tolist())) == sorted(map(tuple, coords[n, :30].tolist()))
        torch.testing.assert_close(coords[n, 30:], fill[n])


def test_sample_uncertain_points_matches_transformers():
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerLoss

    logits = torch.randn(5, 1, 24, 24, generator=torch.Generator(torch.get_default_device()).manual_seed(4))
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
        torch.zeros(2, 1, 8, 8), 10, importance_sample_ratio=0.0, generator=torch.Generator(torch.get_default_device()).manual_seed(0)
    )
    replay = torch.Generator(torch.get_default_device()).manual_seed(0)
    torch.rand(2, 30, 2, generator=replay)
    torch.testing.assert_close(only_random, torch.rand(2, 10, 2, generator=replay))
    with pytest.raises(ValueError, match=r"logits must be a Tensor \[N, 1, H, W\]"):
        sample_uncertain_points(torch.zeros(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="oversample_ratio"):
        sample_uncertain_points(torch.zeros(2, 1, 8, 8), 10, oversample_ratio=0.5)
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        sample_uncertain_points(torch.zeros(2, 1, 8, 8), 10, importance_sample_ratio=1.5)


# --- The compiled point kernels (mpseg::_sample_masks_at_points, mpseg::_select_uncertain_points) against the PyTorch
# paths they replace and against hand-written loops. `make test-sanitize` runs the ones marked `sanitize` under
# AddressSanitizer/UBSan.

from mpseg import _extension  # noqa: E402
from mpseg.ops import point_sampling as ps  # noqa: E402

MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(scope="module")
def ops():
    assert _extension.load().loaded, _extension.status().reason()  # CI builds the extension: its absence is a failure
    return torch.ops.mpseg


@pytest.mark.sanitize
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES)
@pytest.mark.parametrize("coord_dtype", [torch.float32, torch.float64])
def test_mask_kernel_equals_torch_path(ops, mask_dtype, coord_dtype):
    g = torch.Generator(torch.get_default_device()).manual_seed(20)
    values = torch.rand(5, 19, 27, generator=g)
    masks = (values > 0.5).to(mask_dtype) if not mask_dtype.is_floating_point else values.to(mask_dtype)
    canvas = (24, 31)
    shared = (torch.rand(400, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).to(coord_dtype)  # some off the map
    rows = (torch.rand(5, 400, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).to(coord_dtype)
    index = torch.tensor([4, 0, 4, 2])
    picked = rows[:4]
    # Same formula, same order of operations: equal to the last bit.
    for coords, mask_index in ((shared, None), (rows, None), (picked, index)):
        kernel = ops._sample_masks_at_points(masks, coords, mask_index, *canvas)
        torch_path = ps._sample_masks_at_points_torch(masks, coords, mask_index, canvas, coord_dtype)
        assert kernel.dtype == coord_dtype
        torch.testing.assert_close(kernel, torch_path, rtol=0, atol=0)
    # And the public function (kernel inside) against the hand-written loop on the zero-padded canvas.
    out = sample_masks_at_points(masks, picked, mask_index=index, canvas_size=canvas, dtype=torch.float64)
    for r, p in itertools.product(range(4), range(0, 400, 37)):
        padded = torch.zeros(canvas, dtype=torch.float64)
        padded[:19, :27] = masks[index[r]].double()
        expected = bilinear_loop(padded, float(picked[r, p, 0]), float(picked[r, p, 1]))
        assert abs(float(out[r, p]) - expected) < (1e-12 if coord_dtype == torch.float64 else 1e-5)


@pytest.mark.sanitize
@pytest.mark.cpu_only  # on a GPU: a device-side assertion, which ends the CUDA context
def test_mask_kernel_edges_nonfinite_and_bad_index(ops):
    masks = torch.ones(2, 3, 4, dtype=torch.bool)
    coords = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [float("nan"), 0.5], [0.5, float("inf")],
                           [-float("inf"), 0.5], [1e30, -1e30], [0.999999, 0.0]])
    out = ops._sample_masks_at_points(masks, coords, None, 3, 4)
    # Corners read a quarter pixel, the centre one pixel; NaN / infinite coordinates give NaN as grid_sample does (and
    # the PyTorch path), huge ones read zero: no undefined float-to-int conversion either way.
    expected = torch.tensor([0.25, 0.25, 1.0, float("nan"), float("nan"), float("nan"), 0.0, 0.25])
    torch.testing.assert_close(out[0], expected, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(out[0], point_sample(masks[:1, None].float(), coords[None])[0, 0], equal_nan=True)
    torch_path = ps._sample_masks_at_points_torch(masks, coords, None, (3, 4), torch.float32)
    torch.testing.assert_close(out, torch_path, atol=0, rtol=0, equal_nan=True)
    with pytest.raises(ValueError, match=r"mask_index must hold indices into the 2 masks, got values in \[0, 2\]"):
        sample_masks_at_points(masks, torch.rand(2, 5, 2), mask_index=torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match=r"mask_index\[1\] = -1 is out of range for 2 masks"):
        ops._sample_masks_at_points(masks, torch.rand(2, 5, 2), torch.tensor([0, -1]), 3, 4)
    with pytest.raises(RuntimeError, match="canvas"):
        ops._sample_masks_at_points(masks, coords, None, 2, 4)
    with pytest.raises(RuntimeError, match="coords must be float32 or float64"):
        ops._sample_masks_at_points(masks, coords.half(), None, 3, 4)
    # Empty inputs.
    assert ops._sample_masks_at_points(masks[:0], coords, None, 3, 4).shape == (0, 8)
    assert ops._sample_masks_at_points(masks, coords[:0], None, 3, 4).shape == (2, 0)
    assert ops._sample_masks_at_points(torch.ones(2, 0, 4), coords, None, 3, 4).abs().sum() == 0


def _replay_selection(logits, coords, keep):
    """The kept set of the PyTorch path (torch.topk) and the keys, for comparison with the kernel."""
    kept = ps._select_uncertain_points_torch(logits.unsqueeze(1), coords, keep, logit_uncertainty)
    keys = -point_sample(logits.unsqueeze(1), coords.to(logits.dtype)).squeeze(1).abs()
    return kept, keys


@pytest.mark.sanitize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_kernel_keeps_the_topk_set_in_candidate_order(ops, dtype):
    g = torch.Generator(torch.get_default_device()).manual_seed(21)
    logits = (torch.randn(6, 23, 17, generator=g) * 3).to(dtype)
    coords = torch.rand(6, 900, 2, generator=g)
    keep = 225
    out = ops._select_uncertain_points(logits, coords, keep)
    assert out.shape == (6, keep, 2) and out.dtype == coords.dtype
    kept, keys = _replay_selection(logits, coords, keep)
    for n in range(6):
        # Same set as torch.topk, except possibly among candidates whose keys tie with the k-th largest to rounding.
        position = {tuple(c): i for i, c in enumerate(coords[n].tolist())}
        ours = sorted(position[tuple(c)] for c in out[n].tolist())
        theirs = sorted(position[tuple(c)] for c in kept[n].tolist())
        threshold = keys[n].sort(descending=True).values[keep - 1]
        for i in set(ours) ^ set(theirs):
            assert abs(float(keys[n, i] - threshold)) < 1e-6
        assert len(set(ours)) == keep
        # In candidate order (the kernel's contract on every backend).
        assert [position[tuple(c)] for c in out[n].tolist()] == ours


@pytest.mark.sanitize
def test_select_kernel_ties_nan_and_extremes(ops):
    coords = torch.rand(3, 50, 2, generator=torch.Generator(torch.get_default_device()).manual_seed(22))
    # All keys equal: the first k candidates, in order.
    out = ops._select_uncertain_points(torch.zeros(3, 8, 8), coords, 7)
    torch.testing.assert_close(out, coords[:, :7], rtol=0, atol=0)
    # NaN logits rank above every number, as in torch.topk: a NaN map is chosen first, whole rows of it in order.
    logits = torch.randn(3, 8, 8)
    logits[1] = float("nan")
    out = ops._select_uncertain_points(logits, coords, 10)
    torch.testing.assert_close(out[1], coords[1, :10], rtol=0, atol=0)
    assert torch.isfinite(out).all()
    # So does a candidate at a non-finite coordinate (it samples NaN, as in grid_sample).
    odd = coords.clone()
    odd[0, 7] = torch.tensor([float("nan"), 0.5])
    odd[2, 9] = torch.tensor([0.5, float("inf")])
    out = ops._select_uncertain_points(torch.randn(3, 8, 8), odd, 1)
    torch.testing.assert_close(out[[0, 2], 0], odd[[0, 2], [7, 9]], rtol=0, atol=0, equal_nan=True)
    # k = 0 and k = S, empty batches and maps; coordinates off the map read logit 0 (most uncertain) like padding.
    assert ops._select_uncertain_points(logits, coords, 0).shape == (3, 0, 2)
    full = ops._select_uncertain_points(logits, coords, 50)
    torch.testing.assert_close(full, coords, rtol=0, atol=0)
    assert ops._select_uncertain_points(logits[:0], coords[:0], 5).shape == (0, 5, 2)
    far = coords.clone()
    far[:, 3] = torch.tensor([5.0, float("inf")])
    confident = torch.randn(3, 8, 8).abs() + 1  # |logit| >= 1 on the map, 0 off it
    torch.testing.assert_close(ops._select_uncertain_points(confident, far, 1), far[:, 3:4], rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"k must be in \[0, S\] = \[0, 50\], got 51"):
        ops._select_uncertain_points(logits, coords, 51)
    with pytest.raises(RuntimeError, match="logits must be float32 or float64"):
        ops._select_uncertain_points(logits.half(), coords, 5)
    with pytest.raises(RuntimeError, match=r"coords must be \[N, S, 2\] with N = 3"):
        ops._select_uncertain_points(logits, coords[:2], 5)


def test_sample_uncertain_points_kernel_and_torch_path_draw_alike(ops, monkeypatch):
    """The kernel consumes the generator exactly as the PyTorch path (and detectron2) does."""
    logits = torch.randn(4, 1, 30, 30, generator=torch.Generator(torch.get_default_device()).manual_seed(23))
    gen_kernel, gen_torch = torch.Generator(torch.get_default_device()).manual_seed(5), torch.Generator(torch.get_default_device()).manual_seed(5)
    with_kernel = sample_uncertain_points(logits, 200, generator=gen_kernel)
    monkeypatch.setattr(ps, "_kernels_for", lambda device_type, triton: None)
    without = sample_uncertain_points(logits, 200, generator=gen_torch)
    assert torch.equal(gen_kernel.get_state(), gen_torch.get_state())
    torch.testing.assert_close(with_kernel[:, 150:], without[:, 150:], rtol=0, atol=0)  # the uniform fill
    for a, b in zip(with_kernel[:, :150], without[:, :150]):
        assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, b.tolist()))


def test_point_kernels_opcheck_and_no_gradient(ops, monkeypatch):
    g = torch.Generator(torch.get_default_device()).manual_seed(24)
    masks = torch.rand(3, 9, 11, generator=g) > 0.5
    coords = torch.rand(4, 20, 2, generator=g)
    index = torch.tensor([2, 0, 1, 2])
    torch.library.opcheck(ops._sample_masks_at_points, (masks, coords, index, 12, 11))
    torch.library.opcheck(ops._sample_masks_at_points, (masks.float(), coords[0].double(), None, 9, 11))
    torch.library.opcheck(ops._select_uncertain_points, (torch.randn(4, 9, 11, generator=g), coords, 5))
    # The selection runs the kernel even for logits that need a gradient (its output never has one).
    calls = []
    monkeypatch.setattr(ps, "_select_uncertain_points_torch", lambda *args: calls.append(args))
    sample_uncertain_points(torch.randn(2, 1, 8, 8, requires_grad=True), 16)
    assert not calls
    # Outputs are constants for autograd; the public function keeps its gradient by taking the PyTorch path.
    soft = torch.rand(3, 9, 11, generator=g, requires_grad=True)
    assert not ops._sample_masks_at_points(soft, coords, index, 9, 11).requires_grad
    out = sample_masks_at_points(soft, coords, mask_index=index)
    out.sum().backward()
    expected = torch.autograd.grad(point_sample(soft[index].unsqueeze(1), coords).sum(), soft)[0]
    torch.testing.assert_close(soft.grad, expected)


def test_point_kernels_compile_without_graph_breaks(ops):
    torch._dynamo.reset()
    logits = torch.randn(3, 1, 16, 16)
    masks = torch.rand(2, 32, 32) > 0.5
    index = torch.tensor([1, 0, 1])

    def losses_points(logits, masks, index, gen_seed):
        coords = sample_uncertain_points(logits, 64, generator=None)
        return coords, sample_masks_at_points(masks, coords, mask_index=index)

    compiled = torch.compile(losses_points, fullgraph=True, backend="eager")
    coords, values = compiled(logits, masks, index, 0)
    assert coords.shape == (3, 64, 2) and values.shape == (3, 64)
    expected = ps._sample_masks_at_points_torch(masks, coords, index, (32, 32), torch.float32)
    torch.testing.assert_close(values, expected, rtol=0, atol=0)
