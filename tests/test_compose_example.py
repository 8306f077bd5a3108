# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Runs examples/compose_timm.py with a small timm backbone and checks its outputs against a by-hand computation."""

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compose_timm.py"



def _load():
    spec = importlib.util.spec_from_file_location("compose_timm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_code_is_short():
    text = EXAMPLE.read_text().split("# ---- the user code")[1].split("# ---- end of user code")[0]
    lines = [line for line in text.splitlines()[1:] if line.strip() and not line.strip().startswith("#")]
    assert len(lines) < 30, len(lines)


def test_example_runs_and_matches_a_manual_computation(capsys):
    example = _load()
    result = example.main(["--backbone", "resnet18", "--size", "64", "--num-classes", "5"])
    assert "semantic map (64, 64)" in capsys.readouterr().out

    torch.manual_seed(0)  # main() builds the same model and image from seed 0
    model = example.Mask2Former(5, "resnet18").eval()
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        feats = model.backbone(image[None])
        assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]
        mask_features, multi_scale = model.pixel_decoder(feats)
        out = model.decoder(multi_scale, mask_features)
    masks = F.interpolate(out["pred_masks"], size=(64, 64), mode="bilinear", align_corners=False)[0]
    probs = out["pred_logits"][0].softmax(-1)[:, :-1]
    semantic = torch.einsum("qk,qhw->khw", probs, masks.sigmoid()).argmax(0)
    assert torch.equal(result["semantic"], semantic)

    instances = result["instances"]
    assert instances["masks"].shape == (100, 64, 64) and instances["masks"].dtype == torch.bool
    assert ((instances["scores"] >= 0) & (instances["scores"] <= 1)).all()
    assert ((instances["labels"] >= 0) & (instances["labels"] < 5)).all()
    best = probs.flatten().argmax()
    assert instances["labels"][0] == best % 5
    assert torch.equal(instances["masks"][0], masks[best // 5] > 0)

    panoptic_seg, segments = result["panoptic"]
    assert panoptic_seg.shape == (64, 64)
    assert set(panoptic_seg.unique().tolist()) <= {0} | {s["id"] for s in segments}
