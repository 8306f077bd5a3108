# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Exporting the inference path (pixel decoder + masked-attention decoder) with ``torch.export`` and to ONNX.

:func:`export_inference` gives a :class:`torch.export.ExportedProgram` from backbone features to ``pred_logits`` and
``pred_masks`` (the inputs of :mod:`mpseg.inference`), with a dynamic batch dimension. By default the graph keeps the
deformable attention as the custom op ``mpseg.ms_deform_attn`` (it runs the compiled kernel); ``decompose=True``
replaces it by plain ATen ops (:func:`~mpseg.ops._export.ms_deform_attn_decomposed`), so the program runs, saves and
loads without mpseg. :func:`to_onnx` exports that decomposed program with ``torch.onnx.export(..., dynamo=True)``.

Example:
    >>> import torch, mpseg
    >>> from mpseg.export import export_inference
    >>> pixel_decoder = mpseg.MSDeformAttnPixelDecoder([32] * 4, [4, 8, 16, 32], conv_dim=32, mask_dim=32,
    ...     transformer_nheads=4, transformer_dim_feedforward=64, transformer_enc_layers=1)
    >>> decoder = mpseg.MaskedAttentionDecoder(32, num_classes=3, hidden_dim=32, num_queries=5, nheads=4,
    ...     dim_feedforward=64, dec_layers=1, mask_dim=32)
    >>> features = [torch.randn(2, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    >>> program = export_inference(pixel_decoder, decoder, features)
    >>> logits, masks = program.module()(*[torch.randn(3, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)])
    >>> logits.shape, masks.shape
    (torch.Size([3, 5, 4]), torch.Size([3, 5, 16, 16]))
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import _extension
from .ops._export import ms_deform_attn_decomposed, msda_decomposition_table

if TYPE_CHECKING:
    from torch.onnx import ONNXProgram

__all__ = [
    "InferenceModel",
    "export_inference",
    "to_onnx",
    "program_to_onnx",
    "decomposition_table",
    "ms_deform_attn_decomposed",
]

_OUTPUT_NAMES = ("pred_logits", "pred_masks")


class InferenceModel(nn.Module):
    """Pixel decoder and decoder as one module with positional tensor inputs and a tuple output, the form that
    ``torch.export`` and ONNX want (no lists in, no nested dicts out).

    Only the last prediction is returned: ``aux_outputs`` serve the training losses.

    Args:
        pixel_decoder (MSDeformAttnPixelDecoder): the pixel decoder.
        decoder (MaskedAttentionDecoder): the masked-attention decoder (no pilot: inference never has one).

    Example:
        >>> import torch, mpseg
        >>> pd = mpseg.MSDeformAttnPixelDecoder([32] * 4, [4, 8, 16, 32], conv_dim=32, mask_dim=32,
        ...     transformer_nheads=4, transformer_enc_layers=1)
        >>> dec = mpseg.MaskedAttentionDecoder(32, num_classes=3, hidden_dim=32, num_queries=5, nheads=4,
        ...     dim_feedforward=64, dec_layers=1, mask_dim=32)
        >>> logits, masks = InferenceModel(pd, dec)(*[torch.randn(1, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)])
        >>> logits.shape, masks.shape
        (torch.Size([1, 5, 4]), torch.Size([1, 5, 16, 16]))
    """

    def __init__(self, pixel_decoder: nn.Module, decoder: nn.Module) -> None:
        super().__init__()
        if not isinstance(pixel_decoder, nn.Module):
            raise TypeError(f"pixel_decoder must be an nn.Module, got {type(pixel_decoder).__name__}")
        if not isinstance(decoder, nn.Module):
            raise TypeError(f"decoder must be an nn.Module, got {type(decoder).__name__}")
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder

    def forward(self, *features: Tensor) -> tuple[Tensor, Tensor]:
        """Run both decoders.

        Args:
            *features (Tensor[B, C_i, H_i, W_i]): backbone maps, finest first, as
                :class:`~mpseg.MSDeformAttnPixelDecoder` takes them.

        Returns:
            tuple: ``pred_logits`` (Tensor[B, Q, K+1]) and ``pred_masks`` (Tensor[B, Q, H/4, W/4]) of the last layer.
        """
        mask_features, multi_scale_features = self.pixel_decoder(list(features))
        outputs = self.decoder(multi_scale_features, mask_features)
        return outputs["pred_logits"], outputs["pred_masks"]


def decomposition_table(base: dict | None = None) -> dict:
    """A decomposition table for :meth:`torch.export.ExportedProgram.run_decompositions` that also lowers
    ``mpseg.ms_deform_attn`` to ATen ops.

    Args:
        base (dict, optional): the table to extend (copied); default :func:`torch.export.default_decompositions`.

    Returns:
        dict: ``base`` plus ``{torch.ops.mpseg.ms_deform_attn.default: ms_deform_attn_decomposed}`` (when the
        compiled ops are loaded; otherwise no graph can hold the op and ``base`` is returned unchanged).
    """
    table = torch.export.default_decompositions() if base is None else base.copy()
    table.update(msda_decomposition_table())
    return table


def _check_features(features: Sequence[Tensor]) -> tuple[Tensor, ...]:
    if isinstance(features, Tensor) or not isinstance(features, (list, tuple)) or len(features) == 0:
        raise TypeError(f"features must be a non-empty list or tuple of tensors, got {type(features).__name__}")
    for i, feature in enumerate(features):
        if not isinstance(feature, Tensor) or feature.dim() != 4:
            got = tuple(feature.shape) if isinstance(feature, Tensor) else type(feature).__name__
            raise ValueError(f"features[{i}] must be a Tensor[B, C, H, W], got {got}")
    return tuple(features)


def export_inference(
    pixel_decoder: nn.Module,
    decoder: nn.Module,
    features: Sequence[Tensor],
    *,
    dynamic_batch: bool = True,
    decompose: bool = False,
    strict: bool = False,
) -> torch.export.ExportedProgram:
    """Export pixel decoder + decoder (features in, ``pred_logits`` / ``pred_masks`` out) with ``torch.export``.

    The modules are put in eval mode (and restored afterwards). Spatial sizes are fixed to those of ``features``
    (the decoder's masked attention resizes masks to each level's size, which is part of the graph); the batch size
    is dynamic when ``dynamic_batch``. The graph holds no data-dependent op: Mask2Former's "empty mask attends
    everywhere" rule is an elementwise OR with a per-row ``any``.

    Args:
        pixel_decoder (MSDeformAttnPixelDecoder): the pixel decoder.
        decoder (MaskedAttentionDecoder): the decoder.
        features (Sequence[Tensor[B, C_i, H_i, W_i]]): example backbone maps, finest first. With ``dynamic_batch``
            use B >= 2: torch.export specialises a dimension of size 1.
        dynamic_batch (bool): export the batch dimension as dynamic (``torch.export.Dim("batch")``).
        decompose (bool): run :meth:`~torch.export.ExportedProgram.run_decompositions` with
            :func:`decomposition_table`: the program then holds only ATen ops, no ``mpseg.ms_deform_attn``,
            and needs no mpseg to run or load. Otherwise the custom op stays (fast compiled kernel; loading the
            program needs ``import mpseg``).
        strict (bool): ``torch.export``'s strict mode (TorchDynamo tracing); non-strict (the default) traces
            Python directly.

    Returns:
        torch.export.ExportedProgram: call ``program.module()(*features)`` for ``(pred_logits [B, Q, K+1],
        pred_masks [B, Q, H/4, W/4])``.

    Raises:
        TypeError, ValueError: ``features`` is not a sequence of 4-d tensors (the modules check the rest).
    """
    features = _check_features(features)
    if dynamic_batch and features[0].shape[0] < 2:
        raise ValueError(
            f"features must have batch size >= 2 to export a dynamic batch (torch.export specialises size 1), "
            f"got {features[0].shape[0]}; pass dynamic_batch=False for a fixed batch of 1"
        )
    # mpseg.ms_deform_attn chooses its backend in Python, loading the extension (which registers its ops and Python
    # rules) and reading its build info on first use; doing that once here, outside tracing, keeps it out of the trace.
    _extension.build_info()
    model = InferenceModel(pixel_decoder, decoder)
    was_training = (pixel_decoder.training, decoder.training)
    model.eval()
    try:
        dynamic_shapes = None
        if dynamic_batch:
            batch = torch.export.Dim("batch", min=1)
            # Keyed by the name of InferenceModel.forward's varargs parameter, which holds all maps.
            dynamic_shapes = {"features": tuple({0: batch} for _ in features)}
        program = torch.export.export(model, features, dynamic_shapes=dynamic_shapes, strict=strict)
    finally:
        pixel_decoder.train(was_training[0])
        decoder.train(was_training[1])
    if decompose:
        program = program.run_decompositions(decomposition_table())
    return program


def _has_custom_op(program: torch.export.ExportedProgram) -> bool:
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function" and getattr(node.target, "namespace", None) == "mpseg":
                    return True
    return False


def program_to_onnx(
    program: torch.export.ExportedProgram,
    path: str | os.PathLike | None = None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    opset_version: int | None = None,
    optimize: bool = True,
) -> ONNXProgram:
    """Convert an exported program that may hold ``mpseg`` ops to ONNX (``torch.onnx.export(..., dynamo=True)``).

    ``mpseg.ms_deform_attn`` nodes are first decomposed with :func:`decomposition_table` (skipped when the program
    holds none, e.g. one from ``export_inference(..., decompose=True)``); dynamic dimensions of the program stay
    dynamic in ONNX.

    Args:
        program (torch.export.ExportedProgram): e.g. from :func:`export_inference`.
        path (str | os.PathLike, optional): where to save the ``.onnx`` file (weights included); not saved if None.
        input_names (Sequence[str], optional): names of the ONNX graph inputs.
        output_names (Sequence[str], optional): names of the ONNX graph outputs.
        opset_version (int, optional): ONNX opset; default torch.onnx's.
        optimize (bool): run torch.onnx's graph optimiser (constant folding, fusions).

    Returns:
        torch.onnx.ONNXProgram: ``.model_proto`` is the ONNX model; ``.save(path)`` writes it.

    Raises:
        TypeError: ``program`` is not an ExportedProgram.
        ImportError: ``onnx`` or ``onnxscript`` is not installed.
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"program must be a torch.export.ExportedProgram, got {type(program).__name__}")
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs the packages {', '.join(missing)} (torch.onnx.export(..., dynamo=True) uses them): "
            f"pip install {' '.join(missing)}"
        )
    if _has_custom_op(program):
        program = program.run_decompositions(decomposition_table())
    onnx_program = torch.onnx.export(
        program,
        (),
        dynamo=True,
        input_names=None if input_names is None else list(input_names),
        output_names=None if output_names is None else list(output_names),
        opset_version=opset_version,
        optimize=optimize,
    )
    if path is not None:
        onnx_program.save(os.fspath(path))
    return onnx_program


def to_onnx(
    pixel_decoder: nn.Module,
    decoder: nn.Module,
    features: Sequence[Tensor],
    path: str | os.PathLike | None = None,
    *,
    dynamic_batch: bool = True,
    opset_version: int | None = None,
    optimize: bool = True,
) -> ONNXProgram:
    """Export pixel decoder + decoder to ONNX (``torch.onnx.export(..., dynamo=True)``, needs ``onnxscript``).

    :func:`export_inference` with ``decompose=True``, then :func:`program_to_onnx`. The deformable attention is
    exported through :func:`~mpseg.ops._export.ms_deform_attn_decomposed` (Gather and elementwise ops), so the model
    runs in any ONNX runtime without custom operators. Inputs are named ``features_0 ... features_{n-1}`` (finest
    first), outputs ``pred_logits`` and ``pred_masks``; the batch dimension is dynamic when ``dynamic_batch``.

    Args:
        pixel_decoder (MSDeformAttnPixelDecoder): the pixel decoder.
        decoder (MaskedAttentionDecoder): the decoder.
        features (Sequence[Tensor[B, C_i, H_i, W_i]]): example backbone maps, finest first (B >= 2 for a dynamic
            batch).
        path (str | os.PathLike, optional): where to save the ``.onnx`` file (weights included); not saved if None.
        dynamic_batch (bool): dynamic batch dimension.
        opset_version (int, optional): ONNX opset; default torch.onnx's.
        optimize (bool): run torch.onnx's graph optimiser (constant folding, fusions).

    Returns:
        torch.onnx.ONNXProgram: ``.model_proto`` is the ONNX model; ``.save(path)`` writes it.
    """
    program = export_inference(pixel_decoder, decoder, features, dynamic_batch=dynamic_batch, decompose=True)
    return program_to_onnx(
        program,
        path,
        input_names=[f"features_{i}" for i in range(len(features))],
        output_names=_OUTPUT_NAMES,
        opset_version=opset_version,
        optimize=optimize,
    )
