# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former vs MP-Former on a synthetic shapes dataset, from scratch on a CPU in minutes.

Builds a small model from a timm backbone (random weights) + mpseg's pixel decoder + masked-attention decoder, trains it
twice for the same steps on the same data order and initial weights (once as plain Mask2Former, once with MP-Former's
mask pilots), then reports on a held-out split: semantic mIoU, panoptic quality, mask AP (things) and the layer
consistency diagnostic. Writes ``predictions.png`` (a grid: image, ground truth, both models) and ``curves.png``
(training loss and held-out mIoU) into ``--out``.

Run::

    python examples/shapes_demo.py            # default, about 9 min on 2 CPU cores
    python examples/shapes_demo.py --quick    # smoke run, about 15 s
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _metrics import PanopticMeter, SemanticMeter, mask_ap  # noqa: E402
from _shapes import CLASS_NAMES, IS_THING, NUM_CLASSES, ShapesDataset  # noqa: E402

import mpseg  # noqa: E402
from mpseg import (  # noqa: E402
    DEFAULT_WEIGHT_DICT,
    HungarianMatcher,
    MaskedAttentionDecoder,
    MaskPilotNoiser,
    MSDeformAttnPixelDecoder,
    SetCriterion,
    instance_inference,
    layer_consistency,
    panoptic_inference,
    semantic_inference,
)

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety, not a requirement
    tqdm = None


class ShapesModel(nn.Module):
    """Backbone -> pixel decoder -> masked-attention decoder, composed from parts as a user would."""

    def __init__(self, *, backbone: str, hidden_dim: int, num_queries: int, dec_layers: int, nheads: int) -> None:
        super().__init__()
        import timm

        self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            self.backbone.feature_info.channels(),
            self.backbone.feature_info.reduction(),
            conv_dim=hidden_dim,
            mask_dim=hidden_dim,
            transformer_nheads=nheads,
            transformer_dim_feedforward=2 * hidden_dim,
            transformer_enc_layers=2,
        )
        self.decoder = MaskedAttentionDecoder(
            hidden_dim,
            NUM_CLASSES,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            nheads=nheads,
            dim_feedforward=2 * hidden_dim,
            dec_layers=dec_layers,
            mask_dim=hidden_dim,
        )
        self.register_buffer("pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, pilot=None) -> dict:
        features = self.backbone(images - self.pixel_mean)
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features, pilot=pilot)


def _progress(iterable, total, desc, enabled):
    if enabled and tqdm is not None:
        return tqdm(iterable, total=total, desc=desc, ncols=100, mininterval=1.0)
    return iterable


def _matching_loss(losses: dict, weight_dict_fn) -> float:
    """Weighted loss of the matching queries only (the `_mp` terms excluded), comparable between the two runs."""
    return float(sum(weight_dict_fn(k) * float(v.detach()) for k, v in losses.items() if k != "loss" and "_mp" not in k))


@torch.no_grad()
def evaluate(model: ShapesModel, dataset: ShapesDataset, matcher: HungarianMatcher, batch_size: int,
             *, keep: int = 0) -> dict:
    """Held-out metrics: mIoU, PQ, mask AP over thing classes, layer consistency; optionally a few predictions."""
    was_training = model.training
    model.eval()
    semantic, panoptic = SemanticMeter(NUM_CLASSES), PanopticMeter(IS_THING)
    detections, ground_truths, kept = [], [], []
    consistency = {"iou": [], "same_query": [], "n": 0}
    thing_ids = torch.tensor([c for c, t in enumerate(IS_THING) if t])
    for images, targets, samples in dataset.batches(batch_size):
        out = model(images)
        stats = layer_consistency(out, targets, matcher, generator=torch.Generator().manual_seed(0))
        consistency["iou"].append([v * stats["num_targets"] for v in stats["iou"]])
        consistency["same_query"].append([v * stats["num_targets"] for v in stats["same_query"]])
        consistency["n"] += stats["num_targets"]
        masks = F.interpolate(out["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False)
        sem = semantic_inference(out["pred_logits"], masks).argmax(1)
        for b, sample in enumerate(samples):
            semantic.update(sem[b], sample["sem_seg"])
            pan, segments = panoptic_inference(out["pred_logits"][b], masks[b], is_thing=list(IS_THING))
            panoptic.update(pan, segments, sample["pan_seg"], sample["segments_info"])
            # Mask AP over thing classes, as Mask2Former reports instance results on a panoptic dataset.
            detections.append(instance_inference(out["pred_logits"][b], masks[b], topk=50, is_thing=list(IS_THING)))
            gt_thing = torch.isin(sample["labels"], thing_ids)
            ground_truths.append({"masks": sample["masks"][gt_thing], "labels": sample["labels"][gt_thing]})
            if len(kept) < keep:
                kept.append({"image": sample["image"], "gt": sample["pan_seg"], "gt_segments": sample["segments_info"],
                             "pred": pan, "pred_segments": segments})
    model.train(was_training)
    n = max(consistency["n"], 1)
    iou = [sum(col) / n for col in zip(*consistency["iou"])]
    same = [sum(col) / n for col in zip(*consistency["same_query"])]
    pq = panoptic.compute()
    ap = mask_ap(detections, ground_truths, NUM_CLASSES)
    return {
        "miou": 100.0 * semantic.miou(),
        "class_iou": [100.0 * v for v in semantic.iou().tolist()],
        "pq": pq["pq"],
        "pq_th": pq["pq_th"],
        "pq_st": pq["pq_st"],
        "ap": ap["ap"],
        "ap50": ap["ap50"],
        "layer_iou": iou,
        "layer_same_query": same,
        "mean_layer_iou": sum(iou) / max(len(iou), 1),
        "mean_layer_same_query": sum(same) / max(len(same), 1),
        "examples": kept,
    }


def make_criterion(args) -> tuple[HungarianMatcher, SetCriterion]:
    """Matcher and criterion: Mask2Former's weights; the pilot (``_mp``) weights scaled by ``--mp-loss-weight``."""
    matcher = HungarianMatcher(num_points=args.points)
    weights = dict(DEFAULT_WEIGHT_DICT)
    weights.update({f"{k}_mp": v * args.mp_loss_weight for k, v in DEFAULT_WEIGHT_DICT.items()})
    return matcher, SetCriterion(NUM_CLASSES, matcher, num_points=args.points, weight_dict=weights)


def train(args, *, mask_piloted: bool, train_set: ShapesDataset, val_set: ShapesDataset, label: str) -> dict:
    """Train one model; identical data order and initial weights for both modes (same seeds)."""
    torch.manual_seed(args.seed)
    model = ShapesModel(backbone=args.backbone, hidden_dim=args.hidden_dim, num_queries=args.queries,
                        dec_layers=args.dec_layers, nheads=args.nheads)
    # The noiser is built after the model so the model's initial weights do not depend on the mode.
    noiser = MaskPilotNoiser(NUM_CLASSES, args.hidden_dim, point_noise=args.point_noise,
                             label_noise=args.label_noise, num_groups=args.groups) if mask_piloted else None
    matcher, criterion = make_criterion(args)
    params = list(model.parameters()) + (list(noiser.parameters()) if noiser is not None else [])
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05)
    # Linear warm-up then cosine decay: from-scratch transformers diverge easily with a cold start.
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    point_gen = torch.Generator().manual_seed(args.seed + 3)

    def batches():
        while True:
            yield from train_set.batches(args.batch_size, shuffle=True, generator=data_gen, drop_last=True)

    history = {"step": [], "loss": [], "eval_step": [], "eval_miou": [], "eval_pq": [], "eval_pq_th": [],
               "eval_pq_st": [], "eval_ap": [], "eval_class_iou": [], "eval_layer_iou": [], "eval_layer_same_query": []}
    eval_every = max(1, args.steps // max(args.evals, 1))
    stream = batches()
    start = time.time()
    bar = _progress(range(1, args.steps + 1), args.steps, label, not args.no_progress)
    for step in bar:
        images, targets, _ = next(stream)
        pilot = noiser(targets, generator=noise_gen) if noiser is not None else None
        outputs = model(images, pilot=pilot)
        losses = criterion(outputs, targets, generator=point_gen)
        loss = losses["loss"]
        if noiser is not None:
            loss = loss + noiser.dummy_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history["step"].append(step)
        history["loss"].append(_matching_loss(losses, criterion.weight))
        if tqdm is not None and not args.no_progress:
            bar.set_postfix(loss=f"{history['loss'][-1]:.2f}")
        if step % eval_every == 0 or step == args.steps:
            # The last checkpoint is the final evaluation (which also keeps a few predictions for the figure).
            metrics = evaluate(model, val_set, matcher, args.batch_size, keep=args.grid if step == args.steps else 0)
            history["eval_step"].append(step)
            history["eval_miou"].append(metrics["miou"])
            history["eval_pq"].append(metrics["pq"])
            history["eval_pq_th"].append(metrics["pq_th"])
            history["eval_pq_st"].append(metrics["pq_st"])
            history["eval_class_iou"].append(metrics["class_iou"])
            history["eval_ap"].append(metrics["ap"])
            history["eval_layer_iou"].append(metrics["mean_layer_iou"])
            history["eval_layer_same_query"].append(metrics["mean_layer_same_query"])
    train_time = time.time() - start
    final = metrics
    final["train_seconds"] = train_time
    final["history"] = history
    return final


def _colourise(seg: torch.Tensor, segments: list, palette: torch.Tensor) -> torch.Tensor:
    """Panoptic map -> RGB: the class colour, shaded per instance so touching instances stay distinct."""
    rgb = torch.zeros(*seg.shape, 3)
    for k, s in enumerate(segments):
        shade = 0.65 + 0.35 * ((k * 37) % 7) / 6
        rgb[seg == s["id"]] = palette[s["category_id"]] * shade
    return rgb


def save_figures(results: dict, out_dir: str) -> list[str]:
    """predictions.png and curves.png; returns the written paths ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no figures written (pip install matplotlib)")
        return []
    os.makedirs(out_dir, exist_ok=True)
    palette = torch.tensor([[0.9, 0.3, 0.3], [0.3, 0.8, 0.3], [0.95, 0.8, 0.2], [0.7, 0.3, 0.9], [0.5, 0.7, 1.0],
                            [0.6, 0.45, 0.3]])
    names = list(results)
    rows = min(len(results[n]["examples"]) for n in names)
    paths = []
    if rows:
        fig, axes = plt.subplots(rows, 2 + len(names), figsize=(2.2 * (2 + len(names)), 2.2 * rows), squeeze=False)
        for r in range(rows):
            ex = results[names[0]]["examples"][r]
            panels = [("image", ex["image"].permute(1, 2, 0)), ("ground truth", _colourise(ex["gt"], ex["gt_segments"],
                                                                                          palette))]
            for n in names:
                e = results[n]["examples"][r]
                panels.append((n, _colourise(e["pred"], e["pred_segments"], palette)))
            for c, (title, img) in enumerate(panels):
                axes[r, c].imshow(img.clamp(0, 1).numpy())
                axes[r, c].set_axis_off()
                if r == 0:
                    axes[r, c].set_title(title, fontsize=9)
        fig.suptitle("panoptic predictions on held-out images (" + ", ".join(
            f"{i}={n}" for i, n in enumerate(CLASS_NAMES)) + ")", fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, "predictions.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    fig, (ax_loss, ax_miou) = plt.subplots(1, 2, figsize=(10, 3.5))
    for n in names:
        h = results[n]["history"]
        loss = torch.tensor(h["loss"])
        window = max(1, len(loss) // 25)
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1).flatten()
        ax_loss.plot(h["step"][window - 1:], smooth.tolist(), label=n)
        ax_miou.plot(h["eval_step"], h["eval_miou"], marker="o", label=f"{n} mIoU")
        ax_miou.plot(h["eval_step"], h["eval_pq"], marker="x", linestyle="--", label=f"{n} PQ")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("matching-query loss (weighted)")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_miou.set_xlabel("step")
    ax_miou.set_ylabel("held-out score")
    ax_miou.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 600, quick 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--train-images", type=int, default=4000)
    p.add_argument("--val-images", type=int, default=None, help="held-out images (default 96, quick 16)")
    p.add_argument("--backbone", default="resnet18", help="any timm model with features_only (random weights)")
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--dec-layers", type=int, default=6)
    p.add_argument("--nheads", type=int, default=4)
    p.add_argument("--points", type=int, default=256, help="sampled points per mask in matcher and criterion")
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--point-noise", type=float, default=0.2)
    p.add_argument("--label-noise", type=float, default=0.2)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--mp-loss-weight", type=float, default=0.5,
                   help="scale of the pilot (_mp) loss weights relative to the matching losses (MP-Former: 1;\n"
                        "0.5 did better on this tiny from-scratch budget, see docs/guide/mask_pilot.rst)")
    p.add_argument("--evals", type=int, default=4, help="held-out evaluations during training (for the curves)")
    p.add_argument("--grid", type=int, default=6, help="held-out images in predictions.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--modes", default="mask2former,mp-former", help="comma-separated subset of mask2former,mp-former")
    p.add_argument("--out", default="outputs/shapes_demo")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else 600
    if args.val_images is None:
        args.val_images = 16 if args.quick else 96
    if args.quick:
        args.evals, args.grid, args.train_images = 1, min(args.grid, 3), min(args.train_images, 64)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_set = ShapesDataset(args.train_images, split="train", image_size=args.image_size, seed=args.seed)
    val_set = ShapesDataset(args.val_images, split="val", image_size=args.image_size, seed=args.seed)
    print(f"mpseg {mpseg.__version__} | shapes {args.image_size}px, {args.steps} steps x batch {args.batch_size}, "
          f"{args.val_images} held-out images | backbone {args.backbone} (random init), {args.dec_layers} decoder "
          f"layers | pilots: point noise {args.point_noise}, label noise {args.label_noise}, "
          f"_mp loss weight x{args.mp_loss_weight} | "
          f"msda backend: {', '.join(mpseg.available_backends()) if hasattr(mpseg, 'available_backends') else '?'}")
    results = {}
    for mode in args.modes.split(","):
        if mode not in ("mask2former", "mp-former"):
            raise ValueError(f"--modes takes mask2former and/or mp-former, got {mode!r}")
        results[mode] = train(args, mask_piloted=mode == "mp-former", train_set=train_set, val_set=val_set,
                              label=mode)
    header = f"{'model':<12}{'mIoU':>7}{'PQ':>7}{'PQth':>7}{'PQst':>7}{'AP':>7}{'AP50':>7}{'L-IoU':>7}{'L-same':>8}{'time':>7}"
    print("\nheld-out results (L-IoU / L-same: layer consistency, mean over consecutive decoder predictions)")
    print(header)
    for name, r in results.items():
        print(f"{name:<12}{r['miou']:7.1f}{r['pq']:7.1f}{r['pq_th']:7.1f}{r['pq_st']:7.1f}{r['ap']:7.1f}"
              f"{r['ap50']:7.1f}{r['mean_layer_iou']:7.3f}{r['mean_layer_same_query']:8.3f}"
              f"{r['train_seconds']:6.0f}s")
    for name, r in results.items():
        print(f"{name} layer IoU per pair: {[round(v, 3) for v in r['layer_iou']]}, same query: "
              f"{[round(v, 3) for v in r['layer_same_query']]}")
    paths = save_figures(results, args.out)
    os.makedirs(args.out, exist_ok=True)
    summary = {n: {k: v for k, v in r.items() if k != "examples"} for n, r in results.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": summary}, f, indent=1)
    for path in paths + [os.path.join(args.out, "results.json")]:
        print("wrote", path)
    return results


if __name__ == "__main__":
    main()
