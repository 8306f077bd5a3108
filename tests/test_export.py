# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Export of the inference path: torch.export equals eager, ONNX (onnxruntime) equals PyTorch, and the MSDA export
decomposition equals the grid_sample reference, out-of-range and non-finite locations included."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnxruntime
import pytest
import torch
from torch import nn

import mpseg
from mpseg import _extension
from mpseg.export import (
    InferenceModel,
    decomposition_table,
    export_inference,
    ms_deform_attn_decomposed,
    program_to_onnx,
    to_onnx,
)

STRIDES = (4, 8, 16, 32)
CHANNELS = (32, 32, 64, 64)
# Ops whose output shape or control flow depends on tensor values: none may appear in an exported inference graph.
DATA_DEPENDENT = {"nonzero", "nonzero_static", "masked_select", "masked_scatter", "_local_scalar_dense", "item",
                  "unique", "_unique2", "unique_consecutive", "repeat_interleave", "_assert_async", "cond",
                  "while_loop"}


def _features(batch: int, generator: torch.Generator, size: int = 64) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, c, size // s, size // s, generator=generator) for c, s in zip(CHANNELS, STRIDES))


def _ops(program: torch.export.ExportedProgram) -> set[str]:
    """Names of all called ops, in nested graphs (e.g. autocast regions) too."""
    names = set()
    for module in program.graph_module.modules():
        if isinstance(module, torch.fx.GraphModule):
            for node in module.graph.nodes:
                if node.op == "call_function":
                    names.add(getattr(node.target, "__name__", str(node.target)).split(".")[0])
                    names.add(str(node.target))
    return names


def _ort(onnx_program) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(onnx_program.model_proto.SerializeToString(),
                                        providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model() -> InferenceModel:
    torch.manual_seed(0)
    pixel_decoder = mpseg.MSDeformAttnPixelDecoder(
        CHANNELS, STRIDES, conv_dim=32, mask_dim=32, transformer_nheads=4, transformer_dim_feedforward=64,
        transformer_enc_layers=1,
    )
    decoder = mpseg.MaskedAttentionDecoder(32, num_classes=3, hidden_dim=32, num_queries=6, nheads=4,
                                           dim_feedforward=64, dec_layers=2, mask_dim=32)
    return InferenceModel(pixel_decoder, decoder).eval()


@pytest.fixture(scope="module")
def program(model: InferenceModel) -> torch.export.ExportedProgram:
    features = _features(2, torch.Generator().manual_seed(1))
    return export_inference(model.pixel_decoder, model.decoder, features)


@pytest.fixture(scope="module")
def decomposed(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    return program.run_decompositions(decomposition_table())


# ----------------------------------------------------------------------------------------------- the decomposition


def _msda_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # Drawn in float64 and cast, so that both precisions see the same numbers.
    generator = torch.Generator().manual_seed(2)
    shapes = torch.tensor([[6, 5], [3, 4], [1, 1]])
    starts = torch.tensor([0, 30, 42])
    value = torch.randn(2, 43, 3, 4, generator=generator, dtype=torch.float64)
    # Locations well outside [0, 1] on both sides, so corners fall off every border.
    locations = torch.rand(2, 7, 3, 3, 4, 2, generator=generator, dtype=torch.float64) * 1.8 - 0.4
    locations[0, 0, 0, 0, 0, 0] = float("nan")
    locations[0, 1, 1, 1, 1, 1] = float("inf")
    locations[1, 2, 2, 0, 2, 0] = -float("inf")
    locations[1, 3, 0, 2, 3] = torch.tensor([1e30, -1e30], dtype=torch.float64)
    locations[1, 4, 1, 0, 0] = torch.tensor([0.0, 1.0], dtype=torch.float64)  # exactly on the borders
    weights = torch.rand(2, 7, 3, 3, 4, generator=generator, dtype=torch.float64)
    return tuple(t.to(dtype) for t in (value, locations, weights)[:1]) + (shapes, starts) + tuple(
        t.to(dtype) for t in (locations, weights)
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decomposition_equals_reference(dtype):
    inputs = _msda_inputs(dtype)
    expected = mpseg.ms_deform_attn_reference(*inputs)
    actual = ms_deform_attn_decomposed(*inputs)
    assert torch.isfinite(actual).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    if "cpu" in mpseg.available_backends("cpu"):
        # The node it replaces in exported graphs: the compiled kernel.
        kernel = mpseg.ms_deform_attn(*inputs, backend="cpu")
        torch.testing.assert_close(actual, kernel, rtol=tol, atol=tol)


def test_decomposition_hand_computed():
    # One level 2x2, one head, one channel, one query, one point: value = [[1, 2], [3, 4]]. The map centre (0.5, 0.5)
    # is the mean 2.5; (0.25, 0.25) is pixel (0, 0) exactly -> 1; (0, 0) is pixel (-0.5, -0.5): a quarter of
    # value[0, 0] (the other corners are outside) -> 0.25; beyond the map and NaN -> 0.
    value = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 4, 1, 1)
    shapes, starts = torch.tensor([[2, 2]]), torch.tensor([0])
    points = torch.tensor([[0.5, 0.5], [0.25, 0.25], [0.0, 0.0], [1.5, 0.5], [float("nan"), 0.5]],
                          dtype=torch.float64)
    locations = points.view(1, 5, 1, 1, 1, 2)
    weights = torch.ones(1, 5, 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn_decomposed(value, shapes, starts, locations, weights)
    torch.testing.assert_close(out.view(-1), torch.tensor([2.5, 1.0, 0.25, 0.0, 0.0], dtype=torch.float64))


def test_decomposition_table_covers_the_custom_op():
    table = decomposition_table({})
    if _extension.load().loaded:
        assert table == {torch.ops.mpseg.ms_deform_attn.default: ms_deform_attn_decomposed}
    else:
        assert table == {}


class _Attention(nn.Module):
    """Just the op, with fixed level sizes (as the pixel decoder builds them)."""

    def forward(self, value, locations, weights):
        shapes = torch.tensor([[6, 5], [3, 4], [1, 1]])
        starts = torch.tensor([0, 30, 42])
        return mpseg.ms_deform_attn(value, shapes, starts, locations, weights)


def test_onnx_op_out_of_range_and_non_finite_locations():
    value, _, _, locations, weights = _msda_inputs(torch.float32)
    program = torch.export.export(_Attention(), (value, locations, weights), strict=False)
    onnx_program = program_to_onnx(program, input_names=["value", "locations", "weights"])
    (actual,) = _ort(onnx_program).run(
        None, {"value": value.numpy(), "locations": locations.numpy(), "weights": weights.numpy()}
    )
    expected = mpseg.ms_deform_attn_reference(*_msda_inputs(torch.float64)).float()
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_export_without_the_kernel_traces_the_decomposition():
    # The reference backend needs the level sizes as Python ints, which torch.export cannot provide; under export
    # ms_deform_attn must trace the decomposition instead (also what happens when the extension is not built).
    value, shapes, starts, locations, weights = _msda_inputs(torch.float32)
    # What export_inference does first: read the build info outside tracing (else its op is recorded in the graph).
    _extension.build_info()
    with mpseg.ops.use_backend("reference"):
        program = torch.export.export(_Attention(), (value, locations, weights), strict=False)
    ops = _ops(program)
    assert "aten.index_select.default" in ops and not any(op.startswith("mpseg.") for op in ops), ops
    expected = mpseg.ms_deform_attn_reference(value, shapes, starts, locations, weights)
    torch.testing.assert_close(program.module()(value, locations, weights), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ torch.export


@pytest.mark.slow
def test_export_equals_eager_with_dynamic_batch(model, program):
    ops = _ops(program)
    if _extension.load().loaded:
        # The kernel runs inside the exported program, and it is the only mpseg op there.
        assert {op for op in ops if op.startswith("mpseg.")} == {"mpseg.ms_deform_attn.default"}, ops
    else:
        # Without the kernel, ms_deform_attn traces the gather-based decomposition (the reference cannot export).
        assert "aten.index_select.default" in ops
    exported = program.module()
    generator = torch.Generator().manual_seed(3)
    for batch in (2, 1, 3):
        features = _features(batch, generator)
        with torch.no_grad():
            expected = model(*features)
            actual = exported(*features)
        assert actual[0].shape == (batch, 6, 4) and actual[1].shape == (batch, 6, 16, 16)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_exported_graph_has_no_data_dependent_ops(program, decomposed):
    for prog in (program, decomposed):
        ops = _ops(prog)
        names = {op.split(".")[1] if op.startswith("aten.") else op for op in ops}
        assert not names & DATA_DEPENDENT, names & DATA_DEPENDENT
        # Only the batch symbol: no unbacked (data-dependent) sizes.
        symbols = {str(s) for s in prog.range_constraints}
        assert len(symbols) == 1 and not any(s.startswith("u") for s in symbols), symbols
    # Mask2Former's empty-mask rule is in the graph as elementwise ops (any + or), not as indexing.
    assert "aten.any.dim" in _ops(program)


@pytest.mark.slow
def test_decomposed_program_equals_eager_without_mpseg_ops(model, decomposed):
    ops = _ops(decomposed)
    assert not any(op.startswith("mpseg.") for op in ops), ops
    features = _features(3, torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = model(*features)
        actual = decomposed.module()(*features)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


_LOAD_WITHOUT_MPSEG = """
import sys, torch
program = torch.export.load(sys.argv[1])
features, expected = torch.load(sys.argv[2])
actual = program.module()(*features)
assert "mpseg" not in sys.modules, "the decomposed program must not need mpseg"
for a, e in zip(actual, expected):
    torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
def test_decomposed_program_saves_and_loads_without_mpseg(model, decomposed, tmp_path):
    features = _features(3, torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(*features)
    torch.export.save(decomposed, tmp_path / "model.pt2")
    torch.save((features, expected), tmp_path / "io.pt")
    result = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_MPSEG, str(tmp_path / "model.pt2"),
                             str(tmp_path / "io.pt")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.slow
def test_exported_program_keeps_empty_mask_rule(model, program):
    # Weights that make every predicted mask empty (all logits -32): every query's cross-attention row is all blocked,
    # so the rule must let it attend everywhere. Loaded into the already exported graph: same graph, new weights.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        state["pixel_decoder.mask_features.weight"].zero_()
        state["pixel_decoder.mask_features.bias"].fill_(1.0)
        state["decoder.mask_embed.layers.2.weight"].zero_()
        state["decoder.mask_embed.layers.2.bias"].fill_(-1.0)
    empty = InferenceModel(model.pixel_decoder, model.decoder)
    exported = program.module()
    features = _features(2, torch.Generator().manual_seed(5))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        empty.load_state_dict(state)
        exported.load_state_dict(state)
        with torch.no_grad():
            expected = empty(*features)
            actual = exported(*features)
    finally:
        model.load_state_dict(original)
    assert (expected[1] < 0).all()
    assert all(torch.isfinite(a).all() for a in actual)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- ONNX


@pytest.mark.slow
def test_to_onnx_equals_pytorch_with_dynamic_batch(model, tmp_path):
    # The one-call helper end to end: export, decomposition of the custom op, ONNX conversion, saved file.
    path = tmp_path / "model.onnx"
    features = _features(2, torch.Generator().manual_seed(1))
    onnx_program = to_onnx(model.pixel_decoder, model.decoder, features, path)
    domains = {node.domain for node in onnx_program.model_proto.graph.node}
    assert domains <= {"", "ai.onnx"}, domains  # standard operators only: runs in any ONNX runtime
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [f"features_{i}" for i in range(4)]
    generator = torch.Generator().manual_seed(6)
    for batch in (2, 3):
        features = _features(batch, generator)
        inputs = {f"features_{i}": f.numpy() for i, f in enumerate(features)}
        actual = session.run(["pred_logits", "pred_masks"], inputs)
        with torch.no_grad():
            expected = model(*features)
        for a, e in zip(actual, expected):
            np.testing.assert_allclose(a, e.numpy(), rtol=1e-4, atol=1e-4)


def test_export_inference_rejects_bad_features(model):
    with pytest.raises(TypeError, match="features"):
        export_inference(model.pixel_decoder, model.decoder, torch.randn(2, 32, 16, 16))
    with pytest.raises(ValueError, match="batch size >= 2"):
        export_inference(model.pixel_decoder, model.decoder, _features(1, torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match="pixel_decoder"):
        InferenceModel(None, model.decoder)
    with pytest.raises(TypeError, match="program"):
        program_to_onnx(model)
