# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Compose Mask2Former from a timm backbone and mpseg's modules, then get semantic, panoptic and instance results.

    python examples/compose_timm.py                       # ResNet-50, 512x512, 150 classes, random weights
    python examples/compose_timm.py --backbone resnet18 --size 256

The backbone has random weights (``pretrained=False``): this shows the wiring and the output formats, not accuracy.
"""

import argparse

import timm
import torch
from torch import nn

import mpseg
from mpseg.inference import resize_mask_logits


# ---- the user code: a complete Mask2Former in a dozen lines ----
class Mask2Former(nn.Module):
    def __init__(self, num_classes: int, backbone: str = "resnet50", num_queries: int = 100) -> None:
        super().__init__()
        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        info = self.backbone.feature_info  # channels and strides 4, 8, 16, 32, finest first
        self.pixel_decoder = mpseg.MSDeformAttnPixelDecoder(info.channels(), info.reduction())
        self.decoder = mpseg.MaskedAttentionDecoder(256, num_classes, num_queries=num_queries)

    def forward(self, images: torch.Tensor, pilot=None) -> dict:
        mask_features, multi_scale_features = self.pixel_decoder(self.backbone(images))
        return self.decoder(multi_scale_features, mask_features, pilot)


def predict(model: Mask2Former, image: torch.Tensor, is_thing: list[bool]) -> dict:
    """Semantic map, panoptic segmentation and instances for one [3, H, W] image."""
    with torch.no_grad():
        out = model(image[None])
    size = image.shape[-2:]
    logits = out["pred_logits"][0]
    masks = resize_mask_logits(out["pred_masks"][0], size, size)  # no padding here: padded size = image size
    return {
        "semantic": mpseg.semantic_inference(logits, masks).argmax(0),
        "panoptic": mpseg.panoptic_inference(logits, masks, is_thing=is_thing),
        "instances": mpseg.instance_inference(logits, masks, topk=100),
    }
# ---- end of user code ----


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num-classes", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model = Mask2Former(args.num_classes, args.backbone).eval()
    image = torch.rand(3, args.size, args.size)
    is_thing = [k % 2 == 0 for k in range(args.num_classes)]  # pretend even classes are things
    result = predict(model, image, is_thing)

    panoptic_seg, segments = result["panoptic"]
    instances = result["instances"]
    print(f"semantic map {tuple(result['semantic'].shape)}, classes present: {result['semantic'].unique().numel()}")
    print(f"panoptic map {tuple(panoptic_seg.shape)}, {len(segments)} segments")
    print(f"instances: {len(instances['scores'])}, best score {instances['scores'].max().item():.3f}")
    return result


if __name__ == "__main__":
    main()
