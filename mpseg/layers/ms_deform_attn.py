# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Multi-scale deformable attention module (Deformable DETR, Zhu et al., ICLR 2021, Sec. 4.1).

Each query predicts, per head, level and point, an offset around its reference point and an attention weight; the
output is the weighted sum of the bilinearly sampled values (:func:`mpseg.ms_deform_attn`). Parameter names and
initialisation are Deformable DETR's, so its and Mask2Former's checkpoints load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops import ms_deform_attn

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: channels ``C`` of queries, values and output.
        n_levels: feature levels ``L``.
        n_heads: attention heads ``M``; ``d_model`` must be divisible by it.
        n_points: sampling points ``P`` per head and level.

    Example:
        >>> import torch, mpseg
        >>> attn = mpseg.MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2)
        >>> shapes = torch.tensor([[8, 8], [4, 4]])
        >>> starts = torch.tensor([0, 64])
        >>> memory = torch.randn(1, 80, 64)
        >>> query, reference = torch.randn(1, 5, 64), torch.rand(1, 5, 2, 2)
        >>> attn(query, reference, memory, shapes, starts).shape
        torch.Size([1, 5, 64])
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        for name, number in (("d_model", d_model), ("n_levels", n_levels), ("n_heads", n_heads),
                             ("n_points", n_points)):
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise ValueError(f"MSDeformAttn: {name} must be a positive int, got {number!r}")
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model must be divisible by n_heads, got d_model={d_model}, "
                             f"n_heads={n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation.

        Offsets start as a fixed pattern, not zero: head ``m`` looks along direction ``2*pi*m/M`` (scaled so the larger
        coordinate is 1), point ``p`` at distance ``p + 1`` pixels, on every level. Attention starts uniform (zero
        weights and bias); the value and output projections are Xavier-uniform with zero bias.
        """
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        distances = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        # [M, L, P, 2]: the same pattern on every level
        grid = directions[:, None, None, :] * distances[None, None, :, None]
        grid = grid.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: Tensor,
        input_level_start_index: Tensor,
        input_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from each query to ``n_points`` learned locations per head and level.

        Args:
            query (Tensor[B, Q, C]): queries (with their positional embedding added, as in Deformable DETR).
            reference_points (Tensor[B, Q, L, 2] or Tensor[B, Q, L, 4]): normalised ``(x, y)`` points in ``[0, 1]``
                (offsets are then in pixels of each level), or boxes ``(cx, cy, w, h)`` (offsets are then relative
                to the box size: ``offset / P * (w, h) / 2``).
            input_flatten (Tensor[B, S, C]): features of all levels, flattened level after level.
            input_spatial_shapes (Tensor[L, 2], int64): ``(H_l, W_l)`` of each level.
            input_level_start_index (Tensor[L], int64): first row of each level in ``S``.
            input_padding_mask (Tensor[B, S], bool, optional): ``True`` at padded positions, which then contribute
                nothing.

        Returns:
            Tensor[B, Q, C]
        """
        batch, num_queries, channels = query.shape
        if channels != self.d_model:
            raise ValueError(f"MSDeformAttn: query must be [B, Q, {self.d_model}], got {tuple(query.shape)}")
        if input_flatten.dim() != 3 or input_flatten.shape[0] != batch or input_flatten.shape[2] != self.d_model:
            raise ValueError(f"MSDeformAttn: input_flatten must be [B={batch}, S, {self.d_model}], got "
                             f"{tuple(input_flatten.shape)}")
        if (reference_points.dim() != 4 or reference_points.shape[:3] != (batch, num_queries, self.n_levels)
                or reference_points.shape[-1] not in (2, 4)):
            raise ValueError(f"MSDeformAttn: reference_points must be [B={batch}, Q={num_queries}, "
                             f"L={self.n_levels}, 2 or 4], got {tuple(reference_points.shape)}")
        if input_spatial_shapes.shape != (self.n_levels, 2):
            raise ValueError(f"MSDeformAttn: input_spatial_shapes must be [L={self.n_levels}, 2], got "
                             f"{tuple(input_spatial_shapes.shape)}")
        num_values = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            if input_padding_mask.shape != (batch, num_values) or input_padding_mask.dtype != torch.bool:
                raise ValueError(f"MSDeformAttn: input_padding_mask must be bool [B={batch}, S={num_values}], got "
                                 f"{input_padding_mask.dtype} {tuple(input_padding_mask.shape)}")
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(batch, num_values, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(
            batch, num_queries, self.n_heads, self.n_levels, self.n_points, 2
        )
        weights = self.attention_weights(query).view(batch, num_queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(batch, num_queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            size = input_spatial_shapes.flip(-1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / size[None, None, None, :, None, :]
        else:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        output = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, locations, weights)
        return self.output_proj(output)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"
