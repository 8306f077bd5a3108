# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Mask2Former's training augmentation (large-scale jitter, fixed-size crop, flip) and padding-aware batching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LargeScaleJitter", "collate"]

# Fill value of each per-pixel target outside the image (void for the semantic map, no segment for the panoptic one).
_PIXEL_TARGETS = {"sem_seg": 255, "pan_seg": 0}


def _source_index(out_size: int, in_size: int) -> Tensor:
    """Nearest source pixel of each output pixel of a resize from ``in_size`` to ``out_size`` (pixel centres)."""
    index = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size)).floor().long()
    return index.clamp_(max=in_size - 1)


class LargeScaleJitter:
    """Mask2Former's COCO augmentation: resize by a random scale, random fixed-size crop, horizontal flip.

    The image is resized (bilinear, antialiased) to ``s * min(out_h / H, out_w / W)`` times its size with ``s``
    uniform in ``scale_range`` (detectron2's ``ResizeScale``, torchvision's ``ScaleJitter``), a random
    ``output_size`` window is cropped where the result is larger (``FixedSizeCrop``; smaller results are left for
    :func:`collate` to pad) and the result is flipped with probability ``flip_prob``. Masks and per-pixel targets
    (``sem_seg``, ``pan_seg``) are resampled by nearest neighbour straight into the crop, so memory stays at the
    output size however large the scale; masks left empty by the crop are dropped with their labels, as detectron2
    drops empty instances.

    Args:
        output_size (int | tuple[int, int]): crop size ``(H, W)`` (Mask2Former: 1024).
        scale_range (tuple[float, float]): range of ``s`` (Mask2Former: 0.1 to 2.0).
        flip_prob (float): probability of a horizontal flip.
        generator (torch.Generator, optional): source of the random draws (default: the global RNG).

    Example:
        >>> import torch
        >>> from mpseg.data import LargeScaleJitter
        >>> jitter = LargeScaleJitter(64, generator=torch.Generator().manual_seed(0))
        >>> target = {"labels": torch.tensor([2]), "masks": torch.ones(1, 100, 80, dtype=torch.bool)}
        >>> image, target = jitter(torch.rand(3, 100, 80), target)
        >>> image.shape[0], image.shape[1] <= 64, target["masks"].shape[1:] == image.shape[1:]
        (3, True, True)
    """

    def __init__(self, output_size: int | Sequence[int] = 1024, *, scale_range: Sequence[float] = (0.1, 2.0),
                 flip_prob: float = 0.5, generator: torch.Generator | None = None) -> None:
        size = (output_size, output_size) if isinstance(output_size, int) else tuple(int(v) for v in output_size)
        if len(size) != 2 or min(size) <= 0:
            raise ValueError(f"output_size must be a positive int or (H, W), got {output_size!r}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        self.output_size = size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip_prob = float(flip_prob)
        self.generator = generator

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.generator))

    def __call__(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        """Augments an image and its target together.

        Args:
            image (Tensor[3, H, W]): float image.
            target (dict): ``labels`` [N] and ``masks`` [N, H, W]; optional ``sem_seg`` / ``pan_seg`` [H, W] and
                ``segments_info`` (kept for the segments still visible); other keys are passed through.

        Returns:
            tuple: ``(image [3, h, w], target)`` with ``h <= out_h`` and ``w <= out_w``.
        """
        height, width = image.shape[-2:]
        low, high = self.scale_range
        scale = (low + (high - low) * self._uniform()) * min(self.output_size[0] / height,
                                                             self.output_size[1] / width)
        new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
        crop_h, crop_w = min(new_h, self.output_size[0]), min(new_w, self.output_size[1])
        top = int(torch.randint(new_h - crop_h + 1, (), generator=self.generator))
        left = int(torch.randint(new_w - crop_w + 1, (), generator=self.generator))
        flip = self._uniform() < self.flip_prob

        from torchvision.transforms.v2 import functional as TF

        image = TF.resize(image, [new_h, new_w], antialias=True)[:, top:top + crop_h, left:left + crop_w]
        rows = _source_index(new_h, height)[top:top + crop_h]
        cols = _source_index(new_w, width)[left:left + crop_w]
        if flip:
            image, cols = image.flip(-1), cols.flip(0)

        def resample(x: Tensor) -> Tensor:
            return x.index_select(-2, rows).index_select(-1, cols)

        target = dict(target)
        masks = resample(target["masks"])
        keep = masks.flatten(1).any(1)
        target["masks"], target["labels"] = masks[keep], target["labels"][keep]
        for key in _PIXEL_TARGETS:
            if key in target:
                target[key] = resample(target[key])
        if "segments_info" in target and "pan_seg" in target:
            visible = set(torch.unique(target["pan_seg"]).tolist())
            target["segments_info"] = [s for s in target["segments_info"] if s["id"] in visible]
        return image, target


def collate(batch: Sequence[tuple[Tensor, dict]], *, size_divisibility: int = 32,
            pad_value: float | Sequence[float] = 0.0) -> tuple[Tensor, list[dict]]:
    """Pads a list of ``(image, target)`` items into one batch, targets padded with it (Mask2Former's batching).

    Images go to the top-left of a zero-based canvas as large as the largest image, rounded up to a multiple of
    ``size_divisibility``; masks are padded with ``False`` to the same size (Mask2Former pads target masks to the
    batch's image size), ``sem_seg`` with 255 and ``pan_seg`` with 0. Each target gains ``image_size``, the valid
    ``(h, w)`` inside the padded image, which :func:`mpseg.inference.resize_mask_logits` takes to crop the
    padding away. Use it as a ``DataLoader``'s ``collate_fn`` (with ``functools.partial`` for the options).

    Args:
        batch (Sequence[tuple[Tensor, dict]]): items of a dataset (image [3, h_i, w_i] and target).
        size_divisibility (int): the padded size is a multiple of this (32 suits a backbone of stride 32).
        pad_value (float | Sequence[float]): image fill, one value or one per channel (e.g. the pixel mean, so
            that the padding is zero after normalisation, as Mask2Former's padding is).

    Returns:
        tuple: ``(images [B, 3, H, W], targets)``; targets are new dicts (the items are not modified).

    Example:
        >>> import torch
        >>> from mpseg.data import collate
        >>> items = [(torch.rand(3, 40, 50), {"labels": torch.tensor([1]), "masks": torch.ones(1, 40, 50) > 0}),
        ...          (torch.rand(3, 60, 30), {"labels": torch.tensor([], dtype=torch.long),
        ...                                   "masks": torch.zeros(0, 60, 30, dtype=torch.bool)})]
        >>> images, targets = collate(items)
        >>> images.shape, targets[0]["masks"].shape, targets[1]["image_size"]
        (torch.Size([2, 3, 64, 64]), torch.Size([1, 64, 64]), (60, 30))
    """
    if not batch:
        raise ValueError("collate got an empty batch")
    if size_divisibility < 1:
        raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
    height = max(image.shape[-2] for image, _ in batch)
    width = max(image.shape[-1] for image, _ in batch)
    height = -(-height // size_divisibility) * size_divisibility
    width = -(-width // size_divisibility) * size_divisibility
    first = batch[0][0]
    fill = torch.as_tensor(pad_value, dtype=first.dtype).reshape(-1, 1, 1)
    images = fill.expand(len(batch), first.shape[0], height, width).clone()
    targets = []
    for b, (image, target) in enumerate(batch):
        h, w = image.shape[-2:]
        images[b, :, :h, :w] = image
        padding = (0, width - w, 0, height - h)
        target = dict(target)
        target["masks"] = F.pad(target["masks"], padding)  # bool pads with False
        for key, value in _PIXEL_TARGETS.items():
            if key in target:
                target[key] = F.pad(target[key], padding, value=value)
        target["image_size"] = (int(h), int(w))
        targets.append(target)
    return images, targets
