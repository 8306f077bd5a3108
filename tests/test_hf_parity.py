# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Parity with HF transformers' Mask2Former (an independent implementation): same weights via ``mpseg.convert``, same
backbone features -> same pixel-decoder outputs and same class / mask logits at every layer (fp32, 1e-4)."""

import pytest
import torch
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerModel, SwinConfig

from mpseg import convert
from mpseg.layers.decoder import MaskedAttentionDecoder
from mpseg.layers.pixel_decoder import MSDeformAttnPixelDecoder

CHANNELS = [32, 64, 128, 256]
STRIDES = [4, 8, 16, 32]
ATOL = 1e-4



def _hf_config(*, hidden_dim=64, pre_norm=False, decoder_layers=6, num_queries=12):
    backbone = SwinConfig(
        embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8],
        out_features=["stage1", "stage2", "stage3", "stage4"], image_size=64,
    )
    return Mask2FormerConfig(
        backbone_config=backbone, feature_size=64, mask_feature_size=64, hidden_dim=hidden_dim, encoder_layers=2,
        decoder_layers=decoder_layers, num_attention_heads=4, dim_feedforward=96, encoder_feedforward_dim=96,
        num_queries=num_queries, num_labels=5, pre_norm=pre_norm,
    )


def _mpseg_modules(config):
    pixel_decoder = MSDeformAttnPixelDecoder(
        CHANNELS, STRIDES, conv_dim=config.feature_size, mask_dim=config.mask_feature_size,
        transformer_nheads=config.num_attention_heads, transformer_dim_feedforward=config.encoder_feedforward_dim,
        transformer_enc_layers=config.encoder_layers,
    )
    decoder = MaskedAttentionDecoder(
        config.feature_size, config.num_labels, hidden_dim=config.hidden_dim, num_queries=config.num_queries,
        nheads=config.num_attention_heads, dim_feedforward=config.dim_feedforward,
        dec_layers=config.decoder_layers - 1, pre_norm=config.pre_norm, mask_dim=config.mask_feature_size,
    )
    return pixel_decoder.eval(), decoder.eval()


def _features(seed, batch=2, height=64, width=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, height // s, width // s, generator=g) for c, s in zip(CHANNELS, STRIDES)]


def _compare(hf, pixel_decoder, decoder, features, mask_features_override=None):
    with torch.no_grad():
        hf_pd = hf.model.pixel_level_module.decoder(features)
        mask_features, multi_scale = pixel_decoder(features)
        torch.testing.assert_close(mask_features, hf_pd.mask_features, rtol=0, atol=ATOL)
        assert len(multi_scale) == 3
        for ours, theirs in zip(multi_scale, hf_pd.multi_scale_features):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)

        hf_mask_features = hf_pd.mask_features
        if mask_features_override is not None:
            hf_mask_features = mask_features_override(hf_mask_features)
        hf_out = hf.model.transformer_module(hf_pd.multi_scale_features, hf_mask_features)
        out = decoder(list(hf_pd.multi_scale_features), hf_mask_features)
    predictions = out["aux_outputs"] + [out]
    assert len(predictions) == len(hf_out.masks_queries_logits) == decoder.num_layers + 1
    blocked_fractions = []
    for ours, hf_masks, hf_hidden in zip(predictions, hf_out.masks_queries_logits, hf_out.intermediate_hidden_states):
        hf_logits = hf.class_predictor(hf_hidden.transpose(0, 1))
        torch.testing.assert_close(ours["pred_masks"], hf_masks, rtol=0, atol=ATOL)
        torch.testing.assert_close(ours["pred_logits"], hf_logits, rtol=0, atol=ATOL)
        blocked_fractions.append((hf_masks < 0).float().mean().item())
    return blocked_fractions


@pytest.mark.parametrize("pre_norm", [False, True])
def test_pixel_decoder_and_decoder_match_hf(pre_norm):
    torch.manual_seed(0)
    config = _hf_config(pre_norm=pre_norm)
    hf = Mask2FormerForUniversalSegmentation(config).eval()
    pixel_decoder, decoder = _mpseg_modules(config)
    convert.convert_hf(hf.state_dict(), pixel_decoder=pixel_decoder, decoder=decoder)
    fractions = _compare(hf, pixel_decoder, decoder, _features(1))
    # The masks must actually restrict attention, or the test would not exercise masked attention.
    assert all(0.05 < f < 0.95 for f in fractions), fractions


def test_decoder_with_input_projection_matches_hf():
    torch.manual_seed(1)
    config = _hf_config(hidden_dim=32, decoder_layers=4, num_queries=7)
    hf = Mask2FormerForUniversalSegmentation(config).eval()
    pixel_decoder, decoder = _mpseg_modules(config)
    assert any(k.startswith("input_proj.") for k in decoder.state_dict())
    convert.convert_hf(hf.state_dict(), pixel_decoder=pixel_decoder, decoder=decoder)
    _compare(hf, pixel_decoder, decoder, _features(2, batch=1, height=96, width=64))


def test_empty_masks_attend_everywhere_like_hf():
    # Image 1's mask features are the same vector at every pixel, so each query's mask is either all foreground or
    # all background at every layer: the all-background rows exercise Mask2Former's "attend everywhere" rule.
    torch.manual_seed(2)
    config = _hf_config()
    hf = Mask2FormerForUniversalSegmentation(config).eval()
    pixel_decoder, decoder = _mpseg_modules(config)
    convert.convert_hf(hf.state_dict(), pixel_decoder=pixel_decoder, decoder=decoder)

    def constant_image(mask_features):
        mask_features = mask_features.clone()
        mask_features[1] = torch.linspace(-1, 1, mask_features.shape[1])[:, None, None]
        return mask_features

    _compare(hf, pixel_decoder, decoder, _features(3), mask_features_override=constant_image)


def test_official_round_trip_gives_the_same_outputs(tmp_path):
    # HF -> official keys -> a detectron2-style .pkl of numpy arrays -> fresh mpseg modules: same outputs.
    import pickle

    torch.manual_seed(3)
    config = _hf_config(decoder_layers=4)
    hf = Mask2FormerForUniversalSegmentation(config).eval()
    official = convert.hf_to_official(hf.state_dict())
    assert "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight" in official
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in official.items()}, "__author__": "test"}, f)
    pixel_decoder, decoder = _mpseg_modules(config)
    parts = convert.split_official(convert.load_official_checkpoint(path), pixel_decoder=pixel_decoder, decoder=decoder)
    assert parts["noiser"] == {} and "criterion.empty_weight" in parts["extra"]
    assert any(k.startswith("swin.") for k in parts["backbone"])
    _compare(hf, pixel_decoder, decoder, _features(4))
    # and back: mpseg -> official keys reproduces the official dict exactly
    again = convert.to_official(pixel_decoder, decoder)
    heads = {k: v for k, v in official.items() if k.startswith("sem_seg_head.")}
    assert again.keys() == heads.keys()
    assert all(torch.equal(again[k], heads[k]) for k in heads)


def test_hf_model_without_class_head_reports_the_missing_key():
    config = _hf_config(decoder_layers=3)
    pixel_decoder, decoder = _mpseg_modules(config)
    with pytest.raises(KeyError, match="class_embed.weight"):
        convert.convert_hf(Mask2FormerModel(config).state_dict(), pixel_decoder=pixel_decoder, decoder=decoder)


def test_benchmark_script_runs_on_a_tiny_setting(capsys):
    # Keeps benchmarks/bench_decoder.py working (it asserts nothing itself; its agreement line is checked here).
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_decoder.py"
    spec = importlib.util.spec_from_file_location("bench_decoder", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--size", "64", "--queries", "4", "--layers", "2", "--classes", "3", "--reps", "1",
                       "--warmup", "0", "--batch", "1"])
    assert [r["case"] for r in rows] == ["decoder fwd", "decoder fwd+bwd", "pixel decoder fwd",
                                         "pixel decoder fwd+bwd"]
    assert all(r["hf_ms"] > 0 and r["mpseg_ms"] > 0 for r in rows)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("agreement"))
    errors = [float(x.rstrip(",")) for x in line.split() if x[0].isdigit()]
    assert len(errors) == 2 and max(errors) < 1e-4, line
