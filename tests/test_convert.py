# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
import pickle

import pytest
import torch
from torch import nn

from mpseg import convert
from mpseg.layers.decoder import MaskedAttentionDecoder
from mpseg.layers.pixel_decoder import MSDeformAttnPixelDecoder



def _modules(seed=0, query_pos=True):
    torch.manual_seed(seed)
    pd = MSDeformAttnPixelDecoder([32, 64, 128, 256], [4, 8, 16, 32], conv_dim=32, mask_dim=32, transformer_nheads=4,
                                  transformer_dim_feedforward=48, transformer_enc_layers=1)
    dec = MaskedAttentionDecoder(32, 3, hidden_dim=32, num_queries=5, nheads=4, dim_feedforward=48, dec_layers=2,
                                 mask_dim=32, query_pos=query_pos)
    return pd, dec


class _Noiser(nn.Module):  # stands in for MaskPilotNoiser: owns MP-Former's label_enc
    def __init__(self):
        super().__init__()
        self.label_enc = nn.Embedding(3, 32)


def _official(seed=0, mp_former=False):
    pd, dec = _modules(seed, query_pos=not mp_former)
    sd = convert.to_official(pd, dec, _Noiser() if mp_former else None)
    sd["backbone.res2.conv1.weight"] = torch.randn(8, 3, 3, 3)
    sd["criterion.empty_weight"] = torch.ones(4)
    sd["pixel_mean"] = torch.zeros(3, 1, 1)
    return sd, pd, dec


def test_split_official_loads_identical_weights():
    sd, pd, dec = _official()
    fresh_pd, fresh_dec = _modules(seed=1)
    parts = convert.split_official(sd, pixel_decoder=fresh_pd, decoder=fresh_dec)
    for a, b in ((pd, fresh_pd), (dec, fresh_dec)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert parts["backbone"].keys() == {"res2.conv1.weight"}
    assert parts["extra"].keys() == {"criterion.empty_weight", "pixel_mean"}
    assert parts["noiser"] == {}


def test_old_static_query_name_is_renamed():
    sd, _, dec = _official()
    sd["sem_seg_head.predictor.static_query.weight"] = sd.pop("sem_seg_head.predictor.query_feat.weight")
    _, fresh = _modules(seed=4)
    convert.split_official(sd, decoder=fresh)
    assert torch.equal(fresh.query_feat.weight, dec.query_feat.weight)


def test_mp_former_checkpoint_splits_label_enc_to_the_noiser(tmp_path):
    sd, _, _ = _official(mp_former=True)
    assert "sem_seg_head.predictor.label_enc.weight" in sd and "sem_seg_head.predictor.query_embed.weight" not in sd
    noiser = _Noiser()
    pd, dec = _modules(seed=2, query_pos=False)
    path = tmp_path / "mp.pth"
    torch.save({"model": sd, "iteration": 5}, path)
    parts = convert.split_official(convert.load_official_checkpoint(path), pixel_decoder=pd, decoder=dec, noiser=noiser)
    assert parts["noiser"].keys() == {"label_enc.weight"}
    assert torch.equal(noiser.label_enc.weight, sd["sem_seg_head.predictor.label_enc.weight"])


def test_detectron2_pickle_with_numpy_arrays(tmp_path):
    sd, pd, dec = _official()
    path = tmp_path / "model.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "__author__": "Detectron2"}, f)
    loaded = convert.load_official_checkpoint(path)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_missing_unexpected_and_misshapen_keys_are_named():
    sd, _, _ = _official()
    pd, dec = _modules()
    broken = dict(sd)
    del broken["sem_seg_head.predictor.decoder_norm.weight"]
    broken["sem_seg_head.predictor.extra_head.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys: \['decoder_norm.weight'\].*unexpected keys: \['extra_head"):
        convert.split_official(broken, pixel_decoder=pd, decoder=dec)
    wrong = dict(sd)
    wrong["sem_seg_head.pixel_decoder.mask_features.weight"] = torch.zeros(16, 32, 1, 1)
    message = r"mask_features.weight: checkpoint \(16, 32, 1, 1\) vs module \(32, 32, 1, 1\)"
    with pytest.raises(ValueError, match=message):
        convert.split_official(wrong, pixel_decoder=pd)
    with pytest.raises(KeyError, match="not a Mask2Former checkpoint"):
        convert.split_official({"backbone.x": torch.zeros(1)})
    # a Mask2Former checkpoint into an MP-Former-style decoder (no query_embed) says which key is extra
    _, no_pos = _modules(query_pos=False)
    with pytest.raises(KeyError, match="query_embed.weight"):
        convert.split_official(sd, decoder=no_pos)


def test_hf_converter_packs_qkv_and_rejects_unknown_keys():
    q, k, v = (torch.full((4, 4), float(i)) for i in range(3))
    hf = {f"model.transformer_module.decoder.layers.0.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))}
    hf.update({f"model.transformer_module.decoder.layers.0.self_attn.{n}_proj.bias": torch.full((4,), float(i))
               for i, n in enumerate("qkv")})
    hf["class_predictor.weight"] = torch.zeros(3, 4)
    out = convert.hf_to_official(hf)
    packed = out["sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight"]
    assert torch.equal(packed, torch.cat([q, k, v]))
    assert out["sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_bias"].tolist() == \
        [0.0] * 4 + [1.0] * 4 + [2.0] * 4
    assert "sem_seg_head.predictor.class_embed.weight" in out
    with pytest.raises(KeyError, match="model.transformer_module.something_new"):
        convert.hf_to_official({**hf, "model.transformer_module.something_new": torch.zeros(1)})
    del hf["model.transformer_module.decoder.layers.0.self_attn.k_proj.bias"]
    with pytest.raises(KeyError, match="q, k and v"):
        convert.hf_to_official(hf)
