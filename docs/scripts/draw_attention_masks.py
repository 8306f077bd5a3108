# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Draw docs/_static/attention_masks.png: where a matching query and a pilot query may attend, layer by layer.

    python docs/scripts/draw_attention_masks.py [--out docs/_static/attention_masks.png] [--seed 0]

One real training-mode forward pass of a small random-weight model (timm ResNet-18, mpseg pixel decoder and
masked-attention decoder) on a synthetic image with two objects, piloted by a :class:`mpseg.MaskPilotNoiser`.

* Matching query: the query that the Hungarian matcher assigns to object 0 in the final prediction. Its attention mask
  in layer ``l`` is recomputed from the prediction before that layer (``aux_outputs[l]``) the way the decoder does it:
  the mask logits resized (bilinear) to the size of the feature map that layer attends, a pixel allowed where the logit
  is ``>= 0``, and a row that allows nothing attends everywhere.
* Pilot query: the pilot slot that reconstructs object 0; its mask is ``pilot.cross_attn_mask(l, size, num_heads)``,
  the ground truth at that size with point noise (a fresh draw, as every decoder layer gets).

Takes a few seconds on a CPU; needs matplotlib (``pip install mpseg[docs]``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed; the script only writes a file
import matplotlib.pyplot as plt  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mpseg  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "_static" / "attention_masks.png"
SIZE = 256  # input image; mask features at 64x64, attended maps at 8x8, 16x16 and 32x32
DEC_LAYERS = 6


class TinyMask2Former(nn.Module):
    """A small Mask2Former: random-init ResNet-18 + mpseg pixel decoder + masked-attention decoder."""

    def __init__(self, num_classes: int, dim: int = 64) -> None:
        super().__init__()
        self.backbone = timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        info = self.backbone.feature_info
        self.pixel_decoder = mpseg.MSDeformAttnPixelDecoder(
            info.channels(), info.reduction(), conv_dim=dim, mask_dim=dim, transformer_enc_layers=1,
            transformer_dim_feedforward=2 * dim,
        )
        self.decoder = mpseg.MaskedAttentionDecoder(
            dim, num_classes, hidden_dim=dim, num_queries=20, nheads=4, dim_feedforward=2 * dim,
            dec_layers=DEC_LAYERS, mask_dim=dim,
        )

    def forward(self, images: torch.Tensor, pilot: mpseg.MaskPilot | None = None) -> tuple[dict, list]:
        mask_features, multi_scale_features = self.pixel_decoder(self.backbone(images))
        return self.decoder(multi_scale_features, mask_features, pilot), multi_scale_features


def synthetic_sample() -> tuple[torch.Tensor, dict]:
    """A [1, 3, SIZE, SIZE] image with an ellipse (class 0) and a rectangle (class 2), and its target dict."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    ellipse = ((xs - 0.36) / 0.22) ** 2 + ((ys - 0.58) / 0.30) ** 2 <= 1.0
    rectangle = (xs > 0.60) & (xs < 0.90) & (ys > 0.12) & (ys < 0.46)
    image = torch.stack([0.25 + 0.2 * ys, 0.35 + 0.1 * xs, 0.45 - 0.1 * ys])
    image = torch.where(ellipse, torch.tensor([0.85, 0.45, 0.20])[:, None, None], image)
    image = torch.where(rectangle, torch.tensor([0.20, 0.70, 0.40])[:, None, None], image)
    target = {"labels": torch.tensor([0, 2]), "masks": torch.stack([ellipse, rectangle])}
    return image[None], target


def matching_attention(pred_masks: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, bool]:
    """The decoder's rule for a matching query: resized mask logit >= 0, and an empty row attends everywhere.

    Returns:
        tuple: allowed (Tensor[h, w] bool) and whether the empty-mask rule applied.
    """
    logits = F.interpolate(pred_masks[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    allowed = logits >= 0
    return (allowed, False) if allowed.any() else (torch.ones_like(allowed), True)


def draw(out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    image, target = synthetic_sample()
    model = TinyMask2Former(num_classes=3).train()
    noiser = mpseg.MaskPilotNoiser(num_classes=3, hidden_dim=64, point_noise=0.2, label_noise=0.0)
    with torch.no_grad():
        pilot = noiser([target], generator=generator)
        outputs, features = model(image, pilot)
        ((pred_index, gt_index),) = mpseg.HungarianMatcher(num_points=4096)(outputs, [target], generator=generator)
    query = int(pred_index[gt_index == 0][0])
    slot = int((pilot.target_index[0] == 0).nonzero()[0])
    predictions = [aux["pred_masks"][0, query] for aux in outputs["aux_outputs"]]  # prediction before layer l
    sizes = [tuple(features[layer % len(features)].shape[-2:]) for layer in range(DEC_LAYERS)]

    gt = target["masks"][0].float().numpy()
    # Every panel spans [0, 1] x [0, 1] with y pointing down (image convention), whatever its resolution, so the
    # ground-truth outline (drawn at full resolution, at pixel centres) lines up with every map.
    extent = (0, 1, 1, 0)
    centres = (torch.arange(SIZE) + 0.5).numpy() / SIZE
    fig, axes = plt.subplots(2, DEC_LAYERS + 1, figsize=(2.0 * (DEC_LAYERS + 1), 4.5), constrained_layout=True)
    for row, name in enumerate((f"matching query {query}", f"pilot query (slot {slot})")):
        ax = axes[row, 0]
        ax.imshow(image[0].permute(1, 2, 0).numpy(), extent=extent)
        ax.contour(centres, centres, gt, levels=[0.5], colors="#ff9f1c", linewidths=1.5)
        ax.set_title("image, object 0" if row == 0 else "same image", fontsize=9)
        ax.set_ylabel(name, fontsize=10)
        for layer, size in enumerate(sizes):
            empty = False
            if row == 0:
                allowed, empty = matching_attention(predictions[layer], size)
            else:
                allowed = ~pilot.cross_attn_mask(layer, size, num_heads=4)[0, 0, slot].view(size)
                # The decoder applies the same empty-row rule to pilot rows.
                empty = not bool(allowed.any())
                allowed = allowed | empty
            ax = axes[row, layer + 1]
            ax.imshow(allowed.float().numpy(), cmap="Greys_r", vmin=-0.4, vmax=1.0, extent=extent,
                      interpolation="nearest")
            ax.contour(centres, centres, gt, levels=[0.5], colors="#ff9f1c", linewidths=1.0)
            share = allowed.float().mean().item()
            note = "empty: attends everywhere" if empty else f"{share:.0%} visible"
            ax.set_title(f"layer {layer}: {size[0]}x{size[1]}\n{note}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Cross-attention masks (white = may attend, dark = blocked; orange = ground truth of object 0), "
                 "random-weight model", fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out} (matching query {query}, pilot slot {slot}, attended sizes {sizes})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    draw(args.out, args.seed)


if __name__ == "__main__":
    main()
