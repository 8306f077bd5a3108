# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Hungarian matching between predicted and ground-truth masks (Mask2Former, Sec. 3.3 and Appendix).

The matching cost of prediction q and target t in one image is

    cost_class * (-p_q(c_t)) + cost_mask * BCE_q,t + cost_dice * Dice_q,t

where ``p_q`` is the softmax over the K + 1 classes and the two mask terms are evaluated on ``num_points`` points drawn
uniformly once per image and shared by all predictions and targets. The optimal one-to-one assignment comes from
:func:`scipy.optimize.linear_sum_assignment`, wrapped as the custom op ``torch.ops.mpseg.linear_sum_assignment`` so
that ``torch.compile`` traces the matcher without a graph break.

Compared with the official implementation, the costs of all images are computed in batched matrix products, the
ground-truth masks are sampled by gathering four neighbours per point instead of being converted to float at full
resolution, and the sigmoid cross-entropy needs one product instead of two. The random points are drawn in the same
order (one set per image), so a run seeded like the official code matches the same way.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from .._sync import host_to_device, reads_for_free
from ..ops.point_sampling import point_sample, sample_masks_at_points, uniform_points
from .losses import pairwise_mask_costs

__all__ = ["HungarianMatcher"]

_NONFINITE_POLICIES = ("replace", "raise")


def _validate_prediction(outputs: dict, name: str = "outputs") -> tuple[Tensor, Tensor]:
    if not isinstance(outputs, dict):
        raise TypeError(f"{name} must be a dict with 'pred_logits' and 'pred_masks', got {type(outputs).__name__}")
    for key in ("pred_logits", "pred_masks"):
        if key not in outputs:
            raise ValueError(f"{name} must contain '{key}', got keys {sorted(outputs)}")
    logits, masks = outputs["pred_logits"], outputs["pred_masks"]
    if not isinstance(logits, Tensor) or logits.dim() != 3:
        raise ValueError(f"{name}['pred_logits'] must be a Tensor [B, Q, K+1], got {_describe(logits)}")
    if not isinstance(masks, Tensor) or masks.dim() != 4:
        raise ValueError(f"{name}['pred_masks'] must be a Tensor [B, Q, H, W], got {_describe(masks)}")
    if masks.shape[:2] != logits.shape[:2]:
        raise ValueError(
            f"{name}['pred_masks'] [B, Q, H, W] and {name}['pred_logits'] [B, Q, K+1] disagree on B, Q: "
            f"{tuple(masks.shape)} vs {tuple(logits.shape)}"
        )
    return logits, masks


def _validate_targets(targets: Sequence[dict], batch_size: int, num_classes: int, device: torch.device) -> None:
    """Checks the Mask2Former target format, and the label range of labels on the CPU (free).

    Labels on a GPU are range-checked by :meth:`HungarianMatcher.cost_matrices`, whose one copy of the cost matrix
    to the host carries their minimum and maximum along (no extra sync). Under ``torch.compile`` only the structure is
    checked: reading the labels would break the graph, and an out-of-range label still fails there, in the
    cross-entropy (index error).
    """
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets must be a list of dicts (one per image), got {type(targets).__name__}")
    if len(targets) != batch_size:
        raise ValueError(f"targets must hold one dict per image: expected {batch_size}, got {len(targets)}")
    for b, target in enumerate(targets):
        if not isinstance(target, dict) or "labels" not in target or "masks" not in target:
            raise ValueError(f"targets[{b}] must be a dict with 'labels' and 'masks'")
        labels, masks = target["labels"], target["masks"]
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.dtype != torch.int64:
            raise ValueError(f"targets[{b}]['labels'] must be an int64 Tensor [N], got {_describe(labels)}")
        if not isinstance(masks, Tensor) or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(
                f"targets[{b}]['masks'] must be a Tensor [N, H, W] with N = len(labels) = {labels.shape[0]}, "
                f"got {_describe(masks)}"
            )
        if masks.is_complex():
            raise TypeError(f"targets[{b}]['masks'] must be bool, integer or real, got {masks.dtype}")
    if not torch.compiler.is_compiling():
        _check_label_range(targets, num_classes, device)


def _check_label_range(targets: Sequence[dict], num_classes: int, device: torch.device) -> None:
    host_labels = [t["labels"] for t in targets if reads_for_free(t["labels"]) and t["labels"].numel()]
    if host_labels:
        low, high = torch.aminmax(torch.cat(host_labels))
        _raise_label_range(int(low), int(high), num_classes)


def _raise_label_range(low: int | float, high: int | float, num_classes: int) -> None:
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"target labels must be in [0, num_classes) = [0, {num_classes}), got values in [{int(low)}, {int(high)}]"
        )


def _describe(x) -> str:
    if isinstance(x, Tensor):
        return f"Tensor of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def _canvas_size(targets: Sequence[dict]) -> tuple[int, int]:
    """The common (H, W) that every target is zero-padded to, as Mask2Former pads a batch's target masks."""
    heights = [t["masks"].shape[-2] for t in targets]
    widths = [t["masks"].shape[-1] for t in targets]
    return (max(heights, default=0), max(widths, default=0))


class HungarianMatcher(nn.Module):
    """Optimal one-to-one assignment of predictions to ground-truth masks, per image.

    Args:
        cost_class (float): weight of the classification cost ``-p(target class)``.
        cost_mask (float): weight of the mean sigmoid cross-entropy over the sampled points.
        cost_dice (float): weight of the dice cost over the sampled points.
        num_points (int): points drawn uniformly per image, shared by its predictions and targets.
        nonfinite (str): what to do when a cost is NaN or inf (a diverged model or an fp16 overflow). ``"replace"``
            (default) substitutes a finite cost larger than any assignment of finite costs can offset, so such a
            pair is matched only when no assignment avoids it; the non-finite prediction then shows in the loss, and an
            ``torch.amp.GradScaler`` step is skipped as usual. ``"raise"`` raises a ValueError naming the image and
            the predictions and targets involved.

    Targets of different sizes in one batch are treated as zero-padded at the bottom and right to the largest one,
    and the sampling points are relative to that common canvas (Mask2Former pads a batch's target masks this way).
    When an image has more targets than there are predictions, ``min(Q, T)`` pairs are returned and the remaining
    targets stay unmatched.

    Example:
        >>> import torch, mpseg
        >>> matcher = mpseg.HungarianMatcher(num_points=64)
        >>> outputs = {"pred_logits": torch.randn(1, 5, 4), "pred_masks": torch.randn(1, 5, 8, 8)}
        >>> targets = [{"labels": torch.tensor([2, 0]), "masks": torch.rand(2, 32, 32) > 0.5}]
        >>> pred_index, target_index = matcher(outputs, targets)[0]
        >>> pred_index.shape, target_index.dtype
        (torch.Size([2]), torch.int64)
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_mask: float = 5.0,
        cost_dice: float = 5.0,
        num_points: int = 12544,
        *,
        nonfinite: Literal["replace", "raise"] = "replace",
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("at least one of cost_class, cost_mask, cost_dice must be non-zero, got all 0")
        if not isinstance(num_points, int) or num_points <= 0:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        if nonfinite not in _NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_POLICIES}, got {nonfinite!r}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = num_points
        self.nonfinite = nonfinite

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
            f"num_points={self.num_points}, nonfinite={self.nonfinite!r}"
        )

    @torch.no_grad()
    def cost_matrices(
        self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]], generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """The matching cost of every prediction against every target, per image.

        Args:
            outputs (dict): ``pred_logits`` (Tensor[B, Q, K+1]) and ``pred_masks`` (Tensor[B, Q, H, W]); other keys
                are ignored.
            targets (list[dict]): per image ``labels`` (int64 Tensor[T_b]) and ``masks`` (Tensor[T_b, H_t, W_t], bool,
                uint8 or float in [0, 1]).
            generator (torch.Generator, optional): source of the sampling points.

        Returns:
            list[Tensor[Q, T_b]]: float32 (float64 for float64 predictions) cost matrices on the CPU; they may hold
            NaN or inf when the predictions do.
        """
        logits, masks = _validate_prediction(outputs)
        batch_size, num_queries = logits.shape[:2]
        _validate_targets(targets, batch_size, logits.shape[-1] - 1, logits.device)
        device = logits.device
        num_targets = [int(t["labels"].shape[0]) for t in targets]
        max_targets = max(num_targets, default=0)
        canvas = _canvas_size(targets)
        dtype = torch.promote_types(logits.dtype, torch.float32)

        # One point set per image, drawn in image order as the official matcher does (also for images without
        # targets), so that seeded runs consume the random stream identically.
        points = torch.cat(
            [uniform_points(1, self.num_points, device=masks.device, generator=generator) for _ in range(batch_size)]
        )
        # The costs are sums over points, so their order is free: raster order on the target canvas makes the gathers
        # from the (large) target masks sweep memory forward instead of jumping, several times faster on a CPU.
        if canvas[0] * canvas[1] > 0:
            raster = (points[..., 1] * canvas[0]).floor() * canvas[1] + (points[..., 0] * canvas[1]).floor()
            points = torch.gather(points, 1, raster.argsort(dim=1).unsqueeze(-1).expand(-1, -1, 2))
        # Matching costs in full precision even under autocast: softmax / softplus / dice of fp16 logits are too
        # coarse to rank 100 queries reliably.
        with torch.autocast(device_type=device.type, enabled=False):
            probs = logits.to(dtype).softmax(-1)  # [B, Q, K+1]
            pred_points = point_sample(masks.to(dtype), points.to(dtype))  # [B, Q, P]
            target_points = pred_points.new_zeros(batch_size, max_targets, self.num_points)
            labels = torch.zeros(batch_size, max_targets, dtype=torch.int64, device=device)
            for b, target in enumerate(targets):
                if num_targets[b] == 0:
                    continue
                # Sampled where the masks live; only the [T, P] samples move, never the full-resolution masks.
                target_masks = target["masks"]
                target_points[b, : num_targets[b]] = sample_masks_at_points(
                    target_masks, points[b].to(target_masks.device), canvas_size=canvas, dtype=dtype
                ).to(device)
                labels[b, : num_targets[b]] = host_to_device(target["labels"], device)

            # Labels on a GPU are range-checked after the copy below; clamped here so that a bad one cannot fail the
            # gather first with a device-side assert.
            num_classes = probs.shape[-1] - 1
            gather_labels = labels.clamp(0, num_classes).unsqueeze(1).expand(-1, num_queries, -1)
            cost = self.cost_class * -torch.gather(probs, 2, gather_labels)
            if self.cost_mask != 0 or self.cost_dice != 0:
                mask_cost, dice_cost = pairwise_mask_costs(pred_points, target_points)
                cost = cost + self.cost_mask * mask_cost + self.cost_dice * dice_cost
        device_labels = [t["labels"] for t in targets if not reads_for_free(t["labels"]) and t["labels"].numel()]
        if device_labels and not torch.compiler.is_compiling():
            # The labels' range rides along with the cost matrix: one transfer, one sync for the whole batch.
            bounds = torch.stack(torch.aminmax(torch.cat([x.to(device) for x in device_labels]))).to(cost.dtype)
            packed = torch.cat([cost.reshape(-1), bounds]).cpu()
            _raise_label_range(float(packed[-2]), float(packed[-1]), num_classes)
            cost = packed[:-2].view(cost.shape)
        else:
            cost = cost.cpu()  # one transfer for the whole batch
        return [cost[b, :, : num_targets[b]] for b in range(batch_size)]

    def forward(
        self, outputs: dict[str, Tensor], targets: Sequence[dict[str, Tensor]], generator: torch.Generator | None = None
    ) -> list[tuple[Tensor, Tensor]]:
        """Matches predictions to targets.

        Args:
            outputs (dict): ``pred_logits`` (Tensor[B, Q, K+1]) and ``pred_masks`` (Tensor[B, Q, H, W]).
            targets (list[dict]): per image ``labels`` (int64 Tensor[T_b]) and ``masks`` (Tensor[T_b, H_t, W_t]).
            generator (torch.Generator, optional): source of the sampling points; the global RNG when None.

        Returns:
            list[tuple[Tensor, Tensor]]: per image ``(pred_index, target_index)``, int64 CPU tensors of length
            ``min(Q, T_b)``, ``pred_index`` ascending. Empty for an image without targets.
        """
        costs = self.cost_matrices(outputs, targets, generator=generator)
        return [
            tuple(torch.ops.mpseg.linear_sum_assignment(cost, self.nonfinite, image))
            for image, cost in enumerate(costs)
        ]


# The assignment as a custom op: SciPy cannot be traced, but the op's output shape is known without running it
# (min(Q, T) pairs), so torch.compile keeps the whole matcher, and the criterion's loop over layers, in one graph
# instead of breaking at every call (and Dynamo runs a loop with a graph break in it uncompiled).
@torch.library.custom_op("mpseg::linear_sum_assignment", mutates_args=())
def _linear_sum_assignment(cost: Tensor, nonfinite: str, image: int) -> tuple[Tensor, Tensor]:
    """Optimal assignment of one image's cost matrix.

    Args:
        cost (Tensor[Q, T]): matching costs on the CPU (float32 or float64).
        nonfinite (str): ``"replace"`` or ``"raise"``, see :class:`HungarianMatcher`.
        image (int): the image's index in the batch, for the error message.

    Returns:
        tuple[Tensor[min(Q, T)], Tensor[min(Q, T)]]: int64 ``(pred_index, target_index)`` on the CPU, ``pred_index``
        ascending.
    """
    if cost.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    cost = cost.detach()
    finite = torch.isfinite(cost)
    if not bool(finite.all()):
        if nonfinite == "raise":
            bad = ~finite
            predictions = bad.any(1).nonzero().flatten().tolist()
            target_ids = bad.any(0).nonzero().flatten().tolist()
            raise ValueError(
                f"HungarianMatcher: the matching cost of image {image} is NaN or inf for prediction(s) "
                f"{predictions} (against target(s) {target_ids}); the model produced non-finite logits there "
                f"(diverged training or fp16 overflow?). Pass nonfinite='replace' to match around them instead."
            )
        cost = _replace_nonfinite(cost, finite)
    pred_index, target_index = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(pred_index, dtype=torch.int64), torch.as_tensor(target_index, dtype=torch.int64)


@_linear_sum_assignment.register_fake
def _(cost: Tensor, nonfinite: str, image: int) -> tuple[Tensor, Tensor]:
    pairs = torch.sym_min(cost.shape[0], cost.shape[1])
    return cost.new_empty(pairs, dtype=torch.int64), cost.new_empty(pairs, dtype=torch.int64)


def _replace_nonfinite(cost: Tensor, finite: Tensor) -> Tensor:
    # With m = min(Q, T) pairs, a replacement R > f_max + m (f_max - f_min) makes every assignment with one more
    # non-finite pair cost more than any with one fewer, so they are used only when unavoidable. A huge constant
    # (e.g. the dtype's max) would instead swamp the finite costs in the solver's arithmetic.
    values = cost[finite]
    low = float(values.min()) if values.numel() else 0.0
    high = float(values.max()) if values.numel() else 0.0
    pairs = min(cost.shape)
    replacement = high + pairs * (high - low) + 1.0
    return torch.where(finite, cost, torch.full_like(cost, replacement))
