# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Train Mask2Former or MP-Former on COCO-format data: a reference script built from mpseg's parts, not a framework.

A timm backbone + mpseg's pixel decoder and masked-attention decoder (+ MP-Former's mask pilots with
``--mask-pilot``), trained as Mask2Former is: large-scale jitter, AdamW with a poly schedule and a 0.1 learning-rate
multiplier on the backbone, no weight decay on norms and embeddings, gradient clipping, bf16 autocast on GPU.
Evaluates periodically (mask AP for instance data; PQ, mIoU and mask AP of things for panoptic data) with
:mod:`mpseg.evaluation`, saves ``last.pt`` (``--resume`` continues from it), ``log.jsonl`` and ``curves.png``.

One process, or one per GPU / CPU worker with torchrun (NCCL on GPUs, gloo on CPU)::

    python examples/train.py --task instance --train-images IMG --train-annotations JSON --out runs/a
    torchrun --nproc_per_node 8 examples/train.py --task panoptic --train-images IMG --train-annotations JSON \\
        --train-panoptic PNGS --val-images ... --val-annotations ... --val-panoptic ... --mask-pilot --pretrained

See docs/guide/coco.rst for the full commands and what each option does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mpseg
from mpseg.data import COCOInstanceDataset, COCOPanopticDataset, LargeScaleJitter, collate
from mpseg.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator
from mpseg.inference import resize_mask_logits

try:
    from tqdm import tqdm
except ImportError:  # the progress bar is a nicety, not a requirement
    tqdm = None

PIXEL_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as timm's pretrained backbones expect
PIXEL_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module):
    """timm backbone -> mpseg pixel decoder -> mpseg masked-attention decoder; images in [0, 1]."""

    def __init__(self, args, num_classes: int) -> None:
        super().__init__()
        import timm

        from timm.layers import freeze_batch_norm_2d

        backbone = timm.create_model(args.backbone, pretrained=args.pretrained, features_only=True,
                                     out_indices=(1, 2, 3, 4))
        # Frozen batch statistics, as Mask2Former's ResNets ("FrozenBN"): a few images per GPU make poor batch
        # statistics (and a 1x1 stride-32 map of one image has none).
        self.backbone = freeze_batch_norm_2d(backbone)
        info = self.backbone.feature_info
        self.pixel_decoder = mpseg.MSDeformAttnPixelDecoder(
            info.channels(), info.reduction(), conv_dim=args.hidden_dim, mask_dim=args.hidden_dim,
            transformer_nheads=args.nheads, transformer_dim_feedforward=4 * args.hidden_dim,
            transformer_enc_layers=args.enc_layers)
        self.decoder = mpseg.MaskedAttentionDecoder(
            args.hidden_dim, num_classes, hidden_dim=args.hidden_dim, num_queries=args.num_queries,
            nheads=args.nheads, dim_feedforward=8 * args.hidden_dim, dec_layers=args.dec_layers,
            mask_dim=args.hidden_dim)
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, pilot=None) -> dict:
        mask_features, multi_scale = self.pixel_decoder(self.backbone((images - self.pixel_mean) / self.pixel_std))
        return self.decoder(multi_scale, mask_features, pilot=pilot)


class Trainable(nn.Module):
    """Model and noiser under one module, so that DDP synchronises the noiser's label embedding too."""

    def __init__(self, model: Segmenter, noiser: mpseg.MaskPilotNoiser | None) -> None:
        super().__init__()
        self.model, self.noiser = model, noiser

    def forward(self, images, targets=None, generator=None):
        pilot = self.noiser(targets, generator=generator) if self.noiser is not None and targets is not None else None
        outputs = self.model(images, pilot=pilot)
        # Keeps the label embedding in the graph on a batch without objects (no pilot), as DDP requires.
        extra = self.noiser.dummy_loss() if self.noiser is not None and self.training else None
        return outputs, extra


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = p.add_argument_group("data")
    data.add_argument("--task", choices=("instance", "panoptic"), required=True)
    data.add_argument("--train-images", required=True, help="image folder of the training split")
    data.add_argument("--train-annotations", required=True, help="COCO instance or panoptic JSON")
    data.add_argument("--train-panoptic", help="panoptic PNG folder (--task panoptic)")
    data.add_argument("--val-images", help="image folder of the evaluation split (default: no evaluation)")
    data.add_argument("--val-annotations")
    data.add_argument("--val-panoptic")
    data.add_argument("--crop-size", type=int, default=1024, help="large-scale-jitter crop (Mask2Former: 1024)")
    data.add_argument("--min-scale", type=float, default=0.1)
    data.add_argument("--max-scale", type=float, default=2.0)
    data.add_argument("--eval-size", type=int, default=800,
                      help="shorter side of evaluation inputs (0: original size; longer side capped at 1333/800x)")
    data.add_argument("--workers", type=int, default=4, help="data-loader workers per process")
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="resnet50", help="any timm model with features_only")
    model.add_argument("--pretrained", action="store_true", help="ImageNet weights for the backbone (timm)")
    model.add_argument("--hidden-dim", type=int, default=256)
    model.add_argument("--nheads", type=int, default=8)
    model.add_argument("--num-queries", type=int, default=100)
    model.add_argument("--dec-layers", type=int, default=9)
    model.add_argument("--enc-layers", type=int, default=6)
    model.add_argument("--points", type=int, default=12544, help="sampled points per mask (matcher and losses)")
    model.add_argument("--mask-pilot", action="store_true", help="MP-Former: train with mask pilots")
    model.add_argument("--point-noise", type=float, default=0.2)
    model.add_argument("--label-noise", type=float, default=0.2)
    optim = p.add_argument_group("optimisation (Mask2Former's defaults)")
    optim.add_argument("--steps", type=int, default=368750, help="iterations (COCO: 368750 at batch 16)")
    optim.add_argument("--batch-size", type=int, default=2, help="images per process")
    optim.add_argument("--lr", type=float, default=1e-4)
    optim.add_argument("--weight-decay", type=float, default=0.05)
    optim.add_argument("--backbone-lr-mult", type=float, default=0.1)
    optim.add_argument("--poly-power", type=float, default=0.9)
    optim.add_argument("--clip", type=float, default=0.01, help="max gradient norm over the whole model")
    optim.add_argument("--amp", choices=("auto", "bf16", "off"), default="auto", help="auto: bf16 on CUDA only")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="runs/train")
    run.add_argument("--resume", nargs="?", const="auto", help="checkpoint to resume (no value: OUT/last.pt)")
    run.add_argument("--eval-every", type=int, default=5000)
    run.add_argument("--checkpoint-every", type=int, default=5000)
    run.add_argument("--log-every", type=int, default=20)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, help="torch threads per process")
    run.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.task == "panoptic" and not args.train_panoptic:
        p.error("--task panoptic needs --train-panoptic")
    if args.val_images and not args.val_annotations or args.task == "panoptic" and args.val_images and not \
            args.val_panoptic:
        p.error("evaluation needs --val-images, --val-annotations (and --val-panoptic for --task panoptic)")
    return args


def setup_distributed() -> tuple[int, int, torch.device]:
    """Rank, world size and device; a process group when launched by torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def make_dataset(args, split: str):
    images, annotations = getattr(args, f"{split}_images"), getattr(args, f"{split}_annotations")
    transforms = None
    if split == "train":
        transforms = LargeScaleJitter(args.crop_size, scale_range=(args.min_scale, args.max_scale))
    if args.task == "instance":
        return COCOInstanceDataset(images, annotations, transforms)
    return COCOPanopticDataset(images, annotations, getattr(args, f"{split}_panoptic"), transforms)


def parameter_groups(trainable: Trainable, args) -> list[dict]:
    """Mask2Former's optimiser groups: backbone lr x multiplier; no weight decay on norm layers and embeddings."""
    norms = (nn.BatchNorm2d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm)  # (frozen ones have no parameters)
    groups, seen = [], set()
    for name, module in trainable.named_modules():
        for param in module.parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr = args.lr * (args.backbone_lr_mult if name.startswith("model.backbone") else 1.0)
            decay = 0.0 if isinstance(module, norms + (nn.Embedding,)) or module.__class__.__name__.endswith(
                "Norm2d") else args.weight_decay
            groups.append({"params": [param], "lr": lr, "weight_decay": decay})
    return groups


def to_device(targets: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]


def infinite_batches(dataset, args, rank: int, world: int, start_step: int):
    """Batches forever; each epoch reshuffled (distributed: each rank its own share of the epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.workers, persistent_workers=args.workers > 0,
                        collate_fn=functools.partial(collate, pad_value=PIXEL_MEAN))
    if len(loader) == 0:
        raise ValueError(f"{len(dataset)} training images are fewer than {world} processes x batch {args.batch_size}")
    epoch = start_step // len(loader)  # a resumed run starts a fresh epoch at the right count
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def eval_input(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the shorter side is ``size`` and the longer at most ``size * 1333 / 800`` (Mask2Former)."""
    if size <= 0:
        return image
    h, w = image.shape[-2:]
    scale = min(size / min(h, w), size * 1333 / 800 / max(h, w))
    new = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(image[None], size=new, mode="bilinear", align_corners=False, antialias=True)[0]


@torch.no_grad()
def evaluate(trainable: Trainable, dataset, args, rank: int, world: int, device: torch.device, amp) -> dict:
    """Every rank evaluates every world-th image; the evaluators gather the ranks' results."""
    model = trainable.model
    was_training = model.training
    model.eval()
    num_classes = dataset.num_classes
    if args.task == "instance":
        instance = InstanceEvaluator(args.val_annotations, category_ids=dataset.category_ids)
    else:
        instance = InstanceEvaluator(category_ids=dataset.category_ids)
        panoptic, semantic = PanopticEvaluator(dataset.is_thing), SemanticEvaluator(num_classes)
    for index in range(rank, len(dataset), world):
        image, target = dataset[index]
        original = tuple(image.shape[-2:])
        resized = eval_input(image, args.eval_size)
        empty = {"labels": target["labels"][:0], "masks": torch.zeros(0, *resized.shape[-2:], dtype=torch.bool)}
        images, _ = collate([(resized, empty)], pad_value=PIXEL_MEAN)
        with amp():
            outputs = model(images.to(device))
        logits = outputs["pred_logits"][0].float()
        masks = resize_mask_logits(outputs["pred_masks"][0].float(), images.shape[-2:], resized.shape[-2:], original)
        if args.task == "instance":
            instance.update(target["image_id"], {k: v.cpu() for k, v in mpseg.instance_inference(logits, masks).items()})
            continue
        pan_seg, segments = mpseg.panoptic_inference(logits, masks, is_thing=dataset.is_thing)
        panoptic.update(pan_seg.cpu(), segments, target["pan_seg"], target["segments_info"])
        semantic.update(mpseg.semantic_inference(logits, masks).argmax(0).cpu(), target["sem_seg"])
        things = torch.tensor(dataset.is_thing)[target["labels"]] if len(target["labels"]) else target["labels"].bool()
        detections = mpseg.instance_inference(logits, masks, is_thing=dataset.is_thing)
        instance.update(target["image_id"], {k: v.cpu() for k, v in detections.items()},
                        target={"masks": target["masks"][things], "labels": target["labels"][things]})
    model.train(was_training)
    metrics = {f"mask_{k}": v for k, v in instance.compute().items() if k != "per_class"}
    if args.task == "panoptic":
        metrics.update({k: v for k, v in panoptic.compute().items() if k != "per_class"})
        metrics["miou"] = semantic.compute()["miou"]
    return metrics


def plot_curves(history: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval" in h]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].plot([h["step"] for h in train], [h["loss"] for h in train])
    axes[0].set(xlabel="step", ylabel="loss (weighted sum)", yscale="log")
    for key in ("mask_ap", "pq", "miou"):
        points = [(h["step"], h["eval"][key]) for h in evals if key in h["eval"]]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=key)
    axes[1].set(xlabel="step", ylabel="held-out score (%)")
    if evals:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = setup_distributed()
    main_process = rank == 0
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    train_set = make_dataset(args, "train")
    val_set = make_dataset(args, "val") if args.val_images else None
    model = Segmenter(args, train_set.num_classes)
    noiser = mpseg.MaskPilotNoiser(train_set.num_classes, args.hidden_dim, point_noise=args.point_noise,
                                   label_noise=args.label_noise) if args.mask_pilot else None
    trainable = Trainable(model, noiser).to(device)
    matcher = mpseg.HungarianMatcher(num_points=args.points)
    criterion = mpseg.SetCriterion(train_set.num_classes, matcher, num_points=args.points)
    optimizer = torch.optim.AdamW(parameter_groups(trainable, args), lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (1 - min(step, args.steps) / args.steps) ** args.poly_power)
    use_amp = args.amp == "bf16" or args.amp == "auto" and device.type == "cuda"
    amp = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext

    start_step, history = 0, []
    checkpoint_path = os.path.join(args.out, "last.pt")
    resume = checkpoint_path if args.resume == "auto" else args.resume
    if resume and os.path.exists(resume):
        state = torch.load(resume, map_location="cpu", weights_only=False)
        trainable.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_step, history = state["step"], state["history"]
        if main_process:
            print(f"resumed from {resume} at step {start_step}")
    elif args.resume and args.resume != "auto":
        raise FileNotFoundError(f"--resume {args.resume}: no such checkpoint")
    ddp = nn.parallel.DistributedDataParallel(trainable) if world > 1 else trainable
    if main_process:
        os.makedirs(args.out, exist_ok=True)
        print(f"mpseg {mpseg.__version__} | {args.task}, {len(train_set)} training images, {train_set.num_classes} "
              f"classes | {'MP-Former' if args.mask_pilot else 'Mask2Former'}, backbone {args.backbone} | {world} "
              f"process(es) on {device.type}, batch {args.batch_size * world} | bf16 autocast {use_amp}")

    generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + rank)
    batches = infinite_batches(train_set, args, rank, world, start_step)
    steps = range(start_step + 1, args.steps + 1)
    bar = tqdm(steps, initial=start_step, total=args.steps, ncols=100, mininterval=1.0) if (
        main_process and tqdm is not None and not args.no_progress) else steps
    log = open(os.path.join(args.out, "log.jsonl"), "a") if main_process else None
    trainable.train()
    for step in bar:
        images, targets = next(batches)
        images, targets = images.to(device, non_blocking=True), to_device(targets, device)
        with amp():
            outputs, extra = ddp(images, targets, generator=generator)
            losses = criterion(outputs, targets, generator=generator)
        loss = losses["loss"] + (extra if extra is not None else 0)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"step {step}: loss is {float(loss)} ({ {k: float(v) for k, v in losses.items()} })")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.parameters(), args.clip)
        optimizer.step()
        schedule.step()
        if main_process and (step % args.log_every == 0 or step == start_step + 1 or step == args.steps):
            entry = {"step": step, "loss": float(losses["loss"].detach()), "lr": max(schedule.get_last_lr())}
            history.append(entry)
            log.write(json.dumps(entry) + "\n")
            log.flush()
            if bar is not steps:
                bar.set_postfix(loss=f"{entry['loss']:.2f}")
        if val_set is not None and (step % args.eval_every == 0 or step == args.steps):
            metrics = evaluate(trainable, val_set, args, rank, world, device, amp)
            if main_process:
                history.append({"step": step, "eval": metrics})
                log.write(json.dumps(history[-1]) + "\n")
                log.flush()
                print(f"\nstep {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()
                                                     if not k.startswith("n") and isinstance(v, float)))
        if step % args.checkpoint_every == 0 or step == args.steps:
            if main_process:
                state = {"step": step, "model": trainable.state_dict(), "optimizer": optimizer.state_dict(),
                         "schedule": schedule.state_dict(), "history": history, "args": vars(args)}
                torch.save(state, checkpoint_path + ".tmp")
                os.replace(checkpoint_path + ".tmp", checkpoint_path)  # never a half-written last.pt
                plot_curves(history, os.path.join(args.out, "curves.png"))
            if world > 1:
                dist.barrier()
    if main_process:
        log.close()
        print(f"done: {args.steps} steps, checkpoint {checkpoint_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
