# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Checkpoint converters: official Mask2Former / MP-Former (detectron2) and HF transformers' Mask2Former -> mpseg.

mpseg's :class:`~mpseg.MSDeformAttnPixelDecoder` and :class:`~mpseg.MaskedAttentionDecoder` use the official
modules' state-dict keys, so an official checkpoint only needs to be split by prefix:

=====================================  =====================================
official key prefix                    goes to
=====================================  =====================================
``sem_seg_head.pixel_decoder.``        pixel decoder
``sem_seg_head.predictor.label_enc.``  MP-Former noiser (``label_enc.*``)
``sem_seg_head.predictor.``            decoder
``backbone.``                          backbone (returned apart, unchanged)
anything else                          ``extra`` (``criterion.empty_weight``, ``pixel_mean``, ...)
=====================================  =====================================

HF checkpoints are first renamed to the official layout (:func:`hf_to_official`; its self-attention keeps q/k/v in
separate linears, which are packed into ``in_proj_weight`` / ``in_proj_bias`` in q, k, v order).

Example (with an official checkpoint file at hand)::

    weights = convert.load_official_checkpoint("model_final.pkl")
    parts = convert.split_official(weights, pixel_decoder=pd, decoder=dec)
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "load_official_checkpoint",
    "split_official",
    "to_official",
    "hf_to_official",
    "convert_hf",
    "check_state_dict",
]

PIXEL_DECODER_PREFIX = "sem_seg_head.pixel_decoder."
DECODER_PREFIX = "sem_seg_head.predictor."
NOISER_PREFIX = "sem_seg_head.predictor.label_enc."
BACKBONE_PREFIX = "backbone."


def _to_tensor(value: Any, key: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float, np.generic)):
        return torch.as_tensor(value)
    raise TypeError(f"checkpoint entry {key!r} must be a Tensor or numpy array, got {type(value).__name__}")


def load_official_checkpoint(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """Read an official Mask2Former / MP-Former checkpoint into a flat ``{key: Tensor}`` dict.

    Args:
        checkpoint (str | Path | Mapping): a ``.pth`` file (``torch.save`` of a dict holding the weights under
            ``"model"``, or the weights themselves), a detectron2 ``.pkl`` file (numpy arrays under ``"model"``), or an
            already loaded dict of either form.

    Returns:
        dict[str, Tensor]: the model weights with their official keys.

    Note:
        ``.pkl`` files are read with :mod:`pickle`, which can run code: load only files you trust. ``.pth`` files are
        read with ``torch.load(weights_only=True)``.
    """
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if path.suffix == ".pkl":
            with path.open("rb") as f:
                data = pickle.load(f, encoding="latin1")
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    else:
        data = checkpoint
    if not isinstance(data, Mapping):
        raise TypeError(f"checkpoint must hold a dict of weights, got {type(data).__name__}")
    if "model" in data and isinstance(data["model"], Mapping):
        data = data["model"]
    return {str(k): _to_tensor(v, str(k)) for k, v in data.items()}


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Tensor], name: str = "module") -> None:
    """Raise if ``state_dict`` does not fit ``module`` exactly.

    Args:
        module (nn.Module): the module the weights are meant for.
        state_dict (Mapping[str, Tensor]): the weights.
        name (str): how to call the module in the error message.

    Raises:
        KeyError: naming every missing and unexpected key.
        ValueError: naming every key whose shape differs, with both shapes.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise KeyError(
            f"{name}: state dict does not match; missing keys: {missing or 'none'}; unexpected keys: "
            f"{unexpected or 'none'}"
        )
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs module {tuple(v.shape)}"
        for k, v in expected.items()
        if tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise ValueError(f"{name}: shape mismatch for " + "; ".join(wrong))


def _load(module: nn.Module | None, state_dict: dict[str, Tensor], name: str) -> None:
    if module is None:
        return
    check_state_dict(module, state_dict, name)
    module.load_state_dict(state_dict, strict=True)


def split_official(
    state_dict: Mapping[str, Any],
    *,
    pixel_decoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
    noiser: nn.Module | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Split an official Mask2Former / MP-Former state dict into mpseg modules' state dicts.

    Args:
        state_dict (Mapping[str, Tensor | ndarray]): the official model weights (see
            :func:`load_official_checkpoint`).
        pixel_decoder (MSDeformAttnPixelDecoder, optional): if given, checked against and loaded with its part.
        decoder (MaskedAttentionDecoder, optional): likewise.
        noiser (MaskPilotNoiser, optional): likewise, with MP-Former's ``label_enc``.

    Returns:
        dict: ``"pixel_decoder"``, ``"decoder"``, ``"noiser"`` (empty for Mask2Former), ``"backbone"`` (keys without
        ``backbone.``, in the checkpoint's own naming) and ``"extra"`` (everything else, keys unchanged).

    Raises:
        KeyError / ValueError: when a given module's keys or shapes do not match its part (see
            :func:`check_state_dict`), or when the checkpoint has no pixel-decoder or decoder keys at all.
    """
    parts: dict[str, dict[str, Tensor]] = {k: {} for k in ("pixel_decoder", "decoder", "noiser", "backbone", "extra")}
    for key, value in state_dict.items():
        tensor = _to_tensor(value, key)
        if key.startswith(PIXEL_DECODER_PREFIX):
            parts["pixel_decoder"][key[len(PIXEL_DECODER_PREFIX) :]] = tensor
        elif key.startswith(NOISER_PREFIX):
            parts["noiser"]["label_enc." + key[len(NOISER_PREFIX) :]] = tensor
        elif key.startswith(DECODER_PREFIX):
            name = key[len(DECODER_PREFIX) :]
            # Early official checkpoints call the query features "static_query"; the official module renames them
            # on load (its _load_from_state_dict), so do the same.
            if name.startswith("static_query."):
                name = "query_feat." + name[len("static_query.") :]
            parts["decoder"][name] = tensor
        elif key.startswith(BACKBONE_PREFIX):
            parts["backbone"][key[len(BACKBONE_PREFIX) :]] = tensor
        else:
            parts["extra"][key] = tensor
    if not parts["pixel_decoder"] or not parts["decoder"]:
        raise KeyError(
            f"no keys under {PIXEL_DECODER_PREFIX!r} and/or {DECODER_PREFIX!r}: not a Mask2Former checkpoint? "
            f"first keys: {list(state_dict)[:5]}"
        )
    _load(pixel_decoder, parts["pixel_decoder"], "pixel_decoder")
    _load(decoder, parts["decoder"], "decoder")
    _load(noiser, parts["noiser"], "noiser")
    return parts


def to_official(
    pixel_decoder: nn.Module | Mapping[str, Tensor],
    decoder: nn.Module | Mapping[str, Tensor],
    noiser: nn.Module | Mapping[str, Tensor] | None = None,
    backbone: nn.Module | Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The inverse of :func:`split_official`: mpseg modules (or their state dicts) -> official keys.

    Only the noiser's ``label_enc.*`` entries are exported (MP-Former has nothing else).

    Args:
        pixel_decoder (nn.Module | Mapping[str, Tensor]): a :class:`~mpseg.MSDeformAttnPixelDecoder` or its state dict.
        decoder (nn.Module | Mapping[str, Tensor]): a :class:`~mpseg.MaskedAttentionDecoder` or its state dict.
        noiser (nn.Module | Mapping[str, Tensor], optional): a :class:`~mpseg.MaskPilotNoiser` or its state dict.
        backbone (nn.Module | Mapping[str, Tensor], optional): backbone weights, stored under ``backbone.`` unchanged.

    Returns:
        dict[str, Tensor]: official keys (``sem_seg_head.pixel_decoder.*``, ``sem_seg_head.predictor.*``, and
        ``backbone.*`` if given).
    """

    def sd(obj: nn.Module | Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        return obj.state_dict() if isinstance(obj, nn.Module) else obj

    out = {PIXEL_DECODER_PREFIX + k: v for k, v in sd(pixel_decoder).items()}
    out.update({DECODER_PREFIX + k: v for k, v in sd(decoder).items()})
    if noiser is not None:
        label_enc = {k[len("label_enc.") :]: v for k, v in sd(noiser).items() if k.startswith("label_enc.")}
        out.update({NOISER_PREFIX + k: v for k, v in label_enc.items()})
    if backbone is not None:
        out.update({BACKBONE_PREFIX + k: v for k, v in sd(backbone).items()})
    return out


# HF -> official renames, applied to the key after its HF module prefix. Each is (pattern, replacement).
_HF_PIXEL_DECODER_RULES = [
    (r"^level_embed$", "transformer.level_embed"),
    (r"^input_projections\.(\d+)\.([01])\.(weight|bias)$", r"input_proj.\1.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)$",
     r"transformer.encoder.layers.\1.self_attn.\2.\3"),
    (r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"transformer.encoder.layers.\1.norm1.\2"),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"^mask_projection\.(weight|bias)$", r"mask_features.\1"),
    (r"^(adapter|layer)_(\d+)\.0\.(weight|bias)$", r"\1_\2.\3"),
    (r"^(adapter|layer)_(\d+)\.1\.(weight|bias)$", r"\1_\2.norm.\3"),
]
_HF_DECODER_RULES = [
    (r"^queries_embedder\.weight$", "query_embed.weight"),
    (r"^queries_features\.weight$", "query_feat.weight"),
    (r"^level_embed\.weight$", "level_embed.weight"),
    (r"^input_projections\.(\d+)\.(weight|bias)$", r"input_proj.\1.\2"),
    (r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$",
     r"transformer_self_attention_layers.\1.self_attn.out_proj.\2"),
    (r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$", r"transformer_self_attention_layers.\1.norm.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$",
     r"transformer_cross_attention_layers.\1.multihead_attn.\2"),
    (r"^decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)$",
     r"transformer_cross_attention_layers.\1.norm.\2"),
    (r"^decoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"transformer_ffn_layers.\1.linear1.\2"),
    (r"^decoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"transformer_ffn_layers.\1.linear2.\2"),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"transformer_ffn_layers.\1.norm.\2"),
    (r"^decoder\.layernorm\.(weight|bias)$", r"decoder_norm.\1"),
    (r"^decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)$", r"mask_embed.layers.\1.\2"),
]
_HF_QKV = re.compile(r"^decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _rename(key: str, rules: list[tuple[str, str]]) -> str | None:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return None


def hf_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename an HF transformers ``Mask2FormerForUniversalSegmentation`` or ``Mask2FormerModel`` state dict to the
    official Mask2Former layout.

    The HF backbone (``pixel_level_module.encoder.*``) is kept under ``backbone.`` with its HF names; the criterion's
    ``empty_weight`` buffer becomes ``criterion.empty_weight`` as in official checkpoints. ``class_predictor`` (only in
    ``Mask2FormerForUniversalSegmentation``) becomes the decoder's ``class_embed``.

    Args:
        state_dict (Mapping[str, Tensor]): HF state dict (keys with or without the ``model.`` prefix).

    Returns:
        dict[str, Tensor]: the same tensors under official Mask2Former keys (q, k, v packed into ``in_proj_*``).

    Raises:
        KeyError: naming every key that is not part of HF's Mask2Former, and every self-attention whose q, k, v
            projections are incomplete.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, Tensor]] = {}
    unknown = []
    for key, value in state_dict.items():
        key_body = key[len("model.") :] if key.startswith("model.") else key
        new = None
        if key_body.startswith("pixel_level_module.encoder."):
            new = BACKBONE_PREFIX + key_body[len("pixel_level_module.encoder.") :]
        elif key_body.startswith("pixel_level_module.decoder."):
            renamed = _rename(key_body[len("pixel_level_module.decoder.") :], _HF_PIXEL_DECODER_RULES)
            new = None if renamed is None else PIXEL_DECODER_PREFIX + renamed
        elif key_body.startswith("transformer_module."):
            body = key_body[len("transformer_module.") :]
            match = _HF_QKV.match(body)
            if match:
                layer, which, kind = match.groups()
                qkv.setdefault((layer, kind), {})[which] = value
                continue
            renamed = _rename(body, _HF_DECODER_RULES)
            new = None if renamed is None else DECODER_PREFIX + renamed
        elif key_body.startswith("class_predictor."):
            new = DECODER_PREFIX + "class_embed." + key_body[len("class_predictor.") :]
        elif key_body == "criterion.empty_weight":
            new = key_body
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise KeyError(f"keys not part of HF's Mask2Former: {sorted(unknown)}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(
                f"self-attention of decoder layer {layer} has {kind} for {sorted(parts)} only; q, k and v are needed"
            )
        # nn.MultiheadAttention packs the projections as [q; k; v] along the output dimension.
        packed = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"{DECODER_PREFIX}transformer_self_attention_layers.{layer}.self_attn.in_proj_{kind}"] = packed
    return out


def convert_hf(
    state_dict: Mapping[str, Tensor],
    *,
    pixel_decoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
) -> dict[str, dict[str, Tensor]]:
    """HF transformers' Mask2Former state dict -> mpseg state dicts (``split_official(hf_to_official(sd))``).

    Args:
        state_dict (Mapping[str, Tensor]): ``Mask2FormerForUniversalSegmentation.state_dict()`` (or
            ``Mask2FormerModel``'s, which has no class head: the decoder's ``class_embed`` is then missing).
        pixel_decoder (MSDeformAttnPixelDecoder, optional): checked against and loaded with its part.
        decoder (MaskedAttentionDecoder, optional): likewise.

    Returns:
        dict: as :func:`split_official` (``"backbone"`` holds HF's backbone weights with HF names).

    Note:
        HF's decoder config counts ``decoder_layers`` = mpseg's ``dec_layers + 1`` (it includes the initial
        prediction); its ``feature_size`` is the pixel decoder's ``conv_dim`` and the decoder's ``in_channels``.
    """
    return split_official(hf_to_official(state_dict), pixel_decoder=pixel_decoder, decoder=decoder)
