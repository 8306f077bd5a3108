# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Pure-PyTorch multi-scale deformable attention: the fallback backend and the test oracle for the kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ms_deform_attn_reference"]


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with ``grid_sample`` (bilinear, ``align_corners=False``, zero padding).

    Args:
        value (Tensor[B, S, M, D]): per-head values of all levels, flattened level after level.
        spatial_shapes (Tensor[L, 2], int64): ``(H_l, W_l)`` of each level.
        level_start_index (Tensor[L], int64): offset of each level in ``S`` (unused here; kept for the same signature).
        sampling_locations (Tensor[B, Q, M, L, P, 2]): normalised ``(x, y)``; outside ``[0, 1]`` contributes zero.
        attention_weights (Tensor[B, Q, M, L, P]): weight of each sample.

    Returns:
        Tensor[B, Q, M * D]: the weighted sum of the samples, heads concatenated.
    """
    del level_start_index  # the split sizes carry the same information
    batch, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    # Non-finite or far-away locations would make grid_sample index with overflowing integers; any location beyond
    # [-1, 2] samples nothing anyway, so clamping there changes no value and no gradient inside the maps.
    locations = sampling_locations.nan_to_num(nan=-1.0, posinf=2.0, neginf=-1.0).clamp(-1.0, 2.0)
    grids = 2.0 * locations - 1.0
    samples = []
    for level, value_l in enumerate(value.split(sizes, dim=1)):
        height, width = (int(s) for s in spatial_shapes[level].tolist())
        # [B, H*W, M, D] -> [B*M, D, H, W]
        value_l = value_l.flatten(2).transpose(1, 2).reshape(batch * heads, channels, height, width)
        # [B, Q, M, P, 2] -> [B*M, Q, P, 2]
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B*M, D, Q, L*P] weighted by [B*M, 1, Q, L*P]
    stacked = torch.stack(samples, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    output = (stacked * weights).sum(-1).view(batch, heads * channels, queries)
    return output.transpose(1, 2).contiguous()
