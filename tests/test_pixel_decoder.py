# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
import pytest
import torch

from mpseg.layers.pixel_decoder import MSDeformAttnPixelDecoder

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")

CHANNELS = [32, 64, 128, 256]
STRIDES = [4, 8, 16, 32]



def _small(**kwargs):
    torch.manual_seed(0)
    args = dict(conv_dim=32, mask_dim=16, transformer_nheads=4, transformer_dim_feedforward=48,
                transformer_enc_layers=1)
    args.update(kwargs)
    return MSDeformAttnPixelDecoder(CHANNELS, STRIDES, **args)


def _randomize(module, seed=0):
    # Deformable DETR zero-initialises the offset and attention-weight matrices, which makes the encoder ignore its
    # queries (and hence the position and level embeddings); perturb every parameter so all paths are live.
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module


def _features(batch=2, height=64, width=32, dtype=torch.float32, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    return [torch.randn(batch, c, height // s, width // s, generator=g).to(dtype) for c, s in zip(CHANNELS, STRIDES)]


def test_state_dict_keys_and_shapes_equal_the_official_module():
    sd = _small(transformer_enc_layers=2).state_dict()
    expected = {"transformer.level_embed": (3, 32), "mask_features.weight": (16, 32, 1, 1), "mask_features.bias": (16,),
                "adapter_1.weight": (32, 32, 1, 1), "adapter_1.norm.weight": (32,), "adapter_1.norm.bias": (32,),
                "layer_1.weight": (32, 32, 3, 3), "layer_1.norm.weight": (32,), "layer_1.norm.bias": (32,)}
    for i, c in enumerate([256, 128, 64]):  # coarsest first
        expected.update({f"input_proj.{i}.0.weight": (32, c, 1, 1), f"input_proj.{i}.0.bias": (32,),
                         f"input_proj.{i}.1.weight": (32,), f"input_proj.{i}.1.bias": (32,)})
    for layer in range(2):
        p = f"transformer.encoder.layers.{layer}."
        for name, shape in [("self_attn.sampling_offsets", (4 * 3 * 4 * 2, 32)), ("self_attn.attention_weights",
                            (4 * 3 * 4, 32)), ("self_attn.value_proj", (32, 32)), ("self_attn.output_proj", (32, 32)),
                            ("linear1", (48, 32)), ("linear2", (32, 48))]:
            expected[p + name + ".weight"] = shape
            expected[p + name + ".bias"] = shape[:1]
        for norm in ("norm1", "norm2"):
            expected[p + norm + ".weight"] = (32,)
            expected[p + norm + ".bias"] = (32,)
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def test_output_shapes_and_order():
    pd = _small()
    mask_features, multi_scale = pd(_features(height=64, width=32))
    assert mask_features.shape == (2, 16, 16, 8)
    assert [tuple(f.shape) for f in multi_scale] == [(2, 32, 2, 1), (2, 32, 4, 2), (2, 32, 8, 4)]


def test_encoder_mixes_levels_and_fpn_uses_the_finest_map():
    pd = _randomize(_small()).eval()
    feats = _features()
    base_mask, base_ms = pd(feats)
    changed = [f.clone() for f in feats]
    changed[3] += torch.randn_like(changed[3])  # the coarsest map reaches every output through the encoder
    mask2, ms2 = pd(changed)
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(base_ms, ms2))
    finest = [f.clone() for f in feats]
    finest[0] += torch.randn_like(finest[0])  # the stride-4 map only feeds the FPN level
    mask3, ms3 = pd(finest)
    assert all(torch.equal(a, b) for a, b in zip(base_ms, ms3))
    assert (mask3 - base_mask).abs().max() > 1e-3


def test_autocast_and_half_inputs_run_in_float32():
    pd = _small().eval()
    feats = _features()
    with torch.no_grad():
        ref_mask, ref_ms = pd(feats)
        with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
            mask, ms = pd(feats)
        assert mask.dtype == torch.float32 and all(f.dtype == torch.float32 for f in ms)
        torch.testing.assert_close(mask, ref_mask, rtol=0, atol=0)
        half = [f.to(torch.bfloat16) for f in feats]
        mask_h, _ = pd(half)
        ref_h, _ = pd([f.float() for f in half])
    assert mask_h.dtype == torch.float32
    torch.testing.assert_close(mask_h, ref_h, rtol=0, atol=0)


def test_every_parameter_gets_a_gradient():
    pd = _randomize(_small(transformer_dropout=0.1)).train()
    mask_features, ms = pd(_features())
    (mask_features.square().mean() + sum(f.square().mean() for f in ms)).backward()
    for name, p in pd.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_variants_without_norm_and_all_levels_in_the_encoder():
    plain = _small(norm="")
    keys = plain.state_dict().keys()
    assert "adapter_1.bias" in keys and "layer_1.bias" in keys and "adapter_1.norm.weight" not in keys
    mask_features, _ = plain(_features())
    assert mask_features.shape == (2, 16, 16, 8)

    all_levels = _small(transformer_in_features=4)
    assert all_levels.num_fpn_levels == 0 and not any(k.startswith("adapter_") for k in all_levels.state_dict())
    mask_features, ms = all_levels(_features())
    assert mask_features.shape == (2, 16, 16, 8)
    assert [tuple(f.shape[-2:]) for f in ms] == [(2, 1), (4, 2), (8, 4)]


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="equal length"):
        MSDeformAttnPixelDecoder([32, 64], [4, 8, 16])
    with pytest.raises(ValueError, match="increasing"):
        MSDeformAttnPixelDecoder([32, 64, 128], [16, 8, 4])
    with pytest.raises(ValueError, match="divisible by 32"):
        MSDeformAttnPixelDecoder(CHANNELS, STRIDES, conv_dim=48)
    with pytest.raises(ValueError, match="finer"):
        MSDeformAttnPixelDecoder([64, 128, 256], [8, 16, 32], conv_dim=32, transformer_nheads=4)
    with pytest.raises(ValueError, match="transformer_in_features"):
        MSDeformAttnPixelDecoder(CHANNELS, STRIDES, transformer_in_features=5)
    pd = _small()
    with pytest.raises(ValueError, match="list of 4 maps"):
        pd(_features()[1:])
    feats = _features()
    feats[2] = feats[2][:, :7]
    with pytest.raises(ValueError, match=r"features\[2\] must have shape \[B, 128, H, W\]"):
        pd(feats)


def test_float64_module_computes_in_float64():
    pd = _randomize(_small()).double().eval()
    feats = _features(batch=1)
    mask64, _ = pd([f.double() for f in feats])
    assert mask64.dtype == torch.float64
    mask32, _ = _randomize(_small()).eval()(feats)
    torch.testing.assert_close(mask64.float(), mask32, rtol=1e-4, atol=1e-4)
