# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
import math

import pytest
import torch

from mpseg.layers.position_encoding import PositionEmbeddingSine



def test_hand_computed_values_without_normalisation():
    pe = PositionEmbeddingSine(num_pos_feats=4, temperature=10000, normalize=False)
    out = pe(torch.zeros(1, 7, 2, 3))
    assert out.shape == (1, 8, 2, 3)
    # channels per axis: sin(p), cos(p), sin(p / 100), cos(p / 100) since 10000 ** (2 * 1 / 4) = 100
    for y in range(2):
        for x in range(3):
            py, px = y + 1.0, x + 1.0
            expected = [math.sin(py), math.cos(py), math.sin(py / 100), math.cos(py / 100),
                        math.sin(px), math.cos(px), math.sin(px / 100), math.cos(px / 100)]
            torch.testing.assert_close(out[0, :, y, x], torch.tensor(expected), rtol=0, atol=1e-6)


def test_normalised_positions_span_zero_to_two_pi():
    pe = PositionEmbeddingSine(num_pos_feats=2, normalize=True)
    out = pe(torch.zeros(1, 1, 4, 5))
    # channel 0 is sin(2*pi*y/H), channel 2 is sin(2*pi*x/W) (dim_t = 1 for the first pair)
    ys = torch.arange(1, 5, dtype=torch.float32) / (4 + 1e-6) * 2 * math.pi
    xs = torch.arange(1, 6, dtype=torch.float32) / (5 + 1e-6) * 2 * math.pi
    torch.testing.assert_close(out[0, 0, :, 0], ys.sin(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0, 3, 0, :], xs.cos(), rtol=0, atol=1e-6)


def test_padding_mask_counts_only_valid_pixels():
    pe = PositionEmbeddingSine(num_pos_feats=8, normalize=True)
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[1, :, 4:] = True  # image 1 is 4 wide, padded to 6
    mask[1, 3:, :] = True  # and 3 high, padded to 4
    out = pe(torch.zeros(2, 3, 4, 6), mask)
    cropped = pe(torch.zeros(1, 3, 3, 4))
    torch.testing.assert_close(out[1, :, :3, :4], cropped[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], pe(torch.zeros(1, 3, 4, 6))[0], rtol=0, atol=1e-6)
    assert torch.isfinite(pe(torch.zeros(1, 3, 4, 6), torch.ones(1, 4, 6, dtype=torch.bool))).all()


@pytest.mark.parametrize("size", [(5, 7), (16, 16), (1, 9)])
def test_matches_transformers(size):
    from transformers.models.mask2former.modeling_mask2former import Mask2FormerSinePositionEmbedding

    x = torch.randn(2, 3, *size)
    ref = Mask2FormerSinePositionEmbedding(num_position_features=32, normalize=True)(x.shape, x.device, x.dtype)
    torch.testing.assert_close(PositionEmbeddingSine(32)(x), ref, rtol=0, atol=2e-6)


def test_half_precision_input_is_computed_in_float32():
    pe = PositionEmbeddingSine(16)
    out = pe(torch.zeros(1, 2, 9, 11, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, pe(torch.zeros(1, 2, 9, 11)).to(torch.bfloat16))


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_pos_feats"):
        PositionEmbeddingSine(7)
    with pytest.raises(ValueError, match="scale"):
        PositionEmbeddingSine(8, normalize=False, scale=1.0)
    with pytest.raises(ValueError, match="mask"):
        PositionEmbeddingSine(8)(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        PositionEmbeddingSine(8)(torch.zeros(1, 2, 3, 4), torch.zeros(1, 3, 4))
