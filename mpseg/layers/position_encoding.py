# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Sine positional encoding of 2-D feature maps (DETR, as used by Mask2Former's pixel decoder and decoder)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Fixed sine/cosine encoding of the (y, x) position of every pixel of a feature map.

    Channel ``2k`` of each half holds ``sin(p / T^(2k / F))`` and channel ``2k + 1`` holds ``cos(p / T^(2k / F))``,
    with ``p`` the 1-based row (first half) or column (second half) index, ``T`` the temperature and ``F`` =
    ``num_pos_feats``. With ``normalize=True`` the index is divided by the row/column length and multiplied by
    ``scale`` (``2 * pi``), so the encoding does not depend on the map size. Values equal Mask2Former's
    ``PositionEmbeddingSine``; they are computed in float32 whatever the input dtype (positions up to a few hundred
    divided by ``T^(2k/F)`` lose their low bits in half precision) and returned in the input's floating dtype.

    Args:
        num_pos_feats (int): channels per axis; the output has ``2 * num_pos_feats`` channels.
        temperature (float): base ``T`` of the geometric progression of wavelengths.
        normalize (bool): divide positions by the map size and multiply by ``scale``.
        scale (float | None): multiplier for normalised positions; default ``2 * pi``. Requires ``normalize=True``.

    Example:
        >>> pe = PositionEmbeddingSine(num_pos_feats=128)
        >>> pe(torch.zeros(2, 256, 16, 24)).shape
        torch.Size([2, 256, 16, 24])
    """

    def __init__(
        self,
        num_pos_feats: int = 128,
        temperature: float = 10000,
        normalize: bool = True,
        scale: float | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_pos_feats, int) or num_pos_feats <= 0 or num_pos_feats % 2:
            # sin and cos fill alternate channels, so the count per axis must be even.
            raise ValueError(f"num_pos_feats must be a positive even int, got {num_pos_feats!r}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        if scale is not None and not normalize:
            raise ValueError("scale is only used with normalize=True; got normalize=False and scale set")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else float(scale)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, normalize={self.normalize}, "
            f"scale={self.scale:.6g}"
        )

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encode the positions of ``x``'s pixels.

        Args:
            x (Tensor[B, ..., H, W]): a feature map; only its batch size, spatial size, device and dtype are used.
            mask (Tensor[B, H, W], bool, optional): True at padding pixels, which are not counted (DETR's convention);
                None means no padding.

        Returns:
            Tensor[B, 2 * num_pos_feats, H, W]: the y encoding in the first half of the channels, x in the second.
        """
        if x.dim() < 3:
            raise ValueError(f"x must have shape [B, *, H, W], got shape {tuple(x.shape)}")
        batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
        device = x.device
        if mask is None:
            # Without padding the cumulative sums are plain ranges; building them directly avoids a [B, H, W] cumsum.
            y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device).view(1, height, 1)
            x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device).view(1, 1, width)
            y_embed = y_embed.expand(batch, height, width)
            x_embed = x_embed.expand(batch, height, width)
        else:
            if mask.shape != (batch, height, width):
                raise ValueError(
                    f"mask must have shape [B, H, W] = {(batch, height, width)}, got {tuple(mask.shape)}"
                )
            if mask.dtype != torch.bool:
                raise TypeError(f"mask must be a bool tensor (True = padding), got dtype {mask.dtype}")
            not_mask = ~mask.to(device)
            y_embed = not_mask.cumsum(1, dtype=torch.float32)
            x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            # The epsilon keeps a fully padded row or column at 0 instead of 0/0.
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[..., None] / dim_t
        pos_y = y_embed[..., None] / dim_t
        # Interleave sin (even channels) and cos (odd channels), as DETR does.
        pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return pos.to(dtype)
