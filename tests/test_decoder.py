# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""MaskedAttentionDecoder: official layout, Mask2Former's rules, and the pilot (MP-Former) path with a stand-in pilot
that implements the MaskPilot interface (so these tests do not depend on the noiser)."""

import pytest
import torch
import torch.nn.functional as F

from mpseg.layers.decoder import MaskedAttentionDecoder

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")

C, K, Q, HEADS, LAYERS = 32, 4, 6, 4, 5
SIZES = [(3, 2), (6, 4), (12, 8)]
MASK_SIZE = (24, 16)



def _decoder(**kwargs):
    torch.manual_seed(0)
    args = dict(hidden_dim=C, num_queries=Q, nheads=HEADS, dim_feedforward=48, dec_layers=LAYERS, mask_dim=C)
    args.update(kwargs)
    return MaskedAttentionDecoder(C, K, **args).eval()


def _inputs(batch=2, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    feats = [torch.randn(batch, C, h, w, generator=g) for h, w in SIZES]
    return feats, torch.randn(batch, C, *MASK_SIZE, generator=g)


def _all_predictions(out):
    return out["aux_outputs"] + [{"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}]


class FakePilot:
    """Implements PLAN.md's MaskPilot interface from fixed GT masks; ``separate=False`` removes the self-attention
    separation (the control for the no-leak test)."""

    def __init__(self, queries, gt_masks, num_groups=1, pilot_layers=None, separate=True, per_head=False, seed=0):
        self.pilot_queries = queries
        self.num_groups = num_groups
        batch, num_pilots = queries.shape[:2]
        self.target_index = torch.arange(num_pilots).remainder(num_pilots // num_groups).expand(batch, -1).clone()
        self.valid = self.target_index >= 0
        self.pilot_layers = pilot_layers
        self.gt_masks = gt_masks  # [B, Np, H, W] bool
        self.separate = separate
        self.per_head = per_head
        self.generator = torch.Generator(torch.get_default_device()).manual_seed(seed)
        self.calls = []

    @property
    def num_pilots(self):
        return self.pilot_queries.shape[1]

    def active(self, layer):
        return self.pilot_layers is None or layer < self.pilot_layers

    def self_attn_mask(self, num_queries):
        n, size = self.num_pilots, self.num_pilots + num_queries
        blocked = torch.zeros(size, size, dtype=torch.bool)
        if self.separate:
            blocked[n:, :n] = True
            group = torch.arange(n) // (n // self.num_groups)
            blocked[:n, :n] = group[:, None] != group[None, :]
        return blocked

    def cross_attn_mask(self, layer, size, num_heads):
        self.calls.append((layer, tuple(size), num_heads))
        resized = F.adaptive_avg_pool2d(self.gt_masks.float(), size) > 0
        blocked = ~resized.flatten(2).unsqueeze(1)
        if self.per_head:
            noise = torch.rand(blocked.shape[0], num_heads, *blocked.shape[2:], generator=self.generator) < 0.2
            blocked = blocked ^ noise
        return blocked


def _pilot(batch=2, groups=2, per_group=3, seed=1, **kwargs):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    n = groups * per_group
    queries = torch.randn(batch, n, C, generator=g)
    gt = torch.rand(batch, per_group, *MASK_SIZE, generator=g) < 0.3
    return FakePilot(queries, gt.repeat(1, groups, 1, 1), num_groups=groups, seed=seed, **kwargs)


# ---------------------------------------------------------------------------------------------- official layout
def test_state_dict_keys_equal_the_official_module():
    sd = _decoder(dec_layers=2).state_dict()
    expected = {"decoder_norm.weight": (C,), "decoder_norm.bias": (C,), "query_feat.weight": (Q, C),
                "query_embed.weight": (Q, C), "level_embed.weight": (3, C), "class_embed.weight": (K + 1, C),
                "class_embed.bias": (K + 1,)}
    for j in range(3):
        expected[f"mask_embed.layers.{j}.weight"] = (C, C)
        expected[f"mask_embed.layers.{j}.bias"] = (C,)
    for i in range(2):
        for group, attn in (("transformer_self_attention_layers", "self_attn"),
                            ("transformer_cross_attention_layers", "multihead_attn")):
            p = f"{group}.{i}."
            expected.update({p + attn + ".in_proj_weight": (3 * C, C), p + attn + ".in_proj_bias": (3 * C,),
                             p + attn + ".out_proj.weight": (C, C), p + attn + ".out_proj.bias": (C,),
                             p + "norm.weight": (C,), p + "norm.bias": (C,)})
        p = f"transformer_ffn_layers.{i}."
        expected.update({p + "linear1.weight": (48, C), p + "linear1.bias": (48,), p + "linear2.weight": (C, 48),
                         p + "linear2.bias": (C,), p + "norm.weight": (C,), p + "norm.bias": (C,)})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected

    projected = _decoder(dec_layers=1, enforce_input_project=True).state_dict()
    assert {k for k in projected if k.startswith("input_proj")} == {
        f"input_proj.{i}.{n}" for i in range(3) for n in ("weight", "bias")}
    assert "query_embed.weight" not in _decoder(dec_layers=1, query_pos=False).state_dict()


def test_output_structure():
    out = _decoder()(*_inputs())
    assert out["pred_logits"].shape == (2, Q, K + 1)
    assert out["pred_masks"].shape == (2, Q, *MASK_SIZE)
    assert len(out["aux_outputs"]) == LAYERS
    assert all(a["pred_masks"].shape == (2, Q, *MASK_SIZE) for a in out["aux_outputs"])
    assert "pilot_outputs" not in out


def test_level_cycling_and_mask_resolution():
    dec = _decoder()
    seen = []
    for layer in dec.transformer_cross_attention_layers:
        layer.register_forward_hook(lambda m, args, out: seen.append((args[1].shape[1], args[3].shape[-1])))
    dec(*_inputs())
    # layer i attends level i % 3 with a mask made at that level's size
    assert seen == [(SIZES[i % 3][0] * SIZES[i % 3][1],) * 2 for i in range(LAYERS)]


def test_empty_masks_attend_everywhere_and_never_give_nan():
    # Masks that are background everywhere and masks that are foreground everywhere both mean "attend everywhere",
    # so the class logits (which only see the attention results) must be identical, and finite.
    dec = _decoder()
    feats, _ = _inputs()
    ones = torch.ones(2, C, *MASK_SIZE)
    with torch.no_grad():
        dec.mask_embed.layers[2].weight.zero_()
        dec.mask_embed.layers[2].bias.fill_(-1.0)
        blocked = dec(feats, ones)
        dec.mask_embed.layers[2].bias.fill_(1.0)
        allowed = dec(feats, ones)
    assert (blocked["pred_masks"] < 0).all() and (allowed["pred_masks"] > 0).all()
    for a, b in zip(_all_predictions(blocked), _all_predictions(allowed)):
        assert torch.isfinite(a["pred_logits"]).all()
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
    # and the masks do matter when they are not empty
    assert (dec(*_inputs())["pred_logits"] - allowed["pred_logits"]).abs().max() > 1e-3


def test_extreme_inputs_stay_finite():
    dec = _decoder(pre_norm=True)
    feats, mask_features = _inputs()
    mask_features = mask_features.sign() * 1e4
    out = dec([f * 1e3 for f in feats], mask_features)
    for pred in _all_predictions(out):
        assert torch.isfinite(pred["pred_logits"]).all() and not torch.isnan(pred["pred_masks"]).any()


def test_query_pos_false_equals_zero_query_embedding():
    with_pos = _decoder()
    without = _decoder(query_pos=False)
    with torch.no_grad():
        with_pos.query_embed.weight.zero_()
    state = {k: v for k, v in with_pos.state_dict().items() if k != "query_embed.weight"}
    without.load_state_dict(state)
    inputs = _inputs()
    for a, b in zip(_all_predictions(with_pos(*inputs)), _all_predictions(without(*inputs))):
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=0, atol=1e-5)


def test_gradients_and_autocast():
    dec = _decoder().train()
    out = dec(*_inputs())
    loss = sum(p["pred_logits"].square().mean() + p["pred_masks"].sigmoid().mean() for p in _all_predictions(out))
    loss.backward()
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    dec.eval()
    with torch.no_grad():
        ref = dec(*_inputs())
        with torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16):
            low = dec(*_inputs())
    assert low["pred_logits"].dtype == torch.bfloat16
    assert torch.isfinite(low["pred_logits"].float()).all()
    torch.testing.assert_close(low["aux_outputs"][0]["pred_logits"].float(), ref["aux_outputs"][0]["pred_logits"],
                               rtol=0.05, atol=0.1)


def test_exports_without_graph_breaks():
    dec = _decoder(dec_layers=2)
    inputs = _inputs(batch=1)
    program = torch.export.export(dec, (list(inputs[0]), inputs[1]))
    torch.testing.assert_close(program.module()(list(inputs[0]), inputs[1])["pred_logits"],
                               dec(*inputs)["pred_logits"], rtol=0, atol=1e-5)


def test_bad_inputs_name_the_argument():
    dec = _decoder()
    feats, mask_features = _inputs()
    with pytest.raises(ValueError, match="list of 3 maps"):
        dec(feats[:2], mask_features)
    with pytest.raises(ValueError, match=r"features\[1\] must have shape \[2, 32, H, W\]"):
        dec([feats[0], feats[1][:1], feats[2]], mask_features)
    with pytest.raises(ValueError, match="mask_features"):
        dec(feats, mask_features[:, :5])
    with pytest.raises(ValueError, match="divisible"):
        MaskedAttentionDecoder(32, 3, hidden_dim=30, nheads=4)


# ---------------------------------------------------------------------------------------------- pilots
def test_pilot_does_not_leak_into_matching_queries():
    dec = _decoder()
    inputs = _inputs()
    with torch.no_grad():
        plain = dec(*inputs)
        first = dec(*inputs, pilot=_pilot(seed=1))
        second = dec(*inputs, pilot=_pilot(seed=2, per_head=True))  # other content, other masks
    for a, b, c in zip(_all_predictions(plain), _all_predictions(first), _all_predictions(second)):
        torch.testing.assert_close(b["pred_logits"], c["pred_logits"], rtol=0, atol=1e-6)
        torch.testing.assert_close(b["pred_masks"], c["pred_masks"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=0, atol=1e-4)
    # the pilots themselves did change
    assert (first["pilot_outputs"]["pred_logits"] - second["pilot_outputs"]["pred_logits"]).abs().max() > 1e-3


def test_control_without_separation_leaks():
    dec = _decoder()
    inputs = _inputs()
    with torch.no_grad():
        plain = dec(*inputs)
        leaky = dec(*inputs, pilot=_pilot(separate=False))
    assert (plain["pred_logits"] - leaky["pred_logits"]).abs().max() > 1e-3


def test_pilot_groups_do_not_see_each_other():
    # Group 1's outputs must not depend on group 0's content.
    dec = _decoder()
    inputs = _inputs()
    a, b = _pilot(seed=3), _pilot(seed=3)
    with torch.no_grad():
        b.pilot_queries[:, :3] += 5.0
        out_a, out_b = dec(*inputs, pilot=a), dec(*inputs, pilot=b)
    pa, pb = out_a["pilot_outputs"], out_b["pilot_outputs"]
    torch.testing.assert_close(pa["pred_logits"][:, 3:], pb["pred_logits"][:, 3:], rtol=0, atol=1e-5)
    assert (pa["pred_logits"][:, :3] - pb["pred_logits"][:, :3]).abs().max() > 1e-3


def test_pilot_outputs_structure_and_layer_schedule():
    dec = _decoder()
    pilot = _pilot(pilot_layers=2)
    out = dec(*_inputs(), pilot=pilot)
    po = out["pilot_outputs"]
    assert po["pred_logits"].shape == (2, 6, K + 1) and po["pred_masks"].shape == (2, 6, *MASK_SIZE)
    assert len(po["aux_outputs"]) == 2  # initial prediction + layers 0, 1: three pilot predictions in all
    assert torch.equal(po["target_index"], pilot.target_index) and po["num_groups"] == 2
    assert len(out["aux_outputs"]) == LAYERS and out["pred_logits"].shape == (2, Q, K + 1)
    # the pilot masks are asked for at each piloted layer's level size, with the decoder's head count
    assert pilot.calls == [(0, SIZES[0], HEADS), (1, SIZES[1], HEADS)]

    every = _pilot()
    assert len(dec(*_inputs(), pilot=every)["pilot_outputs"]["aux_outputs"]) == LAYERS
    assert [c[0] for c in every.calls] == list(range(LAYERS))
    assert len(dec(*_inputs(), pilot=_pilot(pilot_layers=0))["pilot_outputs"]["aux_outputs"]) == 0


def test_pilot_cross_attention_follows_the_pilot_masks_and_has_no_query_pos():
    dec = _decoder()
    gt = torch.zeros(2, 3, *MASK_SIZE, dtype=torch.bool)
    gt[:, :, :8] = True  # objects in the top third: the top row of the 3x2 level
    pilot = FakePilot(torch.randn(2, 3, C, generator=torch.Generator(torch.get_default_device()).manual_seed(5)), gt)
    captured = []
    dec.transformer_cross_attention_layers[0].register_forward_hook(lambda m, a, out: captured.append(out[:, :3]))
    feats, mask_features = _inputs()
    allowed = F.adaptive_avg_pool2d(pilot.gt_masks.float(), SIZES[0]) > 0  # [B, 3, h, w]
    outside = ~allowed.any(1, keepdim=True)
    assert outside.any() and (~outside).any()
    with torch.no_grad():
        dec(feats, mask_features, pilot=pilot)
        moved_outside = [feats[0] + 3.0 * outside * torch.randn_like(feats[0]), feats[1], feats[2]]
        dec(moved_outside, mask_features, pilot=pilot)
        moved_inside = [feats[0] + 3.0 * (~outside) * torch.randn_like(feats[0]), feats[1], feats[2]]
        dec(moved_inside, mask_features, pilot=pilot)
        dec.query_embed.weight.add_(1.0)  # pilots carry no query position: their first cross-attention ignores it
        dec(feats, mask_features, pilot=pilot)
    torch.testing.assert_close(captured[0], captured[1], rtol=0, atol=1e-6)
    assert (captured[0] - captured[2]).abs().max() > 1e-3
    torch.testing.assert_close(captured[0], captured[3], rtol=0, atol=1e-6)


def test_pilot_gradients_and_empty_pilot():
    dec = _decoder().train()
    pilot = _pilot()
    pilot.pilot_queries.requires_grad_(True)
    out = dec(*_inputs(), pilot=pilot)
    out["pilot_outputs"]["pred_logits"].sum().backward()
    assert pilot.pilot_queries.grad is not None and pilot.pilot_queries.grad.abs().sum() > 0

    empty = FakePilot(torch.zeros(2, 0, C), torch.zeros(2, 0, *MASK_SIZE, dtype=torch.bool))
    out = dec(*_inputs(), pilot=empty)
    assert out["pilot_outputs"]["pred_logits"].shape == (2, 0, K + 1)
    torch.testing.assert_close(out["pred_logits"], dec(*_inputs())["pred_logits"], rtol=0, atol=1e-5)


def test_malformed_pilot_masks_are_rejected():
    dec = _decoder()
    pilot = _pilot()
    pilot.cross_attn_mask = lambda layer, size, heads: torch.zeros(2, 1, 6, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match="cross_attn_mask"):
        dec(*_inputs(), pilot=pilot)
    pilot = _pilot()
    pilot.self_attn_mask = lambda q: torch.zeros(q, q, dtype=torch.bool)
    with pytest.raises(ValueError, match="self_attn_mask"):
        dec(*_inputs(), pilot=pilot)
    pilot = _pilot()
    pilot.pilot_queries = torch.zeros(2, 6, C + 1)
    with pytest.raises(ValueError, match="pilot_queries"):
        dec(*_inputs(), pilot=pilot)
