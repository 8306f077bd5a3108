# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The export path of multi-scale deformable attention: a decomposition of ``torch.ops.mpseg.ms_deform_attn`` into
plain ATen ops, for exported programs that must run without mpseg (ONNX, other runtimes, ``torch.export.load`` in a
process without the extension).

Why not decompose to :func:`~mpseg.ms_deform_attn_reference`: it splits ``value`` into per-level ``[H_l, W_l]`` maps for
``grid_sample``, so it needs the level sizes as Python ints. In an exported program ``spatial_shapes`` is a lifted
tensor constant, and when :meth:`torch.export.ExportedProgram.run_decompositions` retraces the graph it is a fake
tensor whose values are unknown: ``.tolist()`` fails there with a data-dependent-shape error. The decomposition below
reads the level metadata as data instead: it computes the four bilinear corners of every sample, their flat row in
``value`` (``level_start_index[l] + y * W_l + x``) and gathers those rows. Nothing in it depends on tensor values at
trace time, so it traces once for any level sizes and any batch size, and it lowers to ONNX Gather and elementwise
ops (no GridSample), which every ONNX runtime supports.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ms_deform_attn_decomposed", "msda_decomposition_table"]


def ms_deform_attn_decomposed(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention from gathers and elementwise ops only (traceable without level sizes).

    Same function as :func:`mpseg.ms_deform_attn`: bilinear sampling with ``grid_sample(align_corners=False,
    padding_mode="zeros")`` semantics (location ``(x, y)`` maps to pixel ``(x * W_l - 0.5, y * H_l - 0.5)``; corners
    outside the map contribute zero; NaN and infinite locations contribute zero), weighted by ``attention_weights``
    and summed over levels and points. Computed in ``value``'s dtype. Inputs are not checked (this runs inside a
    graph; :func:`mpseg.ms_deform_attn` checked them when the graph was traced).

    Args:
        value (Tensor[B, S, M, D]): per-head values of all levels, flattened level after level.
        spatial_shapes (Tensor[L, 2], int64): ``(H_l, W_l)`` of each level.
        level_start_index (Tensor[L], int64): first row of each level in ``S``.
        sampling_locations (Tensor[B, Q, M, L, P, 2]): normalised ``(x, y)``.
        attention_weights (Tensor[B, Q, M, L, P]): weight of each sample.

    Returns:
        Tensor[B, Q, M * D]: heads concatenated.

    Example:
        >>> import torch, mpseg
        >>> from mpseg.ops._export import ms_deform_attn_decomposed
        >>> shapes, starts = torch.tensor([[8, 8], [4, 4]]), torch.tensor([0, 64])
        >>> value = torch.randn(2, 80, 4, 8)
        >>> locations, weights = torch.rand(2, 10, 4, 2, 3, 2), torch.rand(2, 10, 4, 2, 3)
        >>> expected = mpseg.ms_deform_attn_reference(value, shapes, starts, locations, weights)
        >>> torch.allclose(ms_deform_attn_decomposed(value, shapes, starts, locations, weights), expected, atol=1e-5)
        True
    """
    batch, rows, heads, channels = value.shape
    queries = sampling_locations.shape[1]
    dtype = value.dtype
    # [L] -> broadcastable to the [B, Q, M, L, P] sample grid
    height = spatial_shapes[:, 0].to(dtype).view(1, 1, 1, -1, 1)
    width = spatial_shapes[:, 1].to(dtype).view(1, 1, 1, -1, 1)
    start = level_start_index.view(1, 1, 1, -1, 1)
    height_i = spatial_shapes[:, 0].view(1, 1, 1, -1, 1)
    width_i = spatial_shapes[:, 1].view(1, 1, 1, -1, 1)
    # The reference's clamp, for the same reason: beyond [-1, 2] nothing is sampled, and NaN/inf would turn into
    # garbage integer indices after floor(). Inside the maps it changes nothing.
    locations = sampling_locations.nan_to_num(nan=-1.0, posinf=2.0, neginf=-1.0).clamp(-1.0, 2.0)
    x = locations[..., 0] * width - 0.5
    y = locations[..., 1] * height - 0.5
    x0 = x.floor()
    y0 = y.floor()
    fx = x - x0
    fy = y - y0
    x0i = x0.long()
    y0i = y0.long()
    # Row offset of head m of image b in value viewed as [B * M * S, D] (value permuted to [B, M, S, D]).
    base = (torch.arange(batch, device=value.device).view(-1, 1, 1, 1, 1) * heads
            + torch.arange(heads, device=value.device).view(1, 1, -1, 1, 1)) * rows
    table = value.permute(0, 2, 1, 3).reshape(-1, channels)
    output = None
    for dy in (0, 1):
        yi = y0i + dy
        wy = fy if dy else 1.0 - fy
        for dx in (0, 1):
            xi = x0i + dx
            wx = fx if dx else 1.0 - fx
            inside = (xi >= 0) & (xi < width_i) & (yi >= 0) & (yi < height_i)
            # Outside corners read row 0 of their own map (any valid row) and are weighted by zero.
            flat = torch.where(inside, start + yi * width_i + xi, torch.zeros_like(xi)) + base
            corner_weight = torch.where(inside, wx * wy, torch.zeros_like(wx)) * attention_weights
            # One corner at a time keeps the peak memory at one [B, Q, M, L, P, D] block of gathered rows.
            samples = table.index_select(0, flat.reshape(-1)).view(*flat.shape, channels)
            term = (samples * corner_weight.unsqueeze(-1)).sum(dim=(3, 4))
            output = term if output is None else output + term
    return output.reshape(batch, queries, heads * channels)


def msda_decomposition_table() -> dict[Callable, Callable]:
    """Decomposition entries that replace ``torch.ops.mpseg.ms_deform_attn`` by :func:`ms_deform_attn_decomposed`.

    Merge into a decomposition table for :meth:`torch.export.ExportedProgram.run_decompositions`. Empty when the
    compiled ops are not loaded: then no exported graph can hold the custom op (:func:`mpseg.ms_deform_attn` traced
    the pure-PyTorch reference instead).

    Returns:
        dict: ``{torch.ops.mpseg.ms_deform_attn.default: ms_deform_attn_decomposed}`` or ``{}``.

    Example:
        >>> import torch
        >>> from mpseg.ops._export import msda_decomposition_table
        >>> table = torch.export.default_decompositions()
        >>> table.update(msda_decomposition_table())  # then exported_program.run_decompositions(table)
    """
    from .. import _extension

    if not _extension.load().loaded:
        return {}
    return {torch.ops.mpseg.ms_deform_attn.default: ms_deform_attn_decomposed}
