# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former's pixel decoder: a deformable-attention Transformer encoder over the coarsest backbone maps, then an
FPN-style top-down path to the mask-feature resolution (Mask2Former, Sec. 3.2 and 4.1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import level_metadata
from .ms_deform_attn import MSDeformAttn
from .position_encoding import PositionEmbeddingSine

__all__ = ["MSDeformAttnPixelDecoder"]


def _c2_xavier_fill(module: nn.Conv2d) -> None:
    # Caffe2's "XavierFill" as detectron2 applies it to Mask2Former's FPN convs: uniform kaiming with a=1, zero bias.
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class _ConvNorm(nn.Conv2d):
    """A convolution followed by an optional norm and ReLU, with detectron2 ``Conv2d``'s state-dict layout
    (``weight``, ``bias``, ``norm.*``) so official checkpoints load."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, norm: str | None, relu: bool) -> None:
        use_norm = bool(norm)
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not use_norm)
        self.norm = nn.GroupNorm(32, out_channels) if use_norm else None
        self.relu = relu
        _c2_xavier_fill(self)

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x, inplace=True) if self.relu else x


class _EncoderLayer(nn.Module):
    """Post-norm Deformable DETR encoder layer: deformable self-attention over all levels, then a ReLU FFN."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(
        self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, level_start_index: Tensor
    ) -> Tensor:
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index)
        src = self.norm1(src + self.dropout1(attended))
        # In-place ReLU: neither the linear layer nor the ReLU needs the pre-activation for backward.
        hidden = self.linear2(self.dropout2(F.relu(self.linear1(src), inplace=True)))
        return self.norm2(src + self.dropout3(hidden))


class _EncoderStack(nn.Module):
    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)


class _DeformableEncoder(nn.Module):
    """Holds ``level_embed`` and ``encoder.layers`` under the official names (``transformer.*``)."""

    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, num_layers: int) -> None:
        super().__init__()
        self.encoder = _EncoderStack(
            [_EncoderLayer(d_model, d_ffn, dropout, n_levels, n_heads, 4) for _ in range(num_layers)]
        )
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        shapes = [(int(s.shape[-2]), int(s.shape[-1])) for s in srcs]
        device = srcs[0].device
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1) for lvl, p in enumerate(pos_embeds)],
            1,
        )
        # Cached per shape and checked on the host: no host sync per forward (see mpseg.level_metadata).
        spatial_shapes, level_start_index = level_metadata(shapes, device)
        # Every pixel is valid (no padding mask, as in Mask2Former), so each level's reference point is the pixel
        # centre normalised by the map size; Deformable DETR's valid-ratio scaling is a multiplication by 1.
        centres = []
        for height, width in shapes:
            ref_y = (torch.arange(height, dtype=torch.float32, device=device) + 0.5) / height
            ref_x = (torch.arange(width, dtype=torch.float32, device=device) + 0.5) / width
            grid_y, grid_x = torch.meshgrid(ref_y, ref_x, indexing="ij")
            centres.append(torch.stack((grid_x.reshape(-1), grid_y.reshape(-1)), -1))
        batch = src.shape[0]
        reference_points = torch.cat(centres, 0).to(src.dtype)[None, :, None, :]
        reference_points = reference_points.expand(batch, -1, len(shapes), -1)
        output = src
        for layer in self.encoder.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index)
        return output, shapes


class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder of Mask2Former.

    The ``transformer_in_features`` coarsest backbone maps are projected to ``conv_dim`` channels (1x1 conv +
    GroupNorm), refined jointly by ``transformer_enc_layers`` deformable encoder layers, and the finest encoder output
    is merged top-down with the finer backbone maps (lateral 1x1 conv + bilinear upsampling + 3x3 conv) until stride
    ``common_stride``, where a 1x1 conv gives the per-pixel mask features.

    State-dict keys and shapes equal the official module's (``sem_seg_head.pixel_decoder.*`` without the prefix).

    Precision: like the official module, ``forward`` disables autocast and computes in float32 (inputs are cast), so
    the outputs are float32 under autocast too. Reason: sampling locations are ``reference + offset / W``; in bfloat16
    a location near 1 is off by up to 2^-8, i.e. a quarter pixel on a 64-wide map, which makes the encoder's
    interpolation noticeably wrong; the encoder is a small part of the model's cost.

    Args:
        in_channels (Sequence[int]): channels of the backbone maps, finest first (e.g. strides 4, 8, 16, 32).
        strides (Sequence[int]): their strides, increasing.
        conv_dim (int): channels of the encoder and FPN (divisible by 32 with ``norm="GN"``).
        mask_dim (int): channels of the mask features.
        norm (str | None): ``"GN"`` (GroupNorm with 32 groups, the official choice) or ``""``/None (no norm; the FPN
            convs then have a bias).
        transformer_dropout (float): dropout in the encoder layers.
        transformer_nheads (int): heads of the deformable attention.
        transformer_dim_feedforward (int): hidden width of the encoder FFN.
        transformer_enc_layers (int): number of encoder layers.
        transformer_in_features (int): how many of the coarsest maps go through the encoder.
        common_stride (int): stride of the mask features.

    Example:
        >>> pd = MSDeformAttnPixelDecoder([32, 64, 128, 256], [4, 8, 16, 32], conv_dim=64, mask_dim=64,
        ...                               transformer_enc_layers=1)
        >>> feats = [torch.randn(1, c, 64 // s, 64 // s) for c, s in zip([32, 64, 128, 256], [4, 8, 16, 32])]
        >>> mask_features, multi_scale = pd(feats)
        >>> mask_features.shape, [tuple(f.shape[-2:]) for f in multi_scale]
        (torch.Size([1, 64, 16, 16]), [(2, 2), (4, 4), (8, 8)])
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        *,
        conv_dim: int = 256,
        mask_dim: int = 256,
        norm: str | None = "GN",
        transformer_dropout: float = 0.0,
        transformer_nheads: int = 8,
        transformer_dim_feedforward: int = 1024,
        transformer_enc_layers: int = 6,
        transformer_in_features: int = 3,
        common_stride: int = 4,
    ) -> None:
        super().__init__()
        in_channels = [int(c) for c in in_channels]
        strides = [int(s) for s in strides]
        if len(in_channels) == 0 or len(in_channels) != len(strides):
            raise ValueError(
                f"in_channels and strides must be non-empty and of equal length, got {len(in_channels)} channel "
                f"counts and {len(strides)} strides"
            )
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"strides must be increasing (finest map first), got {strides}")
        if not 1 <= transformer_in_features <= len(in_channels):
            raise ValueError(
                f"transformer_in_features must be between 1 and the number of maps ({len(in_channels)}), "
                f"got {transformer_in_features}"
            )
        if norm not in ("GN", "", None):
            raise ValueError(f"norm must be 'GN', '' or None, got {norm!r}")
        if norm == "GN" and conv_dim % 32:
            raise ValueError(f"norm='GN' uses 32 groups, so conv_dim must be divisible by 32, got {conv_dim}")
        if conv_dim % transformer_nheads:
            raise ValueError(
                f"conv_dim must be divisible by transformer_nheads, got {conv_dim} and {transformer_nheads}"
            )
        num_levels = transformer_in_features
        encoder_stride = strides[-num_levels]
        ratio = encoder_stride // common_stride if common_stride > 0 else 0
        if common_stride <= 0 or encoder_stride % common_stride or ratio & (ratio - 1):
            raise ValueError(
                f"common_stride must divide the finest encoder stride ({encoder_stride}) by a power of two, "
                f"got {common_stride}"
            )
        num_fpn_levels = int(math.log2(encoder_stride // common_stride))
        if num_fpn_levels > len(in_channels) - num_levels:
            raise ValueError(
                f"common_stride={common_stride} needs {num_fpn_levels} map(s) finer than the encoder's (stride "
                f"{encoder_stride}), got {len(in_channels) - num_levels}; pass finer maps or a larger common_stride"
            )
        self.in_channels = in_channels
        self.strides = strides
        self.conv_dim = conv_dim
        self.mask_dim = mask_dim
        self.transformer_num_feature_levels = num_levels
        self.num_fpn_levels = num_fpn_levels
        self.common_stride = common_stride
        # Mask2Former's decoder always takes 3 scales.
        self.maskformer_num_feature_levels = 3

        # Coarsest map first (res5 -> res3), as the official module orders its projections.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for c in in_channels[-num_levels:][::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = _DeformableEncoder(
            conv_dim, transformer_dim_feedforward, transformer_dropout, num_levels, transformer_nheads,
            transformer_enc_layers,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, kernel_size=1)
        _c2_xavier_fill(self.mask_features)
        # adapter_k / layer_k act on the k-th finest map (official names; adapter_1 is the stride-4 lateral conv).
        for idx in range(num_fpn_levels):
            self.add_module(f"adapter_{idx + 1}", _ConvNorm(in_channels[idx], conv_dim, 1, norm=norm, relu=False))
            self.add_module(f"layer_{idx + 1}", _ConvNorm(conv_dim, conv_dim, 3, norm=norm, relu=True))

    def _check_features(self, features: Sequence[Tensor]) -> None:
        if not isinstance(features, (list, tuple)) or len(features) != len(self.in_channels):
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"features must be a list of {len(self.in_channels)} maps (finest first), got {got}")
        for i, (f, c) in enumerate(zip(features, self.in_channels)):
            if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[1] != c:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"features[{i}] must have shape [B, {c}, H, W], got {shape}")
            if f.shape[0] != features[0].shape[0]:
                raise ValueError(f"features must share the batch size, got {[g.shape[0] for g in features]}")
            if not f.is_floating_point():
                raise TypeError(f"features[{i}] must be a floating tensor, got dtype {f.dtype}")

    def forward(self, features: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Run the encoder and the top-down path.

        Args:
            features (Sequence[Tensor[B, C_i, H_i, W_i]]): backbone maps, finest first, with ``in_channels[i]``
                channels.

        Returns:
            tuple: ``mask_features`` (Tensor[B, mask_dim, H_0', W_0']) at stride ``common_stride`` and
            ``multi_scale_features``, a list of 3 Tensor[B, conv_dim, h, w], coarsest first (the encoder outputs,
            then FPN outputs if the encoder has fewer than 3 levels). All float32.
        """
        self._check_features(features)
        # Mask2Former runs this module in float32 even under mixed precision; see the class docstring.
        # float64 modules (e.g. for gradcheck) keep float64; everything else computes in float32.
        dtype = torch.float64 if self.mask_features.weight.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            features = [f.to(dtype) for f in features]
            num_levels = self.transformer_num_feature_levels
            srcs, pos = [], []
            for idx, x in enumerate(features[-num_levels:][::-1]):
                srcs.append(self.input_proj[idx](x))
                pos.append(self.pe_layer(x))
            memory, shapes = self.transformer(srcs, pos)
            batch = memory.shape[0]
            out = [
                level.transpose(1, 2).reshape(batch, -1, h, w)
                for level, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes)
            ]
            for idx in reversed(range(self.num_fpn_levels)):
                lateral = getattr(self, f"adapter_{idx + 1}")(features[idx])
                # Bilinear, not FPN's nearest: what the official module does.
                merged = lateral + F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
                out.append(getattr(self, f"layer_{idx + 1}")(merged))
            return self.mask_features(out[-1]), out[: self.maskformer_num_feature_levels]
