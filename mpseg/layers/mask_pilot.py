# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask-piloted training (MP-Former, Zhang et al., CVPR 2023): the pilot queries and their attention masks.

In training, MP-Former feeds the Transformer decoder extra "pilot" queries next to the learnable matching queries. A pilot
query's content is the embedding of a ground-truth class (sometimes swapped for a random class: *label noise*), and in
every masked-attention layer it attends through that ground truth's mask at the layer's resolution (with random pixels
flipped: *point noise*). The pilots are trained to reconstruct their ground truths under a fixed assignment, with the same
losses as the matched queries. Matching queries never see the pilots, so at inference nothing changes.

This module holds the two halves of that idea:

* :class:`MaskPilotNoiser` (an ``nn.Module``, it owns the label embedding ``label_enc``) turns one batch of targets into a
  :class:`MaskPilot`.
* :class:`MaskPilot` is one training step's pilots: the pilot queries ``[B, Np, C]``, which ground truth each slot
  reconstructs, the self-attention mask that keeps matching queries and pilot groups apart, and the per-layer noised
  cross-attention masks. The decoder consumes it; the criterion reads ``target_index``.

Facts carried over from the official implementation (IDEA-Research/MP-Former, ``dn_mode="points"``):

* Label noise: every slot independently, with probability ``label_noise``, gets a label drawn uniformly from all
  ``num_classes`` classes (the draw may return the true class, so the observed change rate is
  ``label_noise * (K - 1) / K``). The loss targets stay the true labels.
* Masks per layer: the ground-truth mask is resized to the layer's feature size by area averaging, and a pixel is
  foreground when its coverage is positive, so a small object stays visible at coarse levels.
* Point noise: each pixel flips independently with probability ``point_noise * A / (h * w)``, ``A`` the foreground pixel
  count at that resolution; drawn afresh for every layer (and for every head when ``per_head_noise=True``).
* Groups: ``num_groups`` copies of the pilot set, group-major, each with its own label and point noise. A group sees
  itself and the matching queries in self-attention, never another group; matching queries never see pilots.
* Padding slots (images with fewer objects than the batch maximum): zero content, visible to their own group, attending
  to every pixel, trained as "no object".

Where we deliberately differ from the official code:

* Works on any device (no ``.cuda()``), any dtype and any head count (the official code hard-codes 8 heads).
* A batch without any object returns ``None`` instead of dividing by zero or indexing empty tensors; see
  :meth:`MaskPilotNoiser.dummy_loss` for DistributedDataParallel.
* One noiser, the mask-noise kind a parameter (``mask_noise="points"``, ``"none"`` or a callable), instead of nine
  copies of the preparation code.
* ``num_groups`` is the number of groups, never reinterpreted (the official code turns values >= 100 into
  ``value // max_objects``).
* Foreground is ``coverage > 0`` (official: ``> 1e-8``); identical for binary masks.
* ``pilot_layers=k`` pilots the initial prediction and layers ``0..k-1`` and then drops the pilot rows; the official
  ``ALL_LY_DN=False`` switch uses ground-truth masks in layers 0..3 and keeps the pilot rows afterwards with their own
  predicted masks. ``pilot_layers=None`` (every layer) equals the official ``ALL_LY_DN=True`` setting used for the
  published models.
* Randomness comes from an optional ``torch.Generator`` (reproducible), not the global RNG only.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._sync import check_on_device, host_to_device, reads_for_free

__all__ = ["MaskPilot", "MaskPilotNoiser"]

MaskNoise = Union[str, Callable[[Tensor, float, Optional[torch.Generator]], Tensor]]

_MASK_NOISE_KINDS = ("points", "none")


def _rng(generator: Optional[torch.Generator]) -> dict:
    # `generator=None` passed explicitly makes torch.rand reject symbolic sizes (torch.compile with dynamic shapes):
    # pass the keyword only when there is a generator.
    return {} if generator is None else {"generator": generator}


def _point_noise(foreground: Tensor, point_noise: float, generator: Optional[torch.Generator]) -> Tensor:
    """Flip every pixel independently with probability ``point_noise * A / (h * w)`` (MP-Former's point noise).

    Args:
        foreground (Tensor[..., h*w] bool): clean masks, True = foreground.
        point_noise (float): the noise scale.
        generator (torch.Generator, optional): random source.

    Returns:
        Tensor[..., h*w] bool: noised masks.
    """
    if point_noise == 0.0:
        return foreground
    hw = foreground.shape[-1]
    # Scaling by the object's area keeps the expected number of flipped pixels proportional to the object: a small
    # object is barely touched, a large one gets many scattered holes and stray points.
    flip_prob = foreground.sum(-1, keepdim=True, dtype=torch.float32) * (point_noise / hw)
    draws = torch.rand(foreground.shape, device=foreground.device, **_rng(generator))
    return foreground ^ (draws < flip_prob)


class MaskPilot:
    """One training step's pilot queries and attention masks, made by :class:`MaskPilotNoiser`.

    Slots are group-major: slot ``g * max_objects + j`` of image ``b`` reconstructs ground truth ``j`` of image ``b``
    (``target_index`` holds ``j``) in group ``g``, or is a padding slot (``target_index == -1``) when image ``b`` has at
    most ``j`` objects.

    Attributes:
        pilot_queries (Tensor[B, Np, C]): content of the pilot queries (label embedding of the noised labels; zero for
            padding slots). Carries the gradient to the noiser's ``label_enc``.
        target_index (Tensor[B, Np] int64): ground-truth index each slot reconstructs, -1 for padding slots.
        valid (Tensor[B, Np] bool): ``target_index >= 0``.
        labels (Tensor[B, Np] int64): true class of each slot's ground truth (the loss target), -1 for padding slots.
        noised_labels (Tensor[B, Np] int64): the class whose embedding the slot received, -1 for padding slots.
        masks (Tensor[B, N, H, W] float32): ground-truth masks padded to ``N = max_objects`` per image.
        num_groups (int): number of pilot groups.
        max_objects (int): largest number of ground truths in one image of the batch.
        pilot_layers (int | None): None pilots every layer; ``k`` the initial prediction and layers ``0..k-1``.
        point_noise (float): point-noise scale.
        per_head_noise (bool): draw the point noise separately for every attention head.
    """

    def __init__(
        self,
        *,
        pilot_queries: Tensor,
        target_index: Tensor,
        labels: Tensor,
        noised_labels: Tensor,
        masks: Tensor,
        num_groups: int,
        pilot_layers: Optional[int] = None,
        point_noise: float = 0.2,
        mask_noise: MaskNoise = "points",
        per_head_noise: bool = False,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        batch, num_pilots = target_index.shape
        if pilot_queries.shape[:2] != (batch, num_pilots):
            raise ValueError(
                f"pilot_queries must be [B, Np, C] with (B, Np) = {(batch, num_pilots)}, got {tuple(pilot_queries.shape)}"
            )
        if masks.dim() != 4 or masks.shape[0] != batch or masks.shape[1] * num_groups != num_pilots:
            raise ValueError(
                f"masks must be [B, Np / num_groups, H, W] = [{batch}, {num_pilots // max(num_groups, 1)}, H, W], "
                f"got {tuple(masks.shape)}"
            )
        self.pilot_queries = pilot_queries
        self.target_index = target_index
        self.valid = target_index >= 0
        self.labels = labels
        self.noised_labels = noised_labels
        self.masks = masks
        self.num_groups = int(num_groups)
        self.max_objects = int(masks.shape[1])
        self.pilot_layers = pilot_layers
        self.point_noise = float(point_noise)
        self.mask_noise = mask_noise
        self.per_head_noise = bool(per_head_noise)
        self.generator = generator
        # Area-downsampled clean masks per size: every layer at the same resolution reuses them; only the noise is new.
        self._foreground_cache: dict[tuple[int, int], Tensor] = {}

    @property
    def num_pilots(self) -> int:
        """int: ``Np = num_groups * max_objects``, the number of pilot slots per image."""
        return self.target_index.shape[1]

    @property
    def device(self) -> torch.device:
        """torch.device: the device of the pilot tensors."""
        return self.target_index.device

    def active(self, layer: int) -> bool:
        """Whether Transformer layer ``layer`` (0-based) still carries the pilot queries.

        Args:
            layer (int): Transformer layer index.

        Returns:
            bool: ``pilot_layers is None or layer < pilot_layers``.
        """
        return self.pilot_layers is None or layer < self.pilot_layers

    def foreground(self, size: Sequence[int]) -> Tensor:
        """Clean ground-truth masks at ``size``: area interpolation, foreground where the coverage is positive.

        Args:
            size (tuple[int, int]): target (h, w).

        Returns:
            Tensor[B, N, h*w] bool: True = foreground; cached per size.
        """
        key = (int(size[0]), int(size[1]))
        if key[0] <= 0 or key[1] <= 0:
            raise ValueError(f"size must be two positive ints (h, w), got {tuple(size)}")
        cached = self._foreground_cache.get(key)
        if cached is None:
            batch, num = self.masks.shape[:2]
            if num == 0:
                cached = self.masks.new_zeros((batch, 0, key[0] * key[1]), dtype=torch.bool)
            else:
                # adaptive_avg_pool2d is F.interpolate(mode="area"): the exact pixel coverage of each cell, so a one-
                # pixel object keeps a foreground cell at every level instead of vanishing as with nearest resizing.
                coverage = F.adaptive_avg_pool2d(self.masks.flatten(0, 1).unsqueeze(1), key)
                cached = (coverage > 0).view(batch, num, key[0] * key[1])
            self._foreground_cache[key] = cached
        return cached

    def self_attn_mask(self, num_queries: int) -> Tensor:
        """Self-attention mask over ``[pilots, matching queries]``.

        Matching rows block every pilot column (so matching outputs do not depend on the pilots); a pilot row blocks the
        pilot columns of other groups and sees its own group (padding slots included) and every matching query.

        Args:
            num_queries (int): number of matching queries Q.

        Returns:
            Tensor[Np + Q, Np + Q] bool: True = blocked.
        """
        if not isinstance(num_queries, int) or num_queries < 0:
            raise ValueError(f"num_queries must be a non-negative int, got {num_queries!r}")
        num_pilots, group = self.num_pilots, self.max_objects
        total = num_pilots + num_queries
        mask = torch.zeros(total, total, dtype=torch.bool, device=self.device)
        mask[num_pilots:, :num_pilots] = True
        group_of = torch.arange(num_pilots, device=self.device) // max(group, 1)
        mask[:num_pilots, :num_pilots] = group_of[:, None] != group_of[None, :]
        return mask

    def cross_attn_mask(self, layer: int, size: Sequence[int], num_heads: int) -> Tensor:
        """Noised ground-truth masks for the pilot rows of Transformer layer ``layer``; noise is drawn on every call.

        Args:
            layer (int): Transformer layer (0-based); must be active (see :meth:`active`).
            size (tuple[int, int]): (h, w) of the feature map this layer attends.
            num_heads (int): attention heads; the result has this many head rows with ``per_head_noise`` and one
                (broadcastable) otherwise.

        Returns:
            Tensor[B, H, Np, h*w] bool: True = blocked, ``H = num_heads`` if ``per_head_noise`` else 1. Padding slots
            are all False (attend everywhere). A slot whose noised mask blocks everything is left to the decoder's
            "a fully blocked row attends everywhere" rule, as in Mask2Former.
        """
        if not isinstance(num_heads, int) or num_heads <= 0:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if not self.active(layer):
            raise ValueError(f"layer {layer} is not piloted (pilot_layers={self.pilot_layers})")
        foreground = self.foreground(size)  # [B, N, hw]
        batch, num, hw = foreground.shape
        heads = num_heads if self.per_head_noise else 1
        clean = foreground[:, None, None].expand(batch, heads, self.num_groups, num, hw)
        if self.mask_noise == "points":
            noised = _point_noise(clean, self.point_noise, self.generator)
        elif self.mask_noise == "none":
            noised = clean
        else:
            noised = self.mask_noise(clean.reshape(batch, heads, self.num_groups, num, *size), self.point_noise,
                                     self.generator)
            noised = noised.reshape(batch, heads, self.num_groups, num, hw).to(torch.bool)
        blocked = ~noised.reshape(batch, heads, self.num_pilots, hw)
        # Padding slots attend everywhere (the official code reaches the same through the all-blocked-row rule).
        return blocked & self.valid[:, None, :, None]

    def __repr__(self) -> str:
        return (
            f"MaskPilot(batch={self.target_index.shape[0]}, num_pilots={self.num_pilots}, num_groups={self.num_groups}, "
            f"max_objects={self.max_objects}, pilot_layers={self.pilot_layers}, point_noise={self.point_noise}, "
            f"mask_noise={self.mask_noise!r}, per_head_noise={self.per_head_noise})"
        )


class MaskPilotNoiser(nn.Module):
    """Builds the pilot queries and masks of MP-Former from a batch of targets.

    Args:
        num_classes (int): number of classes K (no "no-object").
        hidden_dim (int): query channels C.
        point_noise (float): point-noise scale in [0, 1]: a pixel flips with probability ``point_noise * A / (h*w)``.
        label_noise (float): probability in [0, 1] that a slot's label is replaced by a uniformly random class.
        num_groups (int): independent noised copies of the pilot set (>= 1).
        pilot_layers (int | None): None pilots every layer; ``k >= 0`` the initial prediction and layers ``0..k-1``.
        mask_noise (str | Callable): ``"points"`` (MP-Former), ``"none"``, or ``fn(clean [B, H, G, N, h, w] bool,
            point_noise, generator) -> noised bool`` of the same shape.
        per_head_noise (bool): draw the point noise separately for each attention head (official ``HEAD_DN``).

    Example:
        >>> noiser = MaskPilotNoiser(num_classes=3, hidden_dim=32)
        >>> targets = [{"labels": torch.tensor([0, 2]), "masks": torch.rand(2, 64, 64) > 0.5},
        ...            {"labels": torch.tensor([1]), "masks": torch.rand(1, 64, 64) > 0.5}]
        >>> pilot = noiser(targets)
        >>> pilot.pilot_queries.shape, pilot.target_index.tolist()
        (torch.Size([2, 2, 32]), [[0, 1], [0, -1]])
        >>> pilot.cross_attn_mask(0, (8, 8), num_heads=8).shape
        torch.Size([2, 1, 2, 64])
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 256,
        *,
        point_noise: float = 0.2,
        label_noise: float = 0.2,
        num_groups: int = 1,
        pilot_layers: Optional[int] = None,
        mask_noise: MaskNoise = "points",
        per_head_noise: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be a positive int, got {hidden_dim!r}")
        for name, value in (("point_noise", point_noise), ("label_noise", label_noise)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not isinstance(num_groups, int) or num_groups < 1:
            raise ValueError(f"num_groups must be an int >= 1, got {num_groups!r}")
        if pilot_layers is not None and (not isinstance(pilot_layers, int) or pilot_layers < 0):
            raise ValueError(f"pilot_layers must be None or an int >= 0, got {pilot_layers!r}")
        if not callable(mask_noise) and mask_noise not in _MASK_NOISE_KINDS:
            raise ValueError(f"mask_noise must be one of {_MASK_NOISE_KINDS} or a callable, got {mask_noise!r}")
        self.num_classes = num_classes
        self.hidden_dim = hidden_dim
        self.point_noise = float(point_noise)
        self.label_noise = float(label_noise)
        self.num_groups = num_groups
        self.pilot_layers = pilot_layers
        self.mask_noise = mask_noise
        self.per_head_noise = bool(per_head_noise)
        # Same name and shape as MP-Former's decoder attribute, so its checkpoints convert one to one.
        self.label_enc = nn.Embedding(num_classes, hidden_dim)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, hidden_dim={self.hidden_dim}, point_noise={self.point_noise}, "
            f"label_noise={self.label_noise}, num_groups={self.num_groups}, pilot_layers={self.pilot_layers}, "
            f"mask_noise={self.mask_noise!r}, per_head_noise={self.per_head_noise}"
        )

    def dummy_loss(self) -> Tensor:
        """A zero that depends on every parameter of the noiser.

        Add it to the loss on every step when training under ``DistributedDataParallel`` with
        ``find_unused_parameters=False``: on a batch without objects :meth:`forward` returns ``None`` and ``label_enc``
        would get no gradient on that rank, which DDP reports as an unfinished reduction. The official code adds
        ``label_enc.weight[0, 0] * 0.0`` to its predictions for the same reason. (Alternatively construct DDP with
        ``find_unused_parameters=True``.)

        Returns:
            Tensor[] : ``0 * sum(label_enc.weight)``.
        """
        return self.label_enc.weight.sum() * 0.0

    def forward(self, targets: Sequence[dict], generator: Optional[torch.Generator] = None) -> Optional[MaskPilot]:
        """Build one step's pilots.

        Args:
            targets (list[dict]): per image ``{"labels": LongTensor[N], "masks": Tensor[N, H, W]}`` (bool, uint8 or
                float in [0, 1]); all images share (H, W); N may be 0.
            generator (torch.Generator, optional): random source for label and point noise, on the device of
                ``label_enc``; kept by the returned pilot for the per-layer point noise.

        Returns:
            MaskPilot | None: None when the batch holds no object.
        """
        if not isinstance(targets, (list, tuple)) or len(targets) == 0:
            raise TypeError(f"targets must be a non-empty list of dicts, got {type(targets).__name__}")
        device = self.label_enc.weight.device
        counts, mask_size = [], None
        for i, target in enumerate(targets):
            if not isinstance(target, dict) or "labels" not in target or "masks" not in target:
                raise TypeError(f"targets[{i}] must be a dict with 'labels' and 'masks'")
            labels, masks = target["labels"], target["masks"]
            if labels.dim() != 1 or labels.dtype in (torch.bool,) or labels.is_floating_point():
                raise ValueError(f"targets[{i}]['labels'] must be an integer tensor [N], got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(f"targets[{i}]['masks'] must be [N, H, W] with N = {labels.shape[0]}, "
                                 f"got {tuple(masks.shape)}")
            if mask_size is None:
                mask_size = tuple(masks.shape[-2:])
            elif tuple(masks.shape[-2:]) != mask_size:
                raise ValueError(f"all targets' masks must share (H, W): targets[0] has {mask_size}, "
                                 f"targets[{i}] has {tuple(masks.shape[-2:])}")
            # A data-dependent check: on the host for CPU labels (free), as a queued device-side assertion for labels
            # on a GPU (no host sync); skipped while torch.compile traces (an out-of-range label still fails in the
            # embedding lookup).
            if not torch.compiler.is_compiling() and labels.numel():
                if reads_for_free(labels):
                    if int(labels.min()) < 0 or int(labels.max()) >= self.num_classes:
                        raise ValueError(f"targets[{i}]['labels'] must lie in [0, {self.num_classes}), got values in "
                                         f"[{int(labels.min())}, {int(labels.max())}]")
                else:
                    check_on_device(((labels >= 0) & (labels < self.num_classes)).all(),
                                    f"targets[{i}]['labels'] must lie in [0, {self.num_classes})")
            counts.append(labels.shape[0])
        max_objects = max(counts)
        if max_objects == 0:
            return None

        batch, groups = len(targets), self.num_groups
        height, width = mask_size
        labels = torch.full((batch, max_objects), -1, dtype=torch.long, device=device)
        masks = torch.zeros((batch, max_objects, height, width), dtype=torch.float32, device=device)
        for i, (target, count) in enumerate(zip(targets, counts)):
            if count:
                labels[i, :count] = host_to_device(target["labels"], device)
                masks[i, :count] = host_to_device(target["masks"], device)

        slot = torch.arange(max_objects, device=device)
        count_tensor = host_to_device(torch.tensor(counts, device="cpu"), device)  # no host sync on a GPU
        valid = (slot[None, :] < count_tensor[:, None]).repeat(1, groups)  # [B, G*N]
        target_index = torch.where(valid, slot.repeat(groups)[None, :].expand(batch, -1), -1)
        true_labels = labels.repeat(1, groups)

        noised = true_labels.clamp(min=0)
        if self.label_noise > 0.0:
            swap = torch.rand(noised.shape, device=device, **_rng(generator)) < self.label_noise
            random_labels = torch.randint(0, self.num_classes, noised.shape, device=device, **_rng(generator))
            noised = torch.where(swap, random_labels, noised)
        # Padding slots get zero content (as the official zero-initialised "padding" tensor), not an embedding.
        pilot_queries = self.label_enc(noised) * valid.unsqueeze(-1).to(self.label_enc.weight.dtype)
        noised_labels = torch.where(valid, noised, -1)

        return MaskPilot(
            pilot_queries=pilot_queries,
            target_index=target_index,
            labels=true_labels,
            noised_labels=noised_labels,
            masks=masks,
            num_groups=groups,
            pilot_layers=self.pilot_layers,
            point_noise=self.point_noise,
            mask_noise=self.mask_noise,
            per_head_noise=self.per_head_noise,
            generator=generator,
        )
