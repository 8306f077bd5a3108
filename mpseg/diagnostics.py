# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Diagnostics from the MP-Former paper: how consistently consecutive decoder layers predict the same objects.

MP-Former (Zhang et al., CVPR 2023, Sec. 3) motivates mask piloting with the observation that Mask2Former's consecutive
decoder layers often disagree: the query matched to an object at one layer predicts a different region at the layer
before, so the attention mask that layer inherited pointed at the wrong place, and a ground truth often changes its
matched query from layer to layer (low query utilisation). :func:`layer_consistency` measures both.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["layer_consistency"]


def _predictions(outputs: dict) -> list[dict]:
    if not isinstance(outputs, dict) or "pred_masks" not in outputs or "pred_logits" not in outputs:
        raise TypeError("outputs must be a dict with 'pred_logits' and 'pred_masks' (and optionally 'aux_outputs')")
    layers = [
        {"pred_logits": aux["pred_logits"], "pred_masks": aux["pred_masks"]} for aux in outputs.get("aux_outputs", [])
    ]
    layers.append({"pred_logits": outputs["pred_logits"], "pred_masks": outputs["pred_masks"]})
    shape = tuple(layers[-1]["pred_masks"].shape)
    for i, layer in enumerate(layers):
        if tuple(layer["pred_masks"].shape) != shape:
            raise ValueError(f"every prediction must have pred_masks of shape {shape}; prediction {i} has "
                             f"{tuple(layer['pred_masks'].shape)}")
    return layers


def _query_of_target(indices, num_targets: Sequence[int]) -> list[Tensor]:
    """Per image, the query matched to each ground truth (-1 where the matcher left a ground truth unmatched)."""
    result = []
    for (pred_idx, tgt_idx), n in zip(indices, num_targets):
        query = torch.full((n,), -1, dtype=torch.long)
        query[torch.as_tensor(tgt_idx, dtype=torch.long).cpu()] = torch.as_tensor(pred_idx, dtype=torch.long).cpu()
        result.append(query)
    return result


@torch.no_grad()
def layer_consistency(
    outputs: dict,
    targets: Sequence[dict],
    matcher: Callable,
    *,
    match_layer: str = "next",
    generator: Optional[torch.Generator] = None,
) -> dict:
    """Layer-wise consistency of a Mask2Former-style decoder (the MP-Former paper's diagnostic).

    Every prediction (``aux_outputs`` in order, then the final one) is matched to the ground truths with ``matcher``.
    For each pair of consecutive predictions (l, l+1) and each ground truth g:

    * ``iou[l]``: the IoU between the binary masks (logit > 0, i.e. sigmoid > 0.5) that predictions l and l+1 give for
      the *same query*: the query matched to g at prediction l+1 (``match_layer="next"``, default: the query whose
      attention at layer l+1 was steered by its own mask from prediction l) or at prediction l (``"current"``). Two
      empty masks count as IoU 1 (they agree).
    * ``same_query[l]``: how often g is matched to the same query at l and l+1 (the paper's query utilisation).

    Values are averaged over all ground truths of the batch (unmatched ground truths, possible when Q < N, are left
    out of ``iou`` and count as a change in ``same_query``).

    Args:
        outputs (dict): decoder outputs: ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, H, W] and ``aux_outputs``.
        targets (list[dict]): ``{"labels": [N], "masks": [N, H', W']}`` per image.
        matcher (Callable): ``matcher(outputs, targets) -> [(pred_index, target_index), ...]`` per image, e.g.
            :class:`mpseg.HungarianMatcher`.
        match_layer (str): ``"next"`` or ``"current"``: which prediction of the pair picks the query.
        generator (torch.Generator, optional): passed to the matcher when it accepts one (point sampling).

    Returns:
        dict: ``iou`` and ``same_query`` (lists of floats, one per consecutive pair, earliest first), ``mean_iou`` and
        ``mean_same_query`` (their means over pairs), ``num_targets`` (ground truths counted), ``num_layers`` (number
        of predictions). With no ground truth the values are NaN.

    Example:
        Two predictions that agree exactly (one class, two queries, one ground truth):

        >>> import torch
        >>> from mpseg import HungarianMatcher
        >>> masks = torch.full((1, 2, 8, 8), -10.0)
        >>> masks[0, 0, :4] = 10.0
        >>> layer = {"pred_logits": torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]]), "pred_masks": masks}
        >>> outputs = dict(layer, aux_outputs=[dict(layer)])
        >>> targets = [{"labels": torch.tensor([0]), "masks": masks[0, :1] > 0}]
        >>> stats = layer_consistency(outputs, targets, HungarianMatcher(num_points=64))
        >>> round(stats["mean_iou"], 3), round(stats["mean_same_query"], 3)
        (1.0, 1.0)
    """
    if match_layer not in ("next", "current"):
        raise ValueError(f"match_layer must be 'next' or 'current', got {match_layer!r}")
    layers = _predictions(outputs)
    batch = layers[-1]["pred_masks"].shape[0]
    if len(targets) != batch:
        raise ValueError(f"targets must hold one dict per image: {batch} images, got {len(targets)} targets")
    num_targets = [int(t["labels"].shape[0]) for t in targets]

    takes_generator = "generator" in inspect.signature(matcher.forward if hasattr(matcher, "forward")
                                                       else matcher).parameters
    queries = []
    for layer in layers:
        layer = {k: v.detach() for k, v in layer.items()}
        indices = matcher(layer, targets, generator=generator) if takes_generator else matcher(layer, targets)
        queries.append(_query_of_target(indices, num_targets))

    ious, same = [], []
    total = sum(num_targets)
    for l in range(len(layers) - 1):
        anchor = queries[l + 1] if match_layer == "next" else queries[l]
        pair_ious, kept = [], 0
        for b in range(batch):
            keep = anchor[b] >= 0
            q = anchor[b][keep].to(layers[l]["pred_masks"].device)
            kept += int((queries[l][b] == queries[l + 1][b]).logical_and(queries[l][b] >= 0).sum())
            if q.numel() == 0:
                continue
            a = layers[l]["pred_masks"][b, q].flatten(1) > 0
            c = layers[l + 1]["pred_masks"][b, q].flatten(1) > 0
            inter = (a & c).sum(-1).float()
            union = (a | c).sum(-1).float()
            pair_ious.append(torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)))
        all_ious = torch.cat(pair_ious) if pair_ious else torch.empty(0)
        ious.append(all_ious.mean().item() if all_ious.numel() else math.nan)
        same.append(kept / total if total else math.nan)

    def _mean(values):
        return sum(values) / len(values) if values else math.nan

    return {
        "iou": ious,
        "same_query": same,
        "mean_iou": _mean(ious),
        "mean_same_query": _mean(same),
        "num_targets": total,
        "num_layers": len(layers),
    }
