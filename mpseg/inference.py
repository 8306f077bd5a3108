# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Turning Mask2Former predictions into semantic, panoptic and instance results (Mask2Former's post-processing).

Typical use, per image: :func:`resize_mask_logits` to bring the mask logits from mask-feature resolution to the
original image size (upsample to the padded input, crop the padding, resize), then one of the three inferences.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["semantic_inference", "panoptic_inference", "instance_inference", "resize_mask_logits"]


def _check_pair(pred_logits: Tensor, pred_masks: Tensor, batched: bool) -> None:
    lead = "[B, Q, " if batched else "[Q, "
    if pred_logits.dim() != (3 if batched else 2):
        raise ValueError(f"pred_logits must have shape {lead}K+1], got {tuple(pred_logits.shape)}")
    if pred_masks.dim() != (4 if batched else 3):
        raise ValueError(f"pred_masks must have shape {lead}H, W], got {tuple(pred_masks.shape)}")
    if pred_logits.shape[:-1] != pred_masks.shape[:-2]:
        raise ValueError(
            f"pred_logits {tuple(pred_logits.shape)} and pred_masks {tuple(pred_masks.shape)} disagree on "
            f"{'batch and ' if batched else ''}query count"
        )
    if pred_logits.shape[-1] < 1:
        raise ValueError(f"pred_logits needs at least the no-object logit, got shape {tuple(pred_logits.shape)}")


def resize_mask_logits(
    pred_masks: Tensor,
    padded_size: Sequence[int],
    image_size: Sequence[int],
    output_size: Sequence[int] | None = None,
) -> Tensor:
    """Bring mask logits to an image's original size, as Mask2Former does before its inferences.

    The logits are upsampled (bilinear) to the padded input size the model saw, the padding is cropped away, and the
    valid part is resized (bilinear) to ``output_size``.

    Args:
        pred_masks (Tensor[..., h, w]): mask logits at mask-feature resolution (e.g. [B, Q, h, w] or [Q, h, w]).
        padded_size (Sequence[int]): ``(H_pad, W_pad)`` of the (padded) network input.
        image_size (Sequence[int]): ``(H_img, W_img)`` of the valid image inside the padded input (top-left).
        output_size (Sequence[int], optional): final ``(H_out, W_out)``, e.g. the original image size before
            resizing for the network; default ``image_size``.

    Returns:
        Tensor[..., H_out, W_out]: resized logits, same leading dimensions and dtype.
    """
    if pred_masks.dim() < 2:
        raise ValueError(f"pred_masks must have shape [..., h, w], got {tuple(pred_masks.shape)}")
    padded = (int(padded_size[0]), int(padded_size[1]))
    image = (int(image_size[0]), int(image_size[1]))
    output = image if output_size is None else (int(output_size[0]), int(output_size[1]))
    if not (0 < image[0] <= padded[0] and 0 < image[1] <= padded[1]):
        raise ValueError(f"image_size {image} must be positive and fit in padded_size {padded}")
    if min(output) <= 0:
        raise ValueError(f"output_size must be positive, got {output}")
    lead = pred_masks.shape[:-2]
    # One-channel maps: the same bilinear values, without CPU's channels-last copy of a many-channel tensor.
    x = pred_masks.reshape(-1, 1, *pred_masks.shape[-2:])
    if x.shape[0] == 0:
        return pred_masks.new_zeros(*lead, *output)
    x = F.interpolate(x, size=padded, mode="bilinear", align_corners=False)
    x = x[..., : image[0], : image[1]]
    if image != output:
        x = F.interpolate(x, size=output, mode="bilinear", align_corners=False)
    return x.reshape(*lead, *output)


def semantic_inference(pred_logits: Tensor, pred_masks: Tensor) -> Tensor:
    """Per-class score maps: ``sum_q softmax(logits_q)[k] * sigmoid(mask_q)``, no-object dropped.

    Args:
        pred_logits (Tensor[B, Q, K+1]): class logits (also accepted unbatched, [Q, K+1]).
        pred_masks (Tensor[B, Q, H, W]): mask logits (unbatched: [Q, H, W]).

    Returns:
        Tensor[B, K, H, W] (unbatched: [K, H, W]): class scores; ``argmax(1)`` gives the semantic map. With no
        queries the scores are all zero.
    """
    batched = pred_logits.dim() == 3
    _check_pair(pred_logits, pred_masks, batched)
    probs = F.softmax(pred_logits, dim=-1)[..., :-1]
    masks = pred_masks.sigmoid()
    if batched:
        return torch.einsum("bqk,bqhw->bkhw", probs, masks)
    return torch.einsum("qk,qhw->khw", probs, masks)


def _thing_flags(is_thing: Sequence[bool] | Tensor | Collection[int], num_classes: int, device) -> Tensor:
    if isinstance(is_thing, (set, frozenset)):
        flags = torch.zeros(num_classes, dtype=torch.bool)
        for k in is_thing:
            if not 0 <= int(k) < num_classes:
                raise ValueError(f"is_thing holds class id {k}, outside [0, {num_classes})")
            flags[int(k)] = True
        return flags.to(device)
    flags = torch.as_tensor(is_thing, device=device)
    if flags.dtype != torch.bool or flags.shape != (num_classes,):
        raise ValueError(
            f"is_thing must be a bool sequence of length K={num_classes} (or a set of thing class ids), got "
            f"dtype {flags.dtype} and shape {tuple(flags.shape)}"
        )
    return flags


def panoptic_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    *,
    is_thing: Sequence[bool] | Tensor | Collection[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, list[dict]]:
    """Mask2Former's panoptic merge for one image.

    Queries whose best class is not no-object and whose probability exceeds ``object_mask_threshold`` are kept;
    each pixel goes to the kept query with the highest ``probability * sigmoid(mask)``. A query's segment is the
    pixels it wins where its own mask is >= 0.5; it is dropped when it wins less than ``overlap_threshold`` of its
    own mask. Segments of the same stuff class are merged into one.

    Args:
        pred_logits (Tensor[Q, K+1]): class logits.
        pred_masks (Tensor[Q, H, W]): mask logits (already at the output size; see :func:`resize_mask_logits`).
        is_thing (Sequence[bool] | Tensor[K] | set[int]): per class, whether it is a thing (or the set of thing ids).
        object_mask_threshold (float): minimum class probability of a kept query.
        overlap_threshold (float): minimum fraction of its mask a query must keep after the merge.

    Returns:
        tuple: ``panoptic_seg`` (Tensor[H, W] int32, 0 = void, segments numbered from 1) and ``segments_info``, a
        list of ``{"id": int, "isthing": bool, "category_id": int}`` in id order. No kept query gives an all-void map
        and an empty list.
    """
    _check_pair(pred_logits, pred_masks, batched=False)
    num_classes = pred_logits.shape[-1] - 1
    flags = _thing_flags(is_thing, num_classes, "cpu").tolist()
    height, width = pred_masks.shape[-2:]
    panoptic_seg = torch.zeros((height, width), dtype=torch.int32, device=pred_masks.device)
    segments_info: list[dict] = []
    if pred_logits.shape[0] == 0:
        return panoptic_seg, segments_info

    scores, labels = F.softmax(pred_logits.float(), dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    scores, labels, masks = scores[keep], labels[keep], pred_masks[keep].float().sigmoid()
    if masks.shape[0] == 0:
        return panoptic_seg, segments_info

    winner = (scores[:, None, None] * masks).argmax(0)
    stuff_segment: dict[int, int] = {}
    segment_id = 0
    for k, label in enumerate(labels.tolist()):
        won = winner == k
        own = masks[k] >= 0.5
        segment = won & own
        won_area, own_area = int(won.sum()), int(own.sum())
        if won_area == 0 or own_area == 0 or not bool(segment.any()):
            continue
        # The won area (not its intersection with the own mask) over the own mask: Mask2Former's overlap test.
        if won_area / own_area < overlap_threshold:
            continue
        if not flags[label]:
            if label in stuff_segment:
                panoptic_seg[segment] = stuff_segment[label]
                continue
            stuff_segment[label] = segment_id + 1
        segment_id += 1
        panoptic_seg[segment] = segment_id
        segments_info.append({"id": segment_id, "isthing": bool(flags[label]), "category_id": int(label)})
    return panoptic_seg, segments_info


def instance_inference(
    pred_logits: Tensor,
    pred_masks: Tensor,
    *,
    topk: int = 100,
    is_thing: Sequence[bool] | Tensor | Collection[int] | None = None,
) -> dict[str, Tensor]:
    """Mask2Former's instance results for one image: the top-k (query, class) pairs.

    Each query can give several instances (one per class). The score is the class probability times the mean
    foreground probability inside the binarised mask (``sigmoid(mask)`` averaged where ``mask > 0``).

    Args:
        pred_logits (Tensor[Q, K+1]): class logits.
        pred_masks (Tensor[Q, H, W]): mask logits (at the output size).
        topk (int): instances kept (at most ``Q * K``), by class probability.
        is_thing (optional): as in :func:`panoptic_inference`; if given, only thing classes are returned (what
            Mask2Former does when panoptic and instance outputs are produced together).

    Returns:
        dict: ``masks`` (Tensor[N, H, W] bool), ``scores`` (Tensor[N]) and ``labels`` (Tensor[N] int64), sorted by
        class probability; N = 0 for an image without queries.
    """
    _check_pair(pred_logits, pred_masks, batched=False)
    if not isinstance(topk, int) or topk < 0:
        raise ValueError(f"topk must be a non-negative int, got {topk!r}")
    num_queries, num_classes = pred_logits.shape[0], pred_logits.shape[-1] - 1
    probs = F.softmax(pred_logits.float(), dim=-1)[:, :-1].flatten()
    labels = torch.arange(num_classes, device=pred_logits.device).repeat(num_queries)
    class_scores, index = probs.topk(min(topk, probs.numel()), sorted=True)
    labels = labels[index]
    masks = pred_masks[torch.div(index, max(num_classes, 1), rounding_mode="floor")].float()
    if is_thing is not None:
        keep = _thing_flags(is_thing, num_classes, labels.device)[labels]
        class_scores, labels, masks = class_scores[keep], labels[keep], masks[keep]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"masks": binary, "scores": class_scores * mask_scores, "labels": labels}
