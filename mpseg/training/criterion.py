# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The set criterion of Mask2Former, with MP-Former's mask-pilot losses as a second assignment path.

Every prediction (the final one and each auxiliary one) is scored the same way by :meth:`SetCriterion.prediction_losses`
once an assignment ``(pred_index, target_index)`` per image is known:

* ``loss_ce``: cross-entropy over the K + 1 classes, unmatched predictions labelled no-object (index K) with weight
  ``eos_coef``;
* ``loss_mask``, ``loss_dice``: sigmoid cross-entropy and dice on ``num_points`` importance-sampled points per matched
  mask (PointRend), summed over matched masks and divided by the number of masks.

Only where the assignment comes from differs. Matching queries are assigned by the Hungarian matcher, layer by
layer. Pilot queries (MP-Former, Zhang et al., CVPR 2023, Sec. 3) are assigned by construction: slot j reconstructs
ground truth ``target_index[j]``, so the assignment is read off ``pilot_outputs["target_index"]``; there are
``num_groups`` pilots per ground truth, hence the normaliser ``num_masks * num_groups``.

Random draws happen in the official order (final matching, final losses, final pilot losses, then for each earlier
layer its matching, losses and pilot losses), so seeded runs sample the points that MP-Former's code samples.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._sync import check_on_device, host_to_device
from ..ops.point_sampling import point_sample, sample_masks_at_points, sample_uncertain_points
from ._eager import run_eagerly
from .losses import dice_loss, sigmoid_ce_loss
from .matcher import _canvas_size, _describe, _validate_prediction, _validate_targets

__all__ = ["SetCriterion", "DEFAULT_WEIGHT_DICT"]

#: Mask2Former's loss weights (class 2, mask 5, dice 5), applied to every layer and to the pilot losses.
DEFAULT_WEIGHT_DICT: dict[str, float] = {"loss_ce": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}

_LOSS_KEY = re.compile(r"^loss_(ce|mask|dice)(_mp)?(_\d+)?$")

Assignment = list[tuple[Tensor, Tensor]]


class SetCriterion(nn.Module):
    """Mask2Former's training loss, with the mask-pilot (MP-Former) losses when the outputs hold pilots.

    Args:
        num_classes (int): K, the number of classes without no-object.
        matcher (nn.Module): maps ``(outputs, targets, generator)`` to one ``(pred_index, target_index)`` pair per
            image, e.g. :class:`HungarianMatcher`.
        weight_dict (dict[str, float], optional): loss weights for ``loss``. A key's weight is looked up as the exact
            key, then without its layer suffix, then without ``_mp`` (``loss_ce_mp_3`` -> ``loss_ce_mp`` ->
            ``loss_ce``); a key found nowhere is left out of ``loss``. Default: :data:`DEFAULT_WEIGHT_DICT`
            (2 for ``loss_ce*``, 5 for ``loss_mask*`` and ``loss_dice*``).
        eos_coef (float): cross-entropy weight of the no-object class.
        num_points (int): points per matched mask for the mask losses.
        oversample_ratio (float): PointRend oversampling of candidate points (>= 1).
        importance_sample_ratio (float): share of the points chosen by uncertainty ``-|logit|``, in [0, 1].

    The number of masks is the total number of targets in the batch; when a ``torch.distributed`` process group is
    initialised it is summed over ranks and divided by the world size (at least 1), so that averaging the gradients
    over ranks, as DistributedDataParallel does, gives the mask losses of one process seeing the whole batch.
    ``loss_ce`` is a weighted mean per rank, as in Mask2Former: with ``eos_coef != 1`` its rank average equals the
    whole-batch value only when the ranks' weight totals agree.

    Example:
        >>> import torch, mpseg
        >>> criterion = mpseg.SetCriterion(3, mpseg.HungarianMatcher(num_points=64), num_points=64)
        >>> outputs = {"pred_logits": torch.randn(2, 5, 4), "pred_masks": torch.randn(2, 5, 8, 8), "aux_outputs": []}
        >>> targets = [{"labels": torch.tensor([1]), "masks": torch.rand(1, 32, 32) > 0.5},
        ...            {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 32, 32, dtype=torch.bool)}]
        >>> sorted(criterion(outputs, targets))
        ['loss', 'loss_ce', 'loss_dice', 'loss_mask']
    """

    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        *,
        weight_dict: Mapping[str, float] | None = None,
        eos_coef: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not callable(matcher):
            raise TypeError(f"matcher must be callable (e.g. HungarianMatcher), got {type(matcher).__name__}")
        if not isinstance(num_points, int) or num_points <= 0:
            raise ValueError(f"num_points must be a positive int, got {num_points!r}")
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}")
        if eos_coef < 0:
            raise ValueError(f"eos_coef must be >= 0, got {eos_coef}")
        weight_dict = dict(DEFAULT_WEIGHT_DICT if weight_dict is None else weight_dict)
        for key in weight_dict:
            if not _LOSS_KEY.match(key):
                raise ValueError(
                    f"weight_dict key {key!r} names no loss: expected loss_ce, loss_mask or loss_dice, optionally "
                    f"followed by _mp and/or _<layer>"
                )
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = weight_dict
        self.eos_coef = float(eos_coef)
        self.num_points = num_points
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        # Built without item assignment, which would be a blocking host-to-device copy when made on a GPU.
        empty_weight = torch.cat([torch.ones(num_classes), torch.full((1,), self.eos_coef)])
        # A persistent buffer under the official name, so a model holding the criterion loads official checkpoints.
        self.register_buffer("empty_weight", empty_weight)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, num_points={self.num_points}, "
            f"oversample_ratio={self.oversample_ratio}, importance_sample_ratio={self.importance_sample_ratio}, "
            f"weight_dict={self.weight_dict}"
        )

    # ------------------------------------------------------------------------------------------------------------
    def forward(
        self,
        outputs: dict,
        targets: Sequence[dict[str, Tensor]],
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Computes all losses.

        Args:
            outputs (dict): ``pred_logits`` (Tensor[B, Q, K+1]), ``pred_masks`` (Tensor[B, Q, H, W]), optionally
                ``aux_outputs`` (list of dicts with the same keys, initial prediction first) and ``pilot_outputs``
                (dict with ``pred_logits`` [B, Np, K+1], ``pred_masks`` [B, Np, H, W], ``aux_outputs``,
                ``target_index`` (int64 Tensor[B, Np], -1 = padding slot) and optionally ``num_groups`` (int)).
            targets (list[dict]): per image ``labels`` (int64 Tensor[T_b]) and ``masks`` (Tensor[T_b, H_t, W_t],
                bool, uint8 or float in [0, 1]); T_b may be 0.
            generator (torch.Generator, optional): source of all random points (matching and losses).

        Returns:
            dict[str, Tensor]: unweighted ``loss_ce``, ``loss_mask``, ``loss_dice``; ``loss_*_{i}`` for
            ``aux_outputs[i]``; ``loss_*_mp`` and ``loss_*_mp_{i}`` for the pilot predictions when present; and
            ``loss``, the weighted sum. Mask losses are exact zeros, still attached to the graph, when nothing is
            matched.
        """
        logits, _ = _validate_prediction(outputs)
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"outputs['pred_logits'] must have num_classes + 1 = {self.num_classes + 1} class logits, "
                f"got shape {tuple(logits.shape)}"
            )
        _validate_targets(targets, logits.shape[0], self.num_classes, logits.device)
        num_masks = self.num_masks(targets, logits.device)

        pilot = outputs.get("pilot_outputs")
        pilot_aux = []
        if pilot is not None:
            if isinstance(pilot, dict) and pilot.get("max_objects") is not None and pilot.get("num_groups") is not None:
                # MaskPilot's layout: the assignment follows from Python ints, so torch.compile traces it.
                pilot_indices, num_groups = self.pilot_assignment(pilot, targets)
            else:
                # Reads target_index on the host: under torch.compile one graph break, the method run uncompiled.
                pilot_indices, num_groups = run_eagerly(type(self).pilot_assignment, self, pilot, targets)
            pilot_num_masks = num_masks * num_groups
            pilot_aux = list(pilot.get("aux_outputs") or [])
        aux_outputs = list(outputs.get("aux_outputs") or [])

        losses: dict[str, Tensor] = {}

        def add(prediction: dict, indices: Assignment | None, normaliser: Tensor, suffix: str, name: str) -> None:
            pred_logits, _ = _validate_prediction(prediction, name)
            if pred_logits.shape[0] != logits.shape[0] or pred_logits.shape[-1] != logits.shape[-1]:
                raise ValueError(
                    f"{name}['pred_logits'] must be [B, *, K+1] with B, K+1 = {logits.shape[0]}, {logits.shape[-1]} "
                    f"as in outputs['pred_logits'], got shape {tuple(pred_logits.shape)}"
                )
            if indices is None:  # matching queries: Hungarian matching of this very prediction
                indices = self.matcher(prediction, targets, generator=generator)
            for key, value in self.prediction_losses(prediction, targets, indices, normaliser, generator).items():
                losses[key + suffix] = value

        # Official order (final, final pilot, then layer by layer), so seeded runs draw the same points.
        add(outputs, None, num_masks, "", "outputs")
        if pilot is not None:
            add(pilot, pilot_indices, pilot_num_masks, "_mp", "outputs['pilot_outputs']")
        for i in range(max(len(aux_outputs), len(pilot_aux))):
            if i < len(aux_outputs):
                add(aux_outputs[i], None, num_masks, f"_{i}", f"outputs['aux_outputs'][{i}]")
            if i < len(pilot_aux):
                name = f"outputs['pilot_outputs']['aux_outputs'][{i}]"
                add(pilot_aux[i], pilot_indices, pilot_num_masks, f"_mp_{i}", name)

        losses["loss"] = self.weighted_sum(losses)
        return losses

    # ------------------------------------------------------------------------------------------------------------
    def weight(self, key: str) -> float:
        """The weight of loss ``key`` in ``loss`` (see ``weight_dict``)."""
        match = _LOSS_KEY.match(key)
        if match is None:
            raise ValueError(f"{key!r} is not a loss key of SetCriterion")
        kind, pilot, _ = match.groups()
        for candidate in (key, f"loss_{kind}{pilot or ''}", f"loss_{kind}"):
            if candidate in self.weight_dict:
                return float(self.weight_dict[candidate])
        return 0.0

    def weighted_sum(self, losses: Mapping[str, Tensor]) -> Tensor:
        """``sum(weight(key) * value)`` over the loss keys (``loss`` itself excluded)."""
        total = None
        for key, value in losses.items():
            if key == "loss":
                continue
            weight = self.weight(key)
            if weight == 0:
                continue
            term = weight * value
            total = term if total is None else total + term
        if total is None:
            device = next(iter(losses.values())).device if losses else self.empty_weight.device
            return torch.zeros((), device=device)
        return total

    def num_masks(self, targets: Sequence[dict[str, Tensor]], device: torch.device) -> Tensor:
        """Total number of targets, averaged over ``torch.distributed`` ranks when initialised, at least 1.

        Returns:
            Tensor[]: float32 on ``device``.
        """
        # torch.full, not torch.tensor(..., device=device): a fill runs on the device, a copy from the host would sync.
        count = torch.full((), float(sum(int(t["labels"].shape[0]) for t in targets)), device=device)
        if dist.is_available() and dist.is_initialized():
            # Sum over ranks / world size: with gradients averaged over ranks, every mask in the global batch then
            # carries weight 1 / (total masks), as with one process seeing the whole batch.
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp(min=1)

    def pilot_assignment(self, pilot_outputs: dict, targets: Sequence[dict[str, Tensor]]) -> tuple[Assignment, float]:
        """The fixed assignment of pilot slots to ground truths, and the number of pilot groups.

        With ``num_groups`` and ``max_objects`` in ``pilot_outputs`` (the decoder copies both from a
        :class:`~mpseg.MaskPilot`), the slots follow MaskPilot's group-major layout: slot ``g * max_objects + j`` of
        image b reconstructs target j for j < T_b, the other slots are padding. The assignment is then built from
        Python ints, which ``torch.compile`` traces; in eager mode ``target_index`` is checked against that layout.
        Otherwise it is read from ``target_index`` (one host sync).

        Args:
            pilot_outputs (dict): with ``target_index`` (int64 Tensor[B, Np], -1 = padding slot) and optionally
                ``num_groups`` (int) and ``max_objects`` (int).
            targets (list[dict]): the ground truth.

        Returns:
            tuple: per image ``(slot_index, target_index)`` int64 CPU tensors (slots ascending, i.e. group-major), and
            ``num_groups``: ``pilot_outputs["num_groups"]`` if present, else valid slots / targets in the batch (1 for
            a batch without targets).
        """
        if not isinstance(pilot_outputs, dict) or "target_index" not in pilot_outputs:
            raise ValueError("outputs['pilot_outputs'] must be a dict holding 'target_index' (int64 Tensor[B, Np])")
        logits, _ = _validate_prediction(pilot_outputs, "outputs['pilot_outputs']")
        target_index = pilot_outputs["target_index"]
        if not isinstance(target_index, Tensor) or target_index.dtype != torch.int64 or target_index.dim() != 2:
            raise ValueError(
                "outputs['pilot_outputs']['target_index'] must be an int64 Tensor [B, Np], "
                f"got {_describe(target_index)}"
            )
        if target_index.shape != logits.shape[:2]:
            raise ValueError(
                f"outputs['pilot_outputs']['target_index'] must have shape [B, Np] = {tuple(logits.shape[:2])}, "
                f"got {tuple(target_index.shape)}"
            )
        num_groups, max_objects = pilot_outputs.get("num_groups"), pilot_outputs.get("max_objects")
        if num_groups is not None and max_objects is not None:
            return self._layout_assignment(target_index, targets, int(num_groups), int(max_objects)), float(num_groups)
        target_index = target_index.cpu()  # the assignment lives on the CPU, like the matcher's
        indices: Assignment = []
        num_valid = 0
        num_targets = 0
        for b, target in enumerate(targets):
            count = int(target["labels"].shape[0])
            slots = (target_index[b] >= 0).nonzero().flatten()
            gt = target_index[b, slots]
            if gt.numel() and int(gt.max()) >= count:
                raise ValueError(
                    f"outputs['pilot_outputs']['target_index'][{b}] refers to target {int(gt.max())}, but image {b} "
                    f"has {count} targets"
                )
            indices.append((slots, gt))
            num_valid += slots.numel()
            num_targets += count
        num_groups = pilot_outputs.get("num_groups")
        if num_groups is None:
            num_groups = num_valid / num_targets if num_targets else 1.0
        elif not num_groups >= 1:
            raise ValueError(f"outputs['pilot_outputs']['num_groups'] must be >= 1, got {num_groups}")
        return indices, float(num_groups)

    @staticmethod
    def _layout_assignment(
        target_index: Tensor, targets: Sequence[dict[str, Tensor]], num_groups: int, max_objects: int
    ) -> Assignment:
        """The assignment of MaskPilot's group-major layout (see :meth:`pilot_assignment`), from shapes only."""
        counts = [int(t["labels"].shape[0]) for t in targets]
        if num_groups < 1 or target_index.shape[1] != num_groups * max_objects or max(counts, default=0) > max_objects:
            raise ValueError(
                f"outputs['pilot_outputs'] claims num_groups={num_groups} groups of max_objects={max_objects} slots, "
                f"but target_index has {target_index.shape[1]} slots per image and the targets count {counts} objects"
            )
        group_start = torch.arange(num_groups).unsqueeze(1) * max_objects  # [G, 1]
        indices = []
        for count in counts:
            gt = torch.arange(count)
            indices.append(((group_start + gt).flatten(), gt.repeat(num_groups)))
        if not torch.compiler.is_compiling():
            # Catches a pilot whose target_index does not follow the layout it claims, without a host sync (on a GPU
            # as a queued device-side assertion, see mpseg._sync.check_on_device).
            expected = torch.full(tuple(target_index.shape), -1, dtype=torch.int64)
            for b, (slots, gt) in enumerate(indices):
                expected[b, slots] = gt
            check_on_device(
                (target_index == host_to_device(expected, target_index.device)).all(),
                "outputs['pilot_outputs']['target_index'] does not follow the group-major layout that its "
                f"num_groups={num_groups} and max_objects={max_objects} imply (slot g * max_objects + j -> "
                "target j, -1 beyond each image's count); leave 'max_objects' out for another layout",
            )
        return indices

    # ------------------------------------------------------------------------------------------------------------
    def prediction_losses(
        self,
        prediction: dict[str, Tensor],
        targets: Sequence[dict[str, Tensor]],
        indices: Assignment,
        num_masks: float | Tensor,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """The three losses of one prediction under a given assignment (Hungarian or fixed).

        Args:
            prediction (dict): ``pred_logits`` (Tensor[B, Q, K+1]) and ``pred_masks`` (Tensor[B, Q, H, W]).
            targets (list[dict]): the ground truth.
            indices (list[tuple[Tensor, Tensor]]): per image ``(pred_index, target_index)``.
            num_masks (float or Tensor[]): normaliser of the mask losses.
            generator (torch.Generator, optional): source of the sampled points.

        Returns:
            dict[str, Tensor]: ``loss_ce``, ``loss_mask``, ``loss_dice``.
        """
        logits, masks = prediction["pred_logits"], prediction["pred_masks"]
        device = logits.device
        # The assignment is on the CPU: moved without host syncs (mpseg._sync.host_to_device).
        batch_index = host_to_device(torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]), device)
        pred_index = host_to_device(torch.cat([src for src, _ in indices]), device)
        matched_labels = torch.cat(
            [t["labels"][host_to_device(tgt, t["labels"].device)].to(device) for t, (_, tgt) in zip(targets, indices)]
        )

        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=device)
        target_classes[batch_index, pred_index] = matched_labels
        # float(): the class loss in full precision even when the logits come out of autocast in fp16.
        loss_ce = F.cross_entropy(
            logits.float().transpose(1, 2), target_classes, self.empty_weight.to(device=device, dtype=torch.float32)
        )

        # Matched predicted masks [M, H, W]; M = 0 gives exact zeros that keep the graph connected (DDP needs every
        # rank to produce gradients for the mask head even when its images hold no object).
        matched_masks = masks[batch_index, pred_index]
        matched_masks = matched_masks.to(torch.promote_types(matched_masks.dtype, torch.float32)).unsqueeze(1)
        with torch.no_grad():
            point_coords = sample_uncertain_points(
                matched_masks,
                self.num_points,
                oversample_ratio=self.oversample_ratio,
                importance_sample_ratio=self.importance_sample_ratio,
                generator=generator,
            )
            point_labels = self._target_points(targets, indices, point_coords, matched_masks.dtype)
        point_logits = point_sample(matched_masks, point_coords).squeeze(1)
        return {
            "loss_ce": loss_ce,
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _target_points(
        targets: Sequence[dict[str, Tensor]], indices: Assignment, point_coords: Tensor, dtype: torch.dtype
    ) -> Tensor:
        """Target mask values [M, P] at each matched mask's points, read straight from the (bool) target masks."""
        canvas = _canvas_size(targets)
        parts = []
        start = 0
        for target, (_, tgt) in zip(targets, indices):
            count = tgt.numel()
            if count == 0:
                continue
            target_masks = target["masks"]
            parts.append(
                sample_masks_at_points(
                    target_masks,
                    point_coords[start : start + count].to(target_masks.device),
                    mask_index=tgt,  # on the CPU: range-checked there for free, then moved without a sync
                    canvas_size=canvas,
                    dtype=dtype,
                ).to(point_coords.device)
            )
            start += count
        if not parts:
            return point_coords.new_zeros(0, point_coords.shape[1], dtype=dtype)
        return torch.cat(parts)
