# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Point sampling: PointRend's bilinear point lookup and its uncertainty-guided point selection.

Mask2Former (Cheng et al., CVPR 2022, Sec. 3.3) computes its mask losses and matching costs on ``K`` sampled points
instead of on whole masks, which cuts training memory threefold. This module holds the three pieces:

* :func:`point_sample` looks up feature maps at normalised points (bilinear, ``align_corners=False``, zero padding:
  detectron2's ``point_sample`` semantics);
* :func:`sample_masks_at_points` does the same lookup on *binary target masks* without converting them to float,
  gathering only the four neighbours of each point (a 512x512 target is 262144 values; 12544 points read 50176);
* :func:`sample_uncertain_points` is PointRend's importance sampling (Kirillov et al., CVPR 2020): oversample random
  points, keep the most uncertain share, fill the rest uniformly.

Every random draw goes through :func:`uniform_points`, in the order detectron2 makes them, so a run seeded like the
official code draws the same points.

The uncertain-point selection and the target-mask reads run as compiled kernels (``torch.ops.mpseg``, from
``csrc/point_sampling``) when the extension is loaded for the inputs' device (the target reads: and no input needs a
gradient); otherwise, and for tests, the PyTorch paths ``_select_uncertain_points_torch`` and
``_sample_masks_at_points_torch`` run. With the backend set to ``"triton"`` (``MPSEG_MSDA_BACKEND=triton`` or
:func:`mpseg.ops.ms_deform_attn.use_backend`), the Triton kernels of :mod:`mpseg.ops._triton` run instead
(``torch.ops.mpseg_triton``, same schemas), or an error says why they cannot.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _config, _extension
from .._sync import check_on_device, host_to_device, reads_for_free
from . import _triton

__all__ = [
    "point_sample",
    "sample_masks_at_points",
    "sample_uncertain_points",
    "logit_uncertainty",
    "uniform_points",
]


def _check_coords(point_coords: Tensor, name: str = "point_coords") -> None:
    if not isinstance(point_coords, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(point_coords).__name__}")
    if not point_coords.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor of normalised (x, y), got dtype {point_coords.dtype}")
    if point_coords.shape[-1] != 2:
        raise ValueError(f"{name} must end in a dimension of size 2 (x, y), got shape {tuple(point_coords.shape)}")


def uniform_points(
    num_sets: int,
    num_points: int,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draws points uniformly in the unit square.

    The single place where point sampling consumes randomness (the matcher and the losses call it), so a test can
    substitute a fixed point set and a run seeded like detectron2 draws the same numbers.

    Args:
        num_sets (int): number of point sets N.
        num_points (int): points per set P.
        device (torch.device, optional): device of the result; the generator's device if a generator is given.
        generator (torch.Generator, optional): source of randomness; the device's global RNG when None.

    Returns:
        Tensor[N, P, 2]: float32 (x, y) in [0, 1).
    """
    if generator is not None:
        if device is None:
            device = generator.device
        elif torch.device(device).type != generator.device.type:
            raise ValueError(
                f"generator is on {generator.device} but the points are drawn on {torch.device(device)}: pass "
                f"torch.Generator(device={torch.device(device).type!r}) (the generator follows the predictions' device)"
            )
    if generator is None:
        # Not `generator=None`: that call cannot take symbolic sizes, which breaks torch.compile with dynamic shapes
        # (the number of matched masks changes from batch to batch).
        return torch.rand(num_sets, num_points, 2, device=device)
    return torch.rand(num_sets, num_points, 2, device=device, generator=generator)


def point_sample(input: Tensor, point_coords: Tensor, **kwargs) -> Tensor:
    """Samples a feature map at normalised points (detectron2's ``point_sample``).

    A thin wrapper around :func:`torch.nn.functional.grid_sample` that takes points in [0, 1] x [0, 1] and defaults to
    ``align_corners=False``: the point (0, 0) is the top-left corner of the top-left pixel, not its centre. Points
    outside the map read zeros (``padding_mode="zeros"``).

    Args:
        input (Tensor[N, C, H, W]): feature map.
        point_coords (Tensor[N, P, 2] or Tensor[N, Hg, Wg, 2]): normalised (x, y) coordinates.
        **kwargs: passed to :func:`~torch.nn.functional.grid_sample` (``mode``, ``padding_mode``, ``align_corners``).

    Returns:
        Tensor[N, C, P] or Tensor[N, C, Hg, Wg]: the sampled features.

    Example:
        >>> import torch, mpseg
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> mpseg.point_sample(x, torch.tensor([[[0.25, 0.75]]]))  # centre of the bottom-left pixel
        tensor([[[2.]]])
    """
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"input must be a 4-D Tensor [N, C, H, W], got {_describe(input)}")
    _check_coords(point_coords)
    if point_coords.dim() not in (3, 4) or point_coords.shape[0] != input.shape[0]:
        raise ValueError(
            f"point_coords must be [N, P, 2] or [N, Hg, Wg, 2] with N = input.shape[0] = {input.shape[0]}, "
            f"got shape {tuple(point_coords.shape)}"
        )
    kwargs.setdefault("align_corners", False)
    flat = point_coords.dim() == 3
    grid = 2.0 * point_coords.to(input.dtype) - 1.0
    if flat:
        grid = grid.unsqueeze(2)
    output = F.grid_sample(input, grid, **kwargs)
    return output.squeeze(3) if flat else output


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def sample_masks_at_points(
    masks: Tensor,
    point_coords: Tensor,
    *,
    mask_index: Tensor | None = None,
    canvas_size: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Bilinearly samples (binary) masks at normalised points without converting the masks to float.

    Gives the values :func:`point_sample` would give on ``masks.to(dtype)`` (``align_corners=False``, zero padding),
    but reads only the four neighbours of every point from the original tensor, which may be ``bool``, ``uint8`` or
    floating point. Ground-truth masks are usually at input resolution (e.g. 50 masks of 512x512 = 13 M values) while
    the losses need 12544 points per mask, so this saves the float copy that dominates the official matcher's time.

    Args:
        masks (Tensor[N, H, W]): masks, bool / integer / floating point.
        point_coords (Tensor[P, 2] or Tensor[R, P, 2]): normalised (x, y); one point set shared by all masks, or one set
            per row of the result.
        mask_index (Tensor[R], optional): int64; row r of the result samples ``masks[mask_index[r]]`` at
            ``point_coords[r]`` (requires per-row points). Selects matched targets without copying them. Default: row r
            samples mask r (R = N).
        canvas_size (tuple[int, int], optional): ``(H_c, W_c)`` with ``H_c >= H`` and ``W_c >= W``: the coordinates are
            relative to this canvas and the masks occupy its top-left corner, the rest reading as zeros. This is how a
            batch of targets of different sizes is sampled as if zero-padded to a common size (Mask2Former pads target
            masks to the largest in the batch). Defaults to ``(H, W)``.
        dtype (torch.dtype): floating-point dtype of the result.

    Returns:
        Tensor[N, P] (Tensor[R, P] with ``mask_index``): sampled values in ``dtype``; NaN at a NaN or infinite
        coordinate, as :func:`point_sample` gives.

    Raises:
        ValueError: bad shapes, a canvas smaller than the masks, or a ``mask_index`` entry outside ``[0, N)``.
    """
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError(f"masks must be a 3-D Tensor [N, H, W], got {_describe(masks)}")
    _check_coords(point_coords)
    num_masks, height, width = masks.shape
    num_rows = num_masks
    if mask_index is not None:
        if not isinstance(mask_index, Tensor) or mask_index.dim() != 1 or mask_index.dtype != torch.int64:
            raise ValueError(f"mask_index must be an int64 Tensor [R], got {_describe(mask_index)}")
        if point_coords.dim() != 3:
            raise ValueError(f"mask_index needs per-row point_coords [R, P, 2], got shape {tuple(point_coords.shape)}")
        num_rows = mask_index.shape[0]
    if point_coords.dim() == 3:
        if point_coords.shape[0] != num_rows:
            raise ValueError(
                f"point_coords [R, P, 2] must have R = {num_rows} rows (masks.shape[0], or len(mask_index) if given), "
                f"got shape {tuple(point_coords.shape)}"
            )
        shared = False
    elif point_coords.dim() == 2:
        shared = True
    else:
        raise ValueError(f"point_coords must be [P, 2] or [N, P, 2], got shape {tuple(point_coords.shape)}")
    canvas_h, canvas_w = (height, width) if canvas_size is None else (int(canvas_size[0]), int(canvas_size[1]))
    if canvas_h < height or canvas_w < width:
        raise ValueError(f"canvas_size must be at least the mask size {(height, width)}, got {(canvas_h, canvas_w)}")

    num_points = point_coords.shape[-2]
    if height * width == 0 or num_rows == 0:  # nothing to read: every point is padding
        return torch.zeros(num_rows, num_points, dtype=dtype, device=masks.device)
    if mask_index is not None and not torch.compiler.is_compiling() and mask_index.numel():
        if reads_for_free(mask_index):
            low, high = int(mask_index.min()), int(mask_index.max())
            if low < 0 or high >= num_masks:
                raise ValueError(
                    f"mask_index must hold indices into the {num_masks} masks, got values in [{low}, {high}]"
                )
        else:  # no host sync for an index on a GPU: a queued device-side assertion
            check_on_device(((mask_index >= 0) & (mask_index < num_masks)).all(),
                            f"mask_index must hold indices into the {num_masks} masks")
    if mask_index is not None:
        mask_index = host_to_device(mask_index, masks.device)
    coords = point_coords.to(torch.promote_types(point_coords.dtype, torch.float32))
    kernels = _use_kernel(masks.device.type, masks, coords)
    if kernels is not None:
        values = kernels._sample_masks_at_points(masks, coords, mask_index, canvas_h, canvas_w)
        return values.to(dtype)
    return _sample_masks_at_points_torch(masks, coords, mask_index, (canvas_h, canvas_w), dtype)


def _use_kernel(device_type: str, *tensors: Tensor):
    """The op namespace of the point kernels to run (``torch.ops.mpseg`` or ``torch.ops.mpseg_triton``), or None for
    the PyTorch path: kernels available for this device, and no input needs a gradient through them."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return None  # the kernels have no backward; the PyTorch path is differentiable
    name = _kernels_for(device_type, _config.msda_backend() == "triton")
    return None if name is None else getattr(torch.ops, name)


def _kernels_for(device_type: str, triton: bool) -> str | None:
    if triton:
        why = _triton.why_not(device_type)
        if why is not None:
            raise RuntimeError(
                f"the Triton point kernels of the mask losses cannot run on {device_type} tensors: {why}"
            )
        _triton.load()
        return "mpseg_triton"
    if _extension.has_kernels(device_type):
        return "mpseg"
    if device_type in ("cpu", "cuda"):
        _extension.warn_fallback_once("the point sampling of the mask losses")
    return None


# Run once at trace time under torch.compile, its answer a constant of the graph (see mpseg._extension.has_kernels).
_kernels_for._dynamo_marked_constant = True


def _sample_masks_at_points_torch(
    masks: Tensor, coords: Tensor, mask_index: Tensor | None, canvas_size: tuple[int, int], dtype: torch.dtype
) -> Tensor:
    """The PyTorch path of :func:`sample_masks_at_points` (arguments checked; coords float32 or float64)."""
    num_masks, height, width = masks.shape
    canvas_h, canvas_w = canvas_size
    shared = coords.dim() == 2
    num_rows = num_masks if mask_index is None else mask_index.shape[0]
    num_points = coords.shape[-2]
    # grid_sample's unnormalisation for align_corners=False, written as its CPU kernel computes it, so that results
    # agree to rounding: pixel = (g + 1) * (size / 2) - 0.5 with g = 2c - 1.
    x = (2.0 * coords[..., 0] - 1.0 + 1.0) * (canvas_w / 2.0) - 0.5
    y = (2.0 * coords[..., 1] - 1.0 + 1.0) * (canvas_h / 2.0) - 0.5
    x0f = torch.floor(x)
    y0f = torch.floor(y)
    wx1 = x - x0f
    wy1 = y - y0f
    x0 = x0f.to(torch.int64)
    y0 = y0f.to(torch.int64)

    # Bilinear weights of the four neighbours; a neighbour outside the mask (padding, canvas) gets weight 0, as
    # grid_sample's zero padding gives it, and its index is clamped to some pixel inside (read, then zero-weighted).
    wx0 = (1.0 - wx1) * ((x0 >= 0) & (x0 < width))
    wx1 = wx1 * ((x0 >= -1) & (x0 < width - 1))
    wy0 = (1.0 - wy1) * ((y0 >= 0) & (y0 < height))
    wy1 = wy1 * ((y0 >= -1) & (y0 < height - 1))
    xc0 = x0.clamp(0, width - 1)
    xc1 = (x0 + 1).clamp(0, width - 1)
    row0 = y0.clamp(0, height - 1) * width
    row1 = (y0 + 1).clamp(0, height - 1) * width
    if not shared:
        # Offset of each row's mask in the flattened masks: one 1-D gather reads all rows (advanced indexing with a
        # [R, 1] row index is several times slower on the CPU). The selected masks are never copied.
        rows = mask_index if mask_index is not None else torch.arange(num_rows, device=masks.device)
        offset = (rows * (height * width)).unsqueeze(1)
        row0 = row0 + offset
        row1 = row1 + offset
    # [..., 4, P]: neighbours (y0, x0), (y0, x0 + 1), (y0 + 1, x0), (y0 + 1, x0 + 1).
    index = torch.stack([row0 + xc0, row0 + xc1, row1 + xc0, row1 + xc1], dim=-2)
    weight = torch.stack([wx0 * wy0, wx1 * wy0, wx0 * wy1, wx1 * wy1], dim=-2).to(dtype)

    # One gather of 4 * P values per row from the original (e.g. bool) masks, one conversion of those to float.
    if shared:
        values = masks.reshape(num_masks, height * width).index_select(1, index.flatten())
    else:
        values = masks.reshape(-1).index_select(0, index.flatten())
    return (values.view(num_rows, 4, num_points).to(dtype) * weight).sum(-2)


def logit_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of mask logits: ``-|logit|``, highest at the decision boundary (Mask2Former's choice)."""
    return -logits.abs()


def sample_uncertain_points(
    logits: Tensor,
    num_points: int,
    *,
    oversample_ratio: float = 3.0,
    importance_sample_ratio: float = 0.75,
    uncertainty_func: Callable[[Tensor], Tensor] = logit_uncertainty,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend's importance sampling of points where mask logits are uncertain.

    Draws ``int(num_points * oversample_ratio)`` uniform points per mask, keeps the ``int(importance_sample_ratio *
    num_points)`` with the highest uncertainty, and fills the remaining ones with fresh uniform points. The draws are
    made in detectron2's order (oversampled points, then the random fill), so seeding like the official code gives the
    same points. Call it under ``torch.no_grad()``; the selection is not differentiable.

    Args:
        logits (Tensor[N, 1, H, W]): class-agnostic mask logits.
        num_points (int): points per mask P.
        oversample_ratio (float): >= 1.
        importance_sample_ratio (float): share of the points chosen by uncertainty, in [0, 1].
        uncertainty_func (callable): maps sampled logits [N, 1, P'] to uncertainties of the same shape (higher = more
            uncertain); defaults to :func:`logit_uncertainty`.
        generator (torch.Generator, optional): source of randomness.

    Returns:
        Tensor[N, P, 2]: normalised (x, y) points: the uncertain ones first (in candidate order with the compiled
        kernel, in ``torch.topk``'s order otherwise), then the random fill.
    """
    if not isinstance(logits, Tensor) or logits.dim() != 4 or logits.shape[1] != 1:
        raise ValueError(f"logits must be a Tensor [N, 1, H, W], got {_describe(logits)}")
    if num_points < 0:
        raise ValueError(f"num_points must be >= 0, got {num_points}")
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    coords = uniform_points(num_masks, num_sampled, device=logits.device, generator=generator)
    # The selection has no gradient in either path: logits may need one.
    kernels = None
    if uncertainty_func is logit_uncertainty and logits.dtype in (torch.float32, torch.float64):
        kernels = _use_kernel(logits.device.type)
    if kernels is not None:
        # The compiled selection: same candidates, same kept set (up to ties), in candidate order, in O(P') per mask.
        coords = kernels._select_uncertain_points(logits[:, 0], coords, num_uncertain)
    else:
        coords = _select_uncertain_points_torch(logits, coords, num_uncertain, uncertainty_func)
    if num_random > 0:
        extra = uniform_points(num_masks, num_random, device=logits.device, generator=generator)
        coords = torch.cat([coords, extra], dim=1)
    return coords


def _select_uncertain_points_torch(
    logits: Tensor, coords: Tensor, num_uncertain: int, uncertainty_func: Callable[[Tensor], Tensor]
) -> Tensor:
    """The PyTorch path of the selection in :func:`sample_uncertain_points`: coords[n] of the ``num_uncertain`` most
    uncertain candidates of mask n, Tensor[N, num_uncertain, 2] (in topk's order)."""
    num_masks, num_sampled = coords.shape[:2]
    uncertainty = uncertainty_func(point_sample(logits, coords))  # [N, 1, P']
    # The kept points are a set (the losses average over them): sorted=False selects the same set at half the cost.
    index = torch.topk(uncertainty[:, 0, :], k=num_uncertain, dim=1, sorted=False).indices
    # coords[n, index[n, i]] as one 1-D gather over the flattened rows (faster than gather with an expanded index).
    rows = torch.arange(num_masks, device=index.device).unsqueeze(1) * num_sampled
    return coords.reshape(-1, 2).index_select(0, (index + rows).flatten()).view(num_masks, num_uncertain, 2)


# Registrations of the compiled ops (run by mpseg._extension.load() right after the library is loaded). Neither op is
# differentiable: the wrappers above call them only where no input needs a gradient, and their outputs are marked
# non-differentiable, so a direct call never carries a gradient it did not compute.


def _fake_sample_masks(masks, coords, mask_index, canvas_h, canvas_w):
    rows = masks.shape[0] if mask_index is None else mask_index.shape[0]
    return coords.new_empty((rows, coords.shape[-2]))


def _fake_select(logits, coords, k):
    return coords.new_empty((coords.shape[0], k, 2))


def _non_differentiable(ctx, inputs, output):
    ctx.mark_non_differentiable(output)


def _no_backward(ctx, grad):
    raise RuntimeError("mpseg's point-sampling kernels have no backward (their outputs are non-differentiable)")


def _register_kernels() -> None:
    """Registers the fake-tensor and autograd rules of the private point ops (called once, by
    :func:`mpseg._extension.load`)."""
    torch.library.register_fake("mpseg::_sample_masks_at_points")(_fake_sample_masks)
    torch.library.register_fake("mpseg::_select_uncertain_points")(_fake_select)
    for name in ("mpseg::_sample_masks_at_points", "mpseg::_select_uncertain_points"):
        torch.library.register_autograd(name, _no_backward, setup_context=_non_differentiable)
