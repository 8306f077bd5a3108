# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask losses on sampled points, and their pairwise forms used as matching costs.

The pairwise forms score every prediction against every target of an image with matrix products instead of
materialising a [Q, T, P] tensor: for logits ``x`` and binary targets ``t`` on P points,

* sigmoid BCE: ``BCE(x, t) = softplus(x) - x * t``, so ``mean_p BCE = mean_p softplus(x) - (x @ t.T) / P``;
* dice: ``1 - (2 * sigmoid(x) @ t.T + 1) / (sum sigmoid(x) + sum t + 1)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["sigmoid_ce_loss", "dice_loss", "pairwise_sigmoid_ce_cost", "pairwise_dice_cost", "pairwise_mask_costs"]


def sigmoid_ce_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Sigmoid binary cross-entropy, averaged over points, summed over masks, divided by ``num_masks``.

    Args:
        logits (Tensor[N, P]): mask logits at sampled points.
        targets (Tensor[N, P]): target values in [0, 1] at the same points.
        num_masks (float or Tensor[]): normaliser (Mask2Former: number of ground-truth masks in the batch).

    Returns:
        Tensor[]: the loss; an exact zero (still attached to ``logits``' graph) when N = 0.
    """
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float | Tensor) -> Tensor:
    """Dice loss ``1 - (2 |x t| + 1) / (|x| + |t| + 1)``, ``x = sigmoid(logits)``, summed over masks / ``num_masks``.

    Args:
        logits (Tensor[N, P]): mask logits at sampled points.
        targets (Tensor[N, P]): target values in [0, 1].
        num_masks (float or Tensor[]): normaliser.

    Returns:
        Tensor[]: the loss; an exact zero (still attached to the graph) when N = 0.
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def _softplus_sum(logits: Tensor, probs: Tensor) -> Tensor:
    """``softplus(logits).sum(-1)`` from ``probs = sigmoid(logits)``, which the dice cost needs anyway.

    ``softplus(x) = relu(x) - log(max(p, 1 - p))`` holds exactly (x > 0: ``x - log p``; x <= 0: ``-log(1 - p)``), the
    log's argument stays in [0.5, 1], and it costs a quarter of ``F.softplus`` on a CPU (scalar code there).
    """
    return logits.clamp(min=0).sum(-1) - torch.maximum(probs, 1 - probs).log_().sum(-1)


def pairwise_mask_costs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Both pairwise mask costs at once, sharing the sigmoid.

    Args:
        logits (Tensor[..., Q, P]): prediction logits at P points.
        targets (Tensor[..., T, P]): target values in [0, 1] at the same points.

    Returns:
        tuple[Tensor[..., Q, T], Tensor[..., Q, T]]: :func:`pairwise_sigmoid_ce_cost` and :func:`pairwise_dice_cost`.
    """
    num_points = logits.shape[-1]
    probs = logits.sigmoid()
    targets_t = targets.transpose(-1, -2)
    ce = (_softplus_sum(logits, probs).unsqueeze(-1) - logits @ targets_t) / num_points
    dice = 1 - (2 * (probs @ targets_t) + 1) / (probs.sum(-1).unsqueeze(-1) + targets.sum(-1).unsqueeze(-2) + 1)
    return ce, dice


def pairwise_sigmoid_ce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean sigmoid BCE over points of every prediction against every target.

    Args:
        logits (Tensor[..., Q, P]): prediction logits at P points.
        targets (Tensor[..., T, P]): target values in [0, 1] at the same points.

    Returns:
        Tensor[..., Q, T]: ``cost[q, t] = mean_p BCE(logits[q, p], targets[t, p])``.
    """
    num_points = logits.shape[-1]
    # BCE(x, t) = softplus(x) - x t exactly, for any t in [0, 1]; one product instead of Mask2Former's two.
    positive_part = F.softplus(logits).sum(-1, keepdim=True)  # [..., Q, 1]
    return (positive_part - logits @ targets.transpose(-1, -2)) / num_points


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss of every prediction against every target.

    Args:
        logits (Tensor[..., Q, P]): prediction logits.
        targets (Tensor[..., T, P]): target values in [0, 1].

    Returns:
        Tensor[..., Q, T]: ``1 - (2 x.t + 1) / (sum x + sum t + 1)`` with ``x = sigmoid(logits)``.
    """
    probs = logits.sigmoid()
    numerator = 2 * (probs @ targets.transpose(-1, -2))
    denominator = probs.sum(-1).unsqueeze(-1) + targets.sum(-1).unsqueeze(-2)
    return 1 - (numerator + 1) / (denominator + 1)
