# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former's masked-attention Transformer decoder (Mask2Former, Sec. 3.2), with MP-Former's pilot queries.

Each layer lets every query attend only to the pixels where the mask predicted by the previous layer is foreground
(masked cross-attention), then to the other queries (self-attention), then an FFN; layer ``i`` reads feature level
``i mod num_feature_levels`` and every layer's output is decoded into class logits and mask logits by shared heads.

With a :class:`~mpseg.MaskPilot` (MP-Former, training only) the pilot queries run in front of the matching queries:
their cross-attention masks are the noised ground-truth masks, matching queries never see them in self-attention, and
their predictions are returned apart in ``pilot_outputs``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingSine

if TYPE_CHECKING:  # only for annotations: the decoder needs nothing but the interface
    from .mask_pilot import MaskPilot

__all__ = ["MaskedAttentionDecoder"]


class _MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``), batch-first, computed with ``F.scaled_dot_product_attention``.

    The mask is a bool tensor broadcastable to ``[B, heads, N, S]`` (True = may attend), so one mask serves all heads
    without the ``[B * heads, N, S]`` copy that ``nn.MultiheadAttention`` wants.
    """

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, x: Tensor) -> Tensor:
        # [B, N, C] -> [B, heads, N, C / heads]
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        dim = self.embed_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key:
            # Self-attention feeds the same tensor as query and key: one matmul for both projections.
            q, k = F.linear(query, weight[: 2 * dim], bias[: 2 * dim]).chunk(2, dim=-1)
        else:
            q = F.linear(query, weight[:dim], bias[:dim])
            k = F.linear(key, weight[dim : 2 * dim], bias[dim : 2 * dim])
        v = F.linear(value, weight[2 * dim :], bias[2 * dim :])
        out = F.scaled_dot_product_attention(self._heads(q), self._heads(k), self._heads(v), attn_mask=attn_mask)
        return self.out_proj(out.transpose(1, 2).flatten(2))


def _xavier_matrices(module: nn.Module) -> None:
    # Mask2Former's attention/FFN layers re-initialise every matrix with Xavier-uniform (biases keep their init).
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class _SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__()
        self.self_attn = _MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: Tensor, attn_mask: Tensor | None, query_pos: Tensor | None) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        qk = x if query_pos is None else x + query_pos
        tgt = tgt + self.self_attn(qk, qk, x, attn_mask)
        return tgt if self.pre_norm else self.norm(tgt)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, pre_norm: bool) -> None:
        super().__init__()
        self.multihead_attn = _MultiheadAttention(d_model, nhead)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(
        self, tgt: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor, query_pos: Tensor | None
    ) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        query = x if query_pos is None else x + query_pos
        tgt = tgt + self.multihead_attn(query, memory + memory_pos, memory, attn_mask)
        return tgt if self.pre_norm else self.norm(tgt)


class _FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, pre_norm: bool) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.pre_norm = pre_norm
        _xavier_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.pre_norm else tgt
        tgt = tgt + self.linear2(F.relu(self.linear1(x), inplace=True))
        return tgt if self.pre_norm else self.norm(tgt)


class _MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.{i}``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x, inplace=True)
        return x


def _unblock_empty_rows(allowed: Tensor) -> Tensor:
    # Mask2Former's rule: a query whose mask is empty attends everywhere instead of nowhere (softmax over nothing
    # is NaN). An OR with the per-row "nothing allowed" flag does it without data-dependent indexing.
    return allowed | ~allowed.any(dim=-1, keepdim=True)


class MaskedAttentionDecoder(nn.Module):
    """Mask2Former's multi-scale masked-attention decoder, optionally piloted (MP-Former).

    State-dict keys and shapes equal the official ``MultiScaleMaskedTransformerDecoder``'s
    (``sem_seg_head.predictor.*`` without the prefix); with ``query_pos=False`` they equal MP-Former's, which has no
    ``query_embed``. Without a pilot the computation is Mask2Former's; the one deliberate difference is that a pixel
    is blocked when its interpolated mask logit is ``< 0`` rather than when ``sigmoid(logit) < 0.5`` (identical except
    for logits within ~3e-8 of zero, where float32 sigmoid rounds to exactly 0.5).

    Args:
        in_channels (int): channels of each multi-scale feature map.
        num_classes (int): K, classes without the no-object class; the class head outputs K + 1 logits.
        hidden_dim (int): channels C of the queries.
        num_queries (int): Q, learnable (matching) queries.
        nheads (int): attention heads; must divide ``hidden_dim``.
        dim_feedforward (int): hidden width of the FFNs.
        dec_layers (int): Transformer layers; the output holds ``dec_layers + 1`` predictions.
        pre_norm (bool): LayerNorm before (True) or after (False, Mask2Former's default) each block.
        mask_dim (int): channels of the mask features.
        enforce_input_project (bool): add the 1x1 input projection even when ``in_channels == hidden_dim``.
        num_feature_levels (int): feature maps cycled through (layer ``i`` reads level ``i % num_feature_levels``).
        query_pos (bool): learn a query positional embedding (``query_embed``); False for MP-Former checkpoints.

    Example:
        >>> dec = MaskedAttentionDecoder(64, num_classes=5, hidden_dim=64, num_queries=10, dim_feedforward=128,
        ...                              dec_layers=3, mask_dim=64)
        >>> feats = [torch.randn(2, 64, s, s) for s in (4, 8, 16)]
        >>> out = dec(feats, torch.randn(2, 64, 32, 32))
        >>> out["pred_logits"].shape, out["pred_masks"].shape, len(out["aux_outputs"])
        (torch.Size([2, 10, 6]), torch.Size([2, 10, 32, 32]), 3)
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
        pre_norm: bool = False,
        mask_dim: int = 256,
        enforce_input_project: bool = False,
        num_feature_levels: int = 3,
        query_pos: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("hidden_dim", hidden_dim),
            ("num_queries", num_queries),
            ("nheads", nheads),
            ("dim_feedforward", dim_feedforward),
            ("mask_dim", mask_dim),
            ("num_feature_levels", num_feature_levels),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(dec_layers, int) or dec_layers < 0:
            raise ValueError(f"dec_layers must be a non-negative int, got {dec_layers!r}")
        if hidden_dim % nheads:
            raise ValueError(f"hidden_dim must be divisible by nheads, got hidden_dim={hidden_dim}, nheads={nheads}")
        if hidden_dim % 4:
            raise ValueError(f"hidden_dim must be divisible by 4 (sine position encoding), got {hidden_dim}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.num_queries = num_queries
        self.num_heads = nheads
        self.num_layers = dec_layers
        self.mask_dim = mask_dim
        self.num_feature_levels = num_feature_levels

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            _SelfAttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            _CrossAttentionLayer(hidden_dim, nheads, pre_norm) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            _FFNLayer(hidden_dim, dim_feedforward, pre_norm) for _ in range(dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim) if query_pos else None
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=1)
                nn.init.kaiming_uniform_(proj.weight, a=1)  # detectron2's c2_xavier_fill
                nn.init.zeros_(proj.bias)
                self.input_proj.append(proj)
            else:
                self.input_proj.append(nn.Identity())
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = _MLP(hidden_dim, hidden_dim, mask_dim, 3)

    # ------------------------------------------------------------------ helpers
    def _check_inputs(self, features: Sequence[Tensor], mask_features: Tensor) -> None:
        if not isinstance(mask_features, Tensor) or mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            shape = tuple(mask_features.shape) if isinstance(mask_features, Tensor) else type(mask_features).__name__
            raise ValueError(f"mask_features must have shape [B, {self.mask_dim}, H, W], got {shape}")
        if not isinstance(features, (list, tuple)) or len(features) != self.num_feature_levels:
            got = len(features) if isinstance(features, (list, tuple)) else type(features).__name__
            raise ValueError(f"features must be a list of {self.num_feature_levels} maps (coarsest first), got {got}")
        batch = mask_features.shape[0]
        for i, f in enumerate(features):
            if not isinstance(f, Tensor) or f.dim() != 4 or f.shape[0] != batch or f.shape[1] != self.in_channels:
                shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"features[{i}] must have shape [{batch}, {self.in_channels}, H, W], got {shape}")

    def _check_pilot(self, pilot: Any, batch: int) -> None:
        queries = pilot.pilot_queries
        if not isinstance(queries, Tensor) or queries.dim() != 3 or queries.shape[0] != batch or (
            queries.shape[2] != self.hidden_dim
        ):
            shape = tuple(queries.shape) if isinstance(queries, Tensor) else type(queries).__name__
            raise ValueError(f"pilot.pilot_queries must have shape [{batch}, Np, {self.hidden_dim}], got {shape}")

    def _predict(
        self, output: Tensor, mask_features: Tensor, target_size: tuple[int, int] | None, skip: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Class and mask logits of every row; for rows ``skip:`` also the next layer's "may attend" mask.

        Returns:
            tuple: logits (Tensor[B, N, K+1]), masks (Tensor[B, N, H, W]), allowed (Tensor[B, N - skip, h*w] bool,
            True where the mask logit at the next level's size is >= 0; None when ``target_size`` is None).
        """
        decoder_output = self.decoder_norm(output)
        logits = self.class_embed(decoder_output)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        allowed = None
        if target_size is not None:
            rows = masks[:, skip:].detach()
            # Resized as one-channel maps: the same bilinear values, but CPU's upsample kernel would otherwise copy
            # the whole [B, Q, H, W] tensor to channels-last first (10x slower here).
            resized = F.interpolate(rows.flatten(0, 1).unsqueeze(1), size=target_size, mode="bilinear",
                                    align_corners=False)
            # sigmoid(x) >= 0.5  <=>  x >= 0: Mask2Former's threshold without the sigmoid.
            allowed = resized.view(rows.shape[0], rows.shape[1], -1) >= 0
        return logits, masks, allowed

    def _pilot_cross_mask(
        self, pilot: Any, layer: int, size: tuple[int, int], allowed: Tensor, num_pilots: int
    ) -> Tensor:
        blocked = pilot.cross_attn_mask(layer, size, self.num_heads)
        batch, hw = allowed.shape[0], allowed.shape[-1]
        if (
            not isinstance(blocked, Tensor)
            or blocked.dtype != torch.bool
            or blocked.dim() != 4
            or blocked.shape[0] != batch
            or blocked.shape[1] not in (1, self.num_heads)
            or blocked.shape[2:] != (num_pilots, hw)
        ):
            shape = (tuple(blocked.shape), blocked.dtype) if isinstance(blocked, Tensor) else type(blocked).__name__
            raise ValueError(
                f"pilot.cross_attn_mask({layer}, {size}, {self.num_heads}) must be a bool tensor of shape "
                f"[{batch}, 1 or {self.num_heads}, {num_pilots}, {hw}], got {shape}"
            )
        matching = allowed.unsqueeze(1).expand(-1, blocked.shape[1], -1, -1)
        return torch.cat([~blocked.to(allowed.device), matching], dim=2)

    # ------------------------------------------------------------------ forward
    def forward(self, features: Sequence[Tensor], mask_features: Tensor, pilot: MaskPilot | None = None) -> dict:
        """Decode queries into class and mask logits.

        Args:
            features (Sequence[Tensor[B, in_channels, h_l, w_l]]): ``num_feature_levels`` maps, coarsest first (the
                pixel decoder's ``multi_scale_features``); layer ``i`` attends ``features[i % num_feature_levels]``.
            mask_features (Tensor[B, mask_dim, H, W]): per-pixel embeddings the masks are computed from.
            pilot (MaskPilot, optional): MP-Former pilot queries for this training step; None for Mask2Former.

        Returns:
            dict: ``pred_logits`` (Tensor[B, Q, K+1]), ``pred_masks`` (Tensor[B, Q, H, W]) of the last layer and
            ``aux_outputs``, a list of ``dec_layers`` dicts with the same keys for the earlier predictions (initial
            prediction first). With a pilot also ``pilot_outputs``: ``pred_logits`` (Tensor[B, Np, K+1]),
            ``pred_masks`` (Tensor[B, Np, H, W]), ``aux_outputs`` (earlier pilot predictions, initial first),
            ``target_index`` (Tensor[B, Np] int64), ``num_groups`` (int) and, if the pilot has it, ``max_objects``
            (int: its slots are group-major, slot ``g * max_objects + j`` reconstructs target ``j``), copied from the
            pilot.
        """
        self._check_inputs(features, mask_features)
        batch = mask_features.shape[0]
        levels = self.num_feature_levels

        memories, memory_pos, sizes = [], [], []
        for i in range(levels):
            x = features[i]
            sizes.append((int(x.shape[-2]), int(x.shape[-1])))
            # The encoding depends only on the map size: compute it once and broadcast over the batch.
            memory_pos.append(self.pe_layer(x[:1]).flatten(2).transpose(1, 2))
            # Made contiguous once here rather than by every layer's key/value projection.
            memory = self.input_proj[i](x) + self.level_embed.weight[i][:, None, None]
            memories.append(memory.flatten(2).transpose(1, 2).contiguous())

        output = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)
        query_pos = None if self.query_embed is None else self.query_embed.weight.unsqueeze(0)
        num_pilots = 0
        self_mask = None
        if pilot is not None:
            self._check_pilot(pilot, batch)
            num_pilots = int(pilot.pilot_queries.shape[1])
            output = torch.cat([pilot.pilot_queries.to(output.dtype), output], dim=1)
            if query_pos is not None:
                # Pilot queries carry no positional embedding (MP-Former).
                query_pos = torch.cat([query_pos.new_zeros(1, num_pilots, self.hidden_dim), query_pos], dim=1)
            total = num_pilots + self.num_queries
            blocked = pilot.self_attn_mask(self.num_queries)
            if not isinstance(blocked, Tensor) or blocked.dtype != torch.bool or blocked.shape != (total, total):
                shape = (tuple(blocked.shape), blocked.dtype) if isinstance(blocked, Tensor) else type(blocked).__name__
                raise ValueError(
                    f"pilot.self_attn_mask({self.num_queries}) must be a bool tensor of shape {(total, total)}, "
                    f"got {shape}"
                )
            # A query always sees itself, so no row can be empty (no NaN) whatever mask the pilot gives.
            eye = torch.eye(total, dtype=torch.bool, device=blocked.device)
            self_mask = (~blocked | eye).to(output.device)

        pred_logits, pred_masks, pilot_logits, pilot_masks = [], [], [], []

        piloting = pilot is not None

        def record(logits: Tensor, masks: Tensor, rows: int) -> None:
            if piloting:
                # split, not two slices: its backward concatenates the two gradients, where each slice's backward
                # would zero-fill a gradient of the whole [B, Np + Q, H, W] and add them (2.5x the memory traffic).
                pilot_part, masks = masks.split([rows, masks.shape[1] - rows], dim=1)
                pilot_logits.append(logits[:, :rows])
                pilot_masks.append(pilot_part)
                logits = logits[:, rows:]
            pred_logits.append(logits)
            pred_masks.append(masks)

        target = sizes[0] if self.num_layers > 0 else None
        logits, masks, allowed = self._predict(output, mask_features, target, num_pilots)
        record(logits, masks, num_pilots)

        for i in range(self.num_layers):
            level = i % levels
            if piloting and not pilot.active(i):
                # Pilots are done (MP-Former's pilot_layers): drop their rows; the matching rows are unaffected.
                output = output[:, num_pilots:]
                if query_pos is not None:
                    query_pos = query_pos[:, num_pilots:]
                num_pilots = 0
                self_mask = None
                piloting = False
            if piloting:
                cross_mask = self._pilot_cross_mask(pilot, i, sizes[level], allowed, num_pilots)
            else:
                cross_mask = allowed.unsqueeze(1)
            cross_mask = _unblock_empty_rows(cross_mask)

            output = self.transformer_cross_attention_layers[i](
                output, memories[level], memory_pos[level], cross_mask, query_pos
            )
            output = self.transformer_self_attention_layers[i](output, self_mask, query_pos)
            output = self.transformer_ffn_layers[i](output)

            # The last layer's masks are not used for attention: skip their resizing.
            target = sizes[(i + 1) % levels] if i + 1 < self.num_layers else None
            logits, masks, allowed = self._predict(output, mask_features, target, num_pilots)
            record(logits, masks, num_pilots)

        out = {
            "pred_logits": pred_logits[-1],
            "pred_masks": pred_masks[-1],
            "aux_outputs": [{"pred_logits": a, "pred_masks": b} for a, b in zip(pred_logits[:-1], pred_masks[:-1])],
        }
        if pilot is not None:
            out["pilot_outputs"] = {
                "pred_logits": pilot_logits[-1],
                "pred_masks": pilot_masks[-1],
                "aux_outputs": [
                    {"pred_logits": a, "pred_masks": b} for a, b in zip(pilot_logits[:-1], pilot_masks[:-1])
                ],
                "target_index": pilot.target_index,
                "num_groups": pilot.num_groups,
            }
            max_objects = getattr(pilot, "max_objects", None)
            if max_objects is not None:
                # Tells the criterion the slots follow MaskPilot's group-major layout, so it can build the fixed
                # assignment from this int instead of reading target_index back (no graph break under torch.compile).
                out["pilot_outputs"]["max_objects"] = int(max_objects)
        return out
