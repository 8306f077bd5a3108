# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask-piloted training end to end: noiser -> decoder -> criterion, on small random inputs.

The central property of MP-Former is that the pilots help training without leaking into the matching queries, so
inference is exactly Mask2Former. The leak tests compare the matching outputs with and without pilots (and under
different pilots), and use a pilot without the self-attention separation as a control that must leak.
"""

import copy

import pytest
import torch

from mpseg import HungarianMatcher, MaskedAttentionDecoder, MaskPilot, MaskPilotNoiser, SetCriterion, layer_consistency

# Every test runs on the CPU and, where a GPU is present, on CUDA (the device fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("device")

K = 4  # classes


def _decoder(nheads=8, hidden=32, dec_layers=3, seed=0):
    torch.manual_seed(seed)
    return MaskedAttentionDecoder(hidden, K, hidden_dim=hidden, num_queries=6, nheads=nheads,
                                  dim_feedforward=64, dec_layers=dec_layers, mask_dim=hidden)


def _inputs(hidden=32, batch=2, seed=1):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    feats = [torch.randn(batch, hidden, s, s, generator=g) for s in (4, 8, 16)]
    return feats, torch.randn(batch, hidden, 32, 32, generator=g)


def _targets(seed=2, counts=(3, 1), size=64):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    out = []
    for n in counts:
        masks = torch.zeros(n, size, size)
        for j in range(n):
            y, x = torch.randint(0, size - 16, (2,), generator=g).tolist()
            masks[j, y:y + 16, x:x + 20] = 1.0
        out.append({"labels": torch.randint(0, K, (n,), generator=g), "masks": masks})
    return out


def _main_outputs(out):
    preds = [out["pred_logits"], out["pred_masks"]]
    for aux in out["aux_outputs"]:
        preds += [aux["pred_logits"], aux["pred_masks"]]
    return preds


class _LeakyPilot(MaskPilot):
    """A pilot without the separation: every query sees every other (the control for the leak tests)."""

    def self_attn_mask(self, num_queries):
        n = self.num_pilots + num_queries
        return torch.zeros(n, n, dtype=torch.bool)


def _with_queries(pilot, queries, cls=None):
    other = copy.copy(pilot)
    if cls is not None:
        other.__class__ = cls
    other.pilot_queries = queries
    return other


@pytest.mark.parametrize("nheads,hidden", [(8, 32), (6, 48)])
def test_matching_outputs_do_not_see_pilots(nheads, hidden):
    decoder = _decoder(nheads, hidden)
    feats, mask_features = _inputs(hidden)
    targets = _targets()
    noiser = MaskPilotNoiser(K, hidden, num_groups=2, per_head_noise=True)
    pilot_a = noiser(targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    # Different content and different masks (other targets, same counts so Np is equal).
    pilot_b = noiser(_targets(seed=9), generator=torch.Generator(torch.get_default_device()).manual_seed(1))
    with torch.no_grad():
        plain = _main_outputs(decoder(feats, mask_features))
        out_a = decoder(feats, mask_features, pilot=pilot_a)
        out_b = decoder(feats, mask_features, pilot=pilot_b)
    for x, y, z in zip(plain, _main_outputs(out_a), _main_outputs(out_b)):
        torch.testing.assert_close(y, x, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(z, x, atol=2e-5, rtol=1e-5)
    # The pilots themselves do depend on their input.
    assert not torch.allclose(out_a["pilot_outputs"]["pred_masks"], out_b["pilot_outputs"]["pred_masks"])
    np_ = pilot_a.num_pilots
    assert out_a["pilot_outputs"]["pred_logits"].shape == (2, np_, K + 1)
    assert out_a["pilot_outputs"]["pred_masks"].shape == (2, np_, 32, 32)
    assert len(out_a["pilot_outputs"]["aux_outputs"]) == 3
    assert torch.equal(out_a["pilot_outputs"]["target_index"], pilot_a.target_index)


def test_control_without_separation_leaks():
    decoder = _decoder()
    feats, mask_features = _inputs()
    pilot = MaskPilotNoiser(K, 32)(_targets(), generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    leaky_a = _with_queries(pilot, pilot.pilot_queries.detach(), _LeakyPilot)
    leaky_b = _with_queries(pilot, pilot.pilot_queries.detach() + 1.0, _LeakyPilot)
    sealed_b = _with_queries(pilot, pilot.pilot_queries.detach() + 1.0)
    with torch.no_grad():
        a = _main_outputs(decoder(feats, mask_features, pilot=leaky_a))
        b = _main_outputs(decoder(feats, mask_features, pilot=leaky_b))
        s_a = _main_outputs(decoder(feats, mask_features, pilot=pilot))
        s_b = _main_outputs(decoder(feats, mask_features, pilot=sealed_b))
    # The initial prediction (aux 0, entries 2-3) comes before any attention; every later one must move.
    later = [0, 1] + list(range(4, len(a)))
    assert torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
    assert all((a[i] - b[i]).abs().max() > 1e-3 for i in later)
    assert all(torch.allclose(x, y, atol=2e-5) for x, y in zip(s_a, s_b))


def test_gradient_reaches_label_enc_only_through_pilot_losses():
    decoder = _decoder()
    feats, mask_features = _inputs()
    targets = _targets()
    noiser = MaskPilotNoiser(K, 32, num_groups=2)
    criterion = SetCriterion(K, HungarianMatcher(num_points=256), num_points=256)
    gen = torch.Generator(torch.get_default_device()).manual_seed(0)
    pilot = noiser(targets, generator=gen)
    losses = criterion(decoder(feats, mask_features, pilot=pilot), targets, generator=gen)
    mp_keys = [k for k in losses if "_mp" in k]
    assert {"loss_ce_mp", "loss_mask_mp", "loss_dice_mp"} <= set(mp_keys)
    assert {f"loss_dice_mp_{i}" for i in range(3)} <= set(mp_keys)
    matching = sum(v for k, v in losses.items() if k != "loss" and "_mp" not in k)
    grad_matching, = torch.autograd.grad(matching, noiser.label_enc.weight, retain_graph=True, allow_unused=True)
    assert grad_matching is None or torch.count_nonzero(grad_matching) == 0  # no path from pilots to matching losses
    piloted = sum(v for k, v in losses.items() if "_mp" in k)
    grad_pilot, = torch.autograd.grad(piloted, noiser.label_enc.weight)
    used = pilot.noised_labels[pilot.valid].unique()
    assert torch.all(grad_pilot[used].abs().sum(-1) > 0)
    # The total loss carries it too, weighted as documented (2/5/5 for the _mp terms).
    assert criterion.weight("loss_ce_mp") == 2.0 and criterion.weight("loss_dice_mp_1") == 5.0


def test_pilot_layers_limits_pilot_predictions_and_losses():
    decoder = _decoder(dec_layers=4)
    feats, mask_features = _inputs()
    targets = _targets()
    pilot = MaskPilotNoiser(K, 32, pilot_layers=2)(targets)
    out = decoder(feats, mask_features, pilot=pilot)
    # Initial prediction + layers 0 and 1 -> 3 pilot predictions: 2 aux + the last one.
    assert len(out["pilot_outputs"]["aux_outputs"]) == 2 and len(out["aux_outputs"]) == 4
    with torch.no_grad():
        plain = _main_outputs(decoder(feats, mask_features))
    for x, y in zip(plain, _main_outputs(out)):
        torch.testing.assert_close(y.detach(), x, atol=2e-5, rtol=1e-5)
    losses = SetCriterion(K, HungarianMatcher(num_points=128), num_points=128)(out, targets)
    assert "loss_ce_mp_1" in losses and "loss_ce_mp_2" not in losses and "loss_ce_3" in losses


def test_zero_object_batch_and_padding_slots_train():
    decoder = _decoder()
    feats, mask_features = _inputs()
    noiser = MaskPilotNoiser(K, 32)
    criterion = SetCriterion(K, HungarianMatcher(num_points=128), num_points=128)
    params = list(decoder.parameters()) + list(noiser.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    empty = [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 64, 64)} for _ in range(2)]
    before = [p.detach().clone() for p in decoder.parameters()]
    for targets in (empty, _targets(counts=(0, 2))):
        pilot = noiser(targets)
        assert (pilot is None) == (targets is empty)
        losses = criterion(decoder(feats, mask_features, pilot=pilot), targets)
        loss = losses["loss"] + noiser.dummy_loss()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, decoder.parameters()))
    # In the mixed batch, image 0 has only padding slots: trained as no-object by loss_ce_mp, no mask loss.
    assert pilot.target_index[0].tolist() == [-1, -1]
    assert "loss_ce_mp" in losses and torch.isfinite(losses["loss_mask_mp"])


def test_same_seed_same_noise_end_to_end():
    decoder = _decoder()
    feats, mask_features = _inputs()
    targets = _targets()
    noiser = MaskPilotNoiser(K, 32, point_noise=0.5, label_noise=0.5)
    criterion = SetCriterion(K, HungarianMatcher(num_points=128), num_points=128)

    def run(noise_seed):
        pilot = noiser(targets, generator=torch.Generator(torch.get_default_device()).manual_seed(noise_seed))
        with torch.no_grad():
            out = decoder(feats, mask_features, pilot=pilot)
            return criterion(out, targets, generator=torch.Generator(torch.get_default_device()).manual_seed(0))

    a, b, c = run(3), run(3), run(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if "_mp" in k)
    assert all(torch.equal(a[k], c[k]) for k in a if "_mp" not in k and k != "loss")  # matching side untouched


def test_layer_consistency_with_real_matcher():
    decoder = _decoder()
    feats, mask_features = _inputs()
    targets = _targets()
    with torch.no_grad():
        out = decoder(feats, mask_features)
    stats = layer_consistency(out, targets, HungarianMatcher(num_points=256), generator=torch.Generator(torch.get_default_device()))
    assert len(stats["iou"]) == 3 and stats["num_targets"] == 4
    assert all(0.0 <= v <= 1.0 for v in stats["iou"] + stats["same_query"])
    final = {"pred_logits": out["pred_logits"], "pred_masks": out["pred_masks"]}
    same = layer_consistency(dict(final, aux_outputs=[final]), targets, HungarianMatcher(num_points=256),
                             generator=torch.Generator(torch.get_default_device()).manual_seed(0))
    assert same["iou"] == [1.0]
