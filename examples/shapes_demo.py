# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former vs MP-Former on a synthetic shapes dataset, from scratch on a CPU in minutes.

Builds a small model (a 4-stage CNN with random weights + mpseg's pixel decoder + masked-attention decoder, about 1M
parameters), trains it twice for the same steps on the same data order and initial weights (once as plain Mask2Former,
once with MP-Former's mask pilots; by default the two as parallel one-thread processes), then reports on a held-out
split: semantic mIoU, panoptic quality, mask AP (things; all three computed by torchmetrics) and the layer consistency
diagnostic. Writes ``predictions.png`` (a grid: image, ground truth, both models), ``curves.png`` (training loss and
held-out scores, with the step and time at which MP-Former passes Mask2Former's final PQ and AP) and ``results.json``
into ``--out``.

Run::

    python examples/shapes_demo.py            # default, about 9 min on 2 CPU cores
    python examples/shapes_demo.py --quick    # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _metrics import SegmentationMetrics  # noqa: E402
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

MODES = ("mask2former", "mp-former")


class SmallCNN(nn.Module):
    """A stem and four stages of two 3x3 conv-BN-ReLU (the first one strided): features at strides 4, 8, 16, 32.

    Args:
        channels (tuple[int, ...]): output channels of the four stages.
    """

    def __init__(self, channels: tuple[int, ...] = (32, 64, 96, 128)) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.stem = nn.Sequential(*block(3, channels[0] // 2, 2))
        stages, c_in = [], channels[0] // 2
        for c in channels:
            stages.append(nn.Sequential(*block(c_in, c, 2), *block(c, c, 1)))
            c_in = c
        self.stages = nn.ModuleList(stages)
        self.channels = list(channels)
        self.strides = [4, 8, 16, 32]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


class ShapesModel(nn.Module):
    """Backbone -> pixel decoder -> masked-attention decoder, composed from parts as a user would.

    ``backbone="cnn"`` is :class:`SmallCNN`; any other name is a timm model with ``features_only`` (random weights).
    """

    def __init__(self, *, backbone: str, hidden_dim: int, num_queries: int, dec_layers: int, nheads: int,
                 enc_layers: int, dim_feedforward: int) -> None:
        super().__init__()
        if backbone == "cnn":
            self.backbone = SmallCNN()
            channels, strides = self.backbone.channels, self.backbone.strides
        else:
            import timm

            self.backbone = timm.create_model(backbone, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
            channels, strides = self.backbone.feature_info.channels(), self.backbone.feature_info.reduction()
        self.pixel_decoder = MSDeformAttnPixelDecoder(
            channels,
            strides,
            conv_dim=hidden_dim,
            mask_dim=hidden_dim,
            transformer_nheads=4,
            transformer_dim_feedforward=dim_feedforward,
            transformer_enc_layers=enc_layers,
        )
        self.decoder = MaskedAttentionDecoder(
            hidden_dim,
            NUM_CLASSES,
            hidden_dim=hidden_dim,
            num_queries=num_queries,
            nheads=nheads,
            dim_feedforward=dim_feedforward,
            dec_layers=dec_layers,
            mask_dim=hidden_dim,
            query_pos=False,  # as MP-Former's decoder
        )
        self.register_buffer("pixel_mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, pilot=None) -> dict:
        features = self.backbone(images - self.pixel_mean)
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features, pilot=pilot)


def _matching_loss(losses: dict, weight_dict_fn) -> float:
    """Weighted loss of the matching queries only (the `_mp` terms excluded), comparable between the two runs."""
    return float(sum(weight_dict_fn(k) * float(v.detach()) for k, v in losses.items() if k != "loss" and "_mp" not in k))


@torch.no_grad()
def evaluate(model: ShapesModel, dataset: ShapesDataset, matcher: HungarianMatcher, batch_size: int,
             *, keep: int = 0) -> dict:
    """Held-out metrics: mIoU, PQ, mask AP over thing classes, layer consistency; optionally a few predictions."""
    was_training = model.training
    model.eval()
    metrics = SegmentationMetrics(IS_THING)
    kept = []
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
            pan, segments = panoptic_inference(out["pred_logits"][b], masks[b], is_thing=list(IS_THING))
            # Mask AP over thing classes, as Mask2Former reports instance results on a panoptic dataset.
            detections = instance_inference(out["pred_logits"][b], masks[b], topk=50, is_thing=list(IS_THING))
            gt_thing = torch.isin(sample["labels"], thing_ids)
            metrics.update(sem_pred=sem[b], sem_gt=sample["sem_seg"], pan_pred=pan, pan_pred_segments=segments,
                           pan_gt=sample["pan_seg"], pan_gt_segments=sample["segments_info"], instances=detections,
                           gt_masks=sample["masks"][gt_thing], gt_labels=sample["labels"][gt_thing])
            if len(kept) < keep:
                kept.append({"image": sample["image"], "gt": sample["pan_seg"], "gt_segments": sample["segments_info"],
                             "pred": pan, "pred_segments": segments})
    model.train(was_training)
    n = max(consistency["n"], 1)
    iou = [sum(col) / n for col in zip(*consistency["iou"])]
    same = [sum(col) / n for col in zip(*consistency["same_query"])]
    result = metrics.compute()
    result.update({
        "layer_iou": iou,
        "layer_same_query": same,
        "mean_layer_iou": sum(iou) / max(len(iou), 1),
        "mean_layer_same_query": sum(same) / max(len(same), 1),
        "examples": kept,
    })
    return result


def make_criterion(args) -> tuple[HungarianMatcher, SetCriterion]:
    """Matcher and criterion: Mask2Former's weights; the pilot (``_mp``) weights scaled by ``--mp-loss-weight``."""
    matcher = HungarianMatcher(num_points=args.points)
    weights = dict(DEFAULT_WEIGHT_DICT)
    weights.update({f"{k}_mp": v * args.mp_loss_weight for k, v in DEFAULT_WEIGHT_DICT.items()})
    return matcher, SetCriterion(NUM_CLASSES, matcher, num_points=args.points, weight_dict=weights)


_HISTORY_KEYS = ("miou", "pq", "pq_th", "pq_st", "ap", "class_iou")


def train(args, *, mask_piloted: bool, train_set: ShapesDataset, val_set: ShapesDataset, label: str,
          position: int = 0) -> dict:
    """Train one model; identical data order and initial weights for both modes (same seeds).

    Returns the final held-out metrics (see :func:`evaluate`) with ``train_seconds`` (optimisation only, evaluations
    excluded) and ``history`` (per-step loss; per-evaluation step, cumulative training seconds and metrics).
    """
    torch.manual_seed(args.seed)
    model = ShapesModel(backbone=args.backbone, hidden_dim=args.hidden_dim, num_queries=args.queries,
                        dec_layers=args.dec_layers, nheads=args.nheads, enc_layers=args.enc_layers,
                        dim_feedforward=args.dim_feedforward)
    # The noiser is built after the model so the model's initial weights do not depend on the mode.
    noiser = MaskPilotNoiser(NUM_CLASSES, args.hidden_dim, point_noise=args.point_noise,
                             label_noise=args.label_noise, num_groups=args.groups) if mask_piloted else None
    matcher, criterion = make_criterion(args)
    params = list(model.parameters()) + (list(noiser.parameters()) if noiser is not None else [])
    # fused: one kernel for all parameters instead of ~10 small ops per tensor (a tenth of the step at this size).
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.05, fused=True)
    # Linear warm-up (from-scratch transformers diverge easily with a cold start), then constant or cosine decay.
    warmup = max(1, min(100, args.steps // 10) if args.warmup is None else args.warmup)

    def lr_factor(s: int) -> float:
        decay = 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)) if args.schedule == "cosine" else 1.0
        return min(1.0, (s + 1) / warmup) * decay

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    data_gen = torch.Generator().manual_seed(args.seed + 1)
    noise_gen = torch.Generator().manual_seed(args.seed + 2)
    point_gen = torch.Generator().manual_seed(args.seed + 3)

    def batches():
        while True:
            yield from train_set.batches(args.batch_size, shuffle=True, generator=data_gen, drop_last=True)

    history = {"step": [], "loss": [], "eval_step": [], "eval_seconds": []}
    history.update({f"eval_{k}": [] for k in _HISTORY_KEYS + ("layer_iou", "layer_same_query")})
    eval_every = max(1, args.steps // max(args.evals, 1))
    stream = batches()
    train_time = 0.0
    show_bar = tqdm is not None and not args.no_progress and sys.stderr.isatty()
    bar = tqdm(range(1, args.steps + 1), total=args.steps, desc=f"{label:<12}", ncols=100, mininterval=1.0,
               position=position) if show_bar else range(1, args.steps + 1)
    for step in bar:
        tick = time.perf_counter()
        images, targets, _ = next(stream)
        pilot = noiser(targets, generator=noise_gen) if noiser is not None else None
        outputs = model(images, pilot=pilot)
        losses = criterion(outputs, targets, generator=point_gen)
        loss = losses["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.clip)
        optimizer.step()
        schedule.step()
        train_time += time.perf_counter() - tick
        history["step"].append(step)
        history["loss"].append(_matching_loss(losses, criterion.weight))
        if show_bar:
            bar.set_postfix(loss=f"{history['loss'][-1]:.2f}")
        if step % eval_every == 0 or step == args.steps:
            # The last checkpoint is the final evaluation (which also keeps a few predictions for the figure).
            metrics = evaluate(model, val_set, matcher, args.batch_size, keep=args.grid if step == args.steps else 0)
            history["eval_step"].append(step)
            history["eval_seconds"].append(train_time)
            for k in _HISTORY_KEYS:
                history[f"eval_{k}"].append(metrics[k])
            history["eval_layer_iou"].append(metrics["mean_layer_iou"])
            history["eval_layer_same_query"].append(metrics["mean_layer_same_query"])
            if not show_bar and not args.no_progress:
                print(f"  {label:<12} step {step:>5}/{args.steps} ({train_time:4.0f}s): loss {history['loss'][-1]:6.2f}"
                      f"  mIoU {metrics['miou']:5.1f}  PQ {metrics['pq']:5.1f}  AP {metrics['ap']:5.1f}", flush=True)
    if show_bar:
        bar.close()
    final = metrics
    final["train_seconds"] = train_time
    final["history"] = history
    return final


def _train_in_child(conn, args, mode, train_set, val_set, position) -> None:
    """Child process body: one thread pool of ``args.threads``, one mode; the result goes back serialised."""
    try:
        torch.set_num_threads(args.threads)
        result = train(args, mask_piloted=mode == "mp-former", train_set=train_set, val_set=val_set, label=mode,
                       position=position)
        buf = io.BytesIO()
        torch.save(result, buf)
        conn.send(("ok", buf.getvalue()))
    except BaseException:  # report every failure to the parent, which raises it
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_modes(args, modes: list[str], train_set: ShapesDataset, val_set: ShapesDataset) -> dict:
    """Train each mode: side by side in forked processes with ``--parallel``, else one after the other."""
    if not args.parallel or len(modes) < 2:
        if args.threads:
            torch.set_num_threads(args.threads)
        return {m: train(args, mask_piloted=m == "mp-former", train_set=train_set, val_set=val_set, label=m)
                for m in modes}
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the children share the parent's datasets without copying them
    children = []
    for position, mode in enumerate(modes):
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_train_in_child, args=(send, args, mode, train_set, val_set, position), daemon=True)
        proc.start()
        send.close()
        children.append((mode, proc, receive))
    results = {}
    for mode, proc, receive in children:
        try:
            status, payload = receive.recv()
        except EOFError:
            status, payload = "error", f"the {mode} process died (exit code {proc.join() or proc.exitcode})"
        proc.join()
        if status != "ok":
            for _, other, _ in children:
                other.terminate()
            raise RuntimeError(f"training {mode} failed:\n{payload}")
        results[mode] = torch.load(io.BytesIO(payload), weights_only=False)
    return results


def passing_points(results: dict) -> dict:
    """Where MP-Former's held-out PQ and AP first reach Mask2Former's final value: ``{metric: {...}}``.

    Per metric: ``target`` (the baseline's final value), ``step`` and ``seconds`` (MP-Former's training time) of the
    first evaluation at or above it, and ``fraction`` (that time over the baseline's training time), or None values
    when MP-Former never reaches it.
    """
    if not set(MODES) <= set(results):
        return {}
    base, mp = results["mask2former"], results["mp-former"]["history"]
    out = {}
    for key in ("pq", "ap"):
        target = base[key]
        hit = next((i for i, v in enumerate(mp[f"eval_{key}"]) if v >= target), None)
        step = mp["eval_step"][hit] if hit is not None else None
        seconds = mp["eval_seconds"][hit] if hit is not None else None
        out[key] = {"target": target, "step": step, "seconds": seconds,
                    "fraction": seconds / base["train_seconds"] if seconds is not None else None}
    return out


def summary_line(results: dict, passes: dict) -> str:
    """One line: where MP-Former passes the baseline's final PQ and AP (or that it does not)."""
    if not passes:
        return ""
    parts = []
    for key, name in (("pq", "PQ"), ("ap", "mask AP")):
        p = passes[key]
        if p["step"] is None:
            parts.append(f"does not reach its final {name} ({p['target']:.1f})")
        else:
            parts.append(f"passes its final {name} ({p['target']:.1f}) at step {p['step']} ({p['seconds']:.0f} s, "
                         f"{100 * p['fraction']:.0f}% of its training time)")
    steps = results["mask2former"]["history"]["step"][-1]
    return f"MP-Former vs Mask2Former ({steps} steps): " + "; ".join(parts)


def _colourise(seg: torch.Tensor, segments: list, palette: torch.Tensor) -> torch.Tensor:
    """Panoptic map -> RGB: the class colour, shaded per instance so touching instances stay distinct."""
    rgb = torch.zeros(*seg.shape, 3)
    for k, s in enumerate(segments):
        shade = 0.65 + 0.35 * ((k * 37) % 7) / 6
        rgb[seg == s["id"]] = palette[s["category_id"]] * shade
    return rgb


def save_figures(results: dict, passes: dict, out_dir: str) -> list[str]:
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
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    ax_loss = axes[0]
    for n in names:
        h = results[n]["history"]
        loss = torch.tensor(h["loss"])
        window = max(1, len(loss) // 25)
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], window, stride=1).flatten()
        ax_loss.plot(h["step"][window - 1:], smooth.tolist(), label=n)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("matching-query loss (weighted)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=8)
    for ax, key, name in zip(axes[1:], ("miou", "pq", "ap"), ("mIoU", "PQ", "mask AP (things)")):
        for n in names:
            h = results[n]["history"]
            ax.plot(h["eval_step"], h[f"eval_{key}"], marker="o", markersize=3, label=n)
        if key in passes:
            p = passes[key]
            ax.axhline(p["target"], color="grey", linestyle=":", linewidth=1, label="Mask2Former final")
            if p["step"] is not None:
                ax.axvline(p["step"], color="black", linestyle="--", linewidth=1)
                ax.annotate(f"MP-Former passes it:\nstep {p['step']}, {p['seconds']:.0f} s", (p["step"], p["target"]),
                            xytext=(4, -28), textcoords="offset points", fontsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {name}")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = os.path.join(out_dir, "curves.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
    return paths


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 1 minute)")
    p.add_argument("--steps", type=int, default=None, help="training steps per model (default 1600, quick 8)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--train-images", type=int, default=2000)
    p.add_argument("--val-images", type=int, default=None, help="held-out images (default 192, quick 16)")
    p.add_argument("--backbone", default="cnn", help="'cnn' (a small 4-stage CNN) or a timm model name (random init)")
    p.add_argument("--hidden-dim", type=int, default=64)
    p.add_argument("--dim-feedforward", type=int, default=256)
    p.add_argument("--queries", type=int, default=20)
    p.add_argument("--dec-layers", type=int, default=6)
    p.add_argument("--enc-layers", type=int, default=1, help="pixel-decoder encoder layers")
    p.add_argument("--nheads", type=int, default=8, help="decoder attention heads")
    p.add_argument("--points", type=int, default=256, help="sampled points per mask in matcher and criterion")
    p.add_argument("--lr", type=float, default=2e-4, help="AdamW learning rate")
    p.add_argument("--schedule", choices=("constant", "cosine"), default="constant",
                   help="learning rate after the warm-up: constant (default) or cosine decay to 0 at --steps")
    p.add_argument("--warmup", type=int, default=None, help="linear warm-up steps (default min(100, steps / 10))")
    p.add_argument("--clip", type=float, default=0.01, help="gradient-norm clip (Mask2Former's 0.01)")
    p.add_argument("--point-noise", type=float, default=0.0, help="MP-Former's released setting: 0")
    p.add_argument("--label-noise", type=float, default=0.2)
    p.add_argument("--groups", type=int, default=1)
    p.add_argument("--mp-loss-weight", type=float, default=1.0,
                   help="scale of the pilot (_mp) loss weights relative to the matching losses (MP-Former: 1)")
    p.add_argument("--evals", type=int, default=8, help="held-out evaluations during training (for the curves)")
    p.add_argument("--grid", type=int, default=6, help="held-out images in predictions.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per model (default: cores / 2 with --parallel, else all cores)")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=None,
                   help="train the two models side by side in two processes (default: with 2 or more cores)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ",".join(MODES))
    p.add_argument("--out", default="outputs/shapes_demo")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = 8 if args.quick else 1600
    if args.val_images is None:
        args.val_images = 16 if args.quick else 192
    if args.quick:
        args.evals, args.grid, args.train_images = 1, min(args.grid, 3), min(args.train_images, 64)
    cores = os.cpu_count() or 1
    if args.parallel is None:
        args.parallel = cores >= 2
    if args.threads is None:
        args.threads = max(1, cores // 2) if args.parallel else cores
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise ValueError(f"--modes takes mask2former and/or mp-former, got {mode!r}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    wall = time.time()
    # Cached: each sample is generated once per process (3 ms at 64 px), not once per epoch.
    train_set = ShapesDataset(args.train_images, split="train", image_size=args.image_size, seed=args.seed, cache=True)
    val_set = ShapesDataset(args.val_images, split="val", image_size=args.image_size, seed=args.seed, cache=True)
    modes = args.modes.split(",")
    print(f"mpseg {mpseg.__version__} | shapes {args.image_size}px, {args.steps} steps x batch {args.batch_size}, "
          f"{args.val_images} held-out images | backbone {args.backbone} (random init), {args.dec_layers} decoder "
          f"layers | pilots: point noise {args.point_noise}, label noise {args.label_noise}, "
          f"_mp loss weight x{args.mp_loss_weight} | "
          + (f"{len(modes)} processes x {args.threads} thread(s)" if args.parallel and len(modes) > 1
             else f"{args.threads} thread(s)"), flush=True)
    results = run_modes(args, modes, train_set, val_set)
    header = f"{'model':<12}{'mIoU':>7}{'PQ':>7}{'PQth':>7}{'PQst':>7}{'AP':>7}{'AP50':>7}{'L-IoU':>7}{'L-same':>8}{'time':>7}"
    print("\nheld-out results (L-IoU / L-same: layer consistency, mean over consecutive decoder predictions)")
    print(header)
    for name, r in results.items():
        print(f"{name:<12}{r['miou']:7.1f}{r['pq']:7.1f}{r['pq_th']:7.1f}{r['pq_st']:7.1f}{r['ap']:7.1f}"
              f"{r['ap50']:7.1f}{r['mean_layer_iou']:7.3f}{r['mean_layer_same_query']:8.3f}"
              f"{r['train_seconds']:6.0f}s")
    passes = passing_points(results)
    if passes:
        print(summary_line(results, passes))
    paths = save_figures(results, passes, args.out)
    os.makedirs(args.out, exist_ok=True)
    summary = {n: {k: v for k, v in r.items() if k != "examples"} for n, r in results.items()}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "results": summary, "passes": passes, "wall_seconds": time.time() - wall},
                  f, indent=1)
    for path in paths + [os.path.join(args.out, "results.json")]:
        print("wrote", path)
    return results


if __name__ == "__main__":
    main()
