# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""A synthetic panoptic dataset generated on the fly: textured shapes ("things") over sky/ground bands ("stuff").

Every image is a pure function of (seed, split, index), so a run is reproducible and needs no download. Classes:

====  ==========  =======
id    name        kind
====  ==========  =======
0     circle      thing
1     square      thing
2     triangle    thing
3     ring        thing
4     sky         stuff
5     ground      stuff
====  ==========  =======

Each sample holds the image and three kinds of ground truth: Mask2Former-style training targets (one mask per thing
instance and per stuff region), a semantic map and a panoptic map with its segment list. Things may occlude each other;
masks are the visible parts, and instances smaller than ``min_area`` pixels are dropped (their pixels become the
occluded background's, so every pixel has exactly one label).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

__all__ = ["CLASS_NAMES", "IS_THING", "NUM_CLASSES", "ShapesDataset", "collate"]

CLASS_NAMES = ("circle", "square", "triangle", "ring", "sky", "ground")
IS_THING = (True, True, True, True, False, False)
NUM_CLASSES = len(CLASS_NAMES)
SKY, GROUND = 4, 5
_SPLIT_OFFSET = {"train": 0, "val": 1_000_003}


def _texture(kind: int, height: int, width: int, gen: torch.Generator) -> Tensor:
    """A [H, W] pattern in [0, 1]: 0 flat, 1 stripes, 2 checker, 3 noise."""
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                            indexing="ij")
    period = 3.0 + 5.0 * torch.rand((), generator=gen).item()
    angle = math.pi * torch.rand((), generator=gen).item()
    if kind == 0:
        return torch.full((height, width), 0.5)
    if kind == 1:
        return 0.5 + 0.5 * torch.sin((xx * math.cos(angle) + yy * math.sin(angle)) * (2 * math.pi / period))
    if kind == 2:
        return (((xx // period) + (yy // period)) % 2).float()
    return torch.rand((height, width), generator=gen)


def _shape_mask(cls: int, height: int, width: int, gen: torch.Generator) -> Tensor:
    """A [H, W] bool mask of one random shape of class ``cls`` (circle, square, triangle, ring)."""
    size = min(height, width)
    radius = size * (0.10 + 0.12 * torch.rand((), generator=gen).item())
    cy = radius + (height - 2 * radius) * torch.rand((), generator=gen).item()
    cx = radius + (width - 2 * radius) * torch.rand((), generator=gen).item()
    yy, xx = torch.meshgrid(torch.arange(height, dtype=torch.float32) + 0.5,
                            torch.arange(width, dtype=torch.float32) + 0.5, indexing="ij")
    dy, dx = yy - cy, xx - cx
    if cls == 0:
        return dy * dy + dx * dx <= radius * radius
    if cls == 1:
        angle = 0.5 * math.pi * torch.rand((), generator=gen).item()
        u = dx * math.cos(angle) + dy * math.sin(angle)
        v = -dx * math.sin(angle) + dy * math.cos(angle)
        half = radius * 0.85
        return (u.abs() <= half) & (v.abs() <= half)
    if cls == 2:
        angle = 2 * math.pi * torch.rand((), generator=gen).item()
        inside = torch.ones(height, width, dtype=torch.bool)
        for k in range(3):
            # Half-planes through the edges of an equilateral triangle inscribed in the circle of `radius`.
            a = angle + 2 * math.pi * k / 3
            inside &= dx * math.cos(a) + dy * math.sin(a) <= radius * 0.5
        return inside
    r2 = dy * dy + dx * dx
    return (r2 <= radius * radius) & (r2 >= (0.55 * radius) ** 2)


class ShapesDataset:
    """Seeded synthetic panoptic dataset; ``dataset[i]`` is generated on demand.

    Args:
        num_images (int): length of the split.
        split (str): ``"train"`` or ``"val"`` (disjoint random streams).
        image_size (int): square side in pixels (64-128 suggested).
        seed (int): base seed.
        max_things (int): at most this many shapes per image (at least 1 is drawn).
        min_area (int): instances with fewer visible pixels are dropped.
        cache (bool): keep every generated sample in memory (about 80 KB per 64 px image), so that later epochs cost
            no generation; the semantic and panoptic maps are stored as uint8 and returned as int64.

    A sample is a dict: ``image`` [3, H, W] float in [0, 1]; ``labels`` [N] int64 and ``masks`` [N, H, W] bool (things
    then stuff, the Mask2Former training target); ``sem_seg`` [H, W] int64; ``pan_seg`` [H, W] int64 segment ids (1..N,
    in ``labels`` order); ``segments_info`` list of ``{"id", "category_id", "isthing"}``.
    """

    def __init__(self, num_images: int, *, split: str = "train", image_size: int = 96, seed: int = 0,
                 max_things: int = 4, min_area: int = 12, cache: bool = False) -> None:
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 16 <= image_size <= 1024:
            raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
        self.num_images = num_images
        self.split = split
        self.image_size = image_size
        self.seed = seed
        self.max_things = max_things
        self.min_area = min_area
        self._cache: Optional[dict] = {} if cache else None

    def __len__(self) -> int:
        return self.num_images

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        if self._cache is not None:
            if index not in self._cache:
                sample = self._generate(index)
                self._cache[index] = {**sample, "sem_seg": sample["sem_seg"].to(torch.uint8),
                                      "pan_seg": sample["pan_seg"].to(torch.uint8)}
            cached = self._cache[index]
            return {**cached, "sem_seg": cached["sem_seg"].long(), "pan_seg": cached["pan_seg"].long()}
        return self._generate(index)

    def _generate(self, index: int) -> dict:
        gen = torch.Generator().manual_seed(self.seed * 7_919_993 + _SPLIT_OFFSET[self.split] + index)
        h = w = self.image_size
        rand = lambda *shape: torch.rand(shape, generator=gen)  # noqa: E731

        # Stuff: a sky band above a wavy horizon, ground below.
        horizon = h * (0.3 + 0.3 * rand(1).item())
        amp, freq, phase = h * 0.06 * rand(1).item(), 1 + 3 * rand(1).item(), 2 * math.pi * rand(1).item()
        xs = torch.arange(w, dtype=torch.float32)
        line = horizon + amp * torch.sin(xs / w * 2 * math.pi * freq + phase)
        sky = torch.arange(h, dtype=torch.float32)[:, None] + 0.5 < line[None, :]
        sky_col = torch.tensor([0.35, 0.55, 0.9]) + 0.15 * (rand(3) - 0.5)
        ground_col = torch.tensor([0.45, 0.35, 0.2]) + 0.2 * (rand(3) - 0.5)
        sky_tex = _texture(3, h, w, gen) * 0.15
        ground_tex = _texture(1, h, w, gen) * 0.25
        image = torch.where(sky, sky_col[:, None, None] + sky_tex, ground_col[:, None, None] + ground_tex)

        # Things, painted back to front; `owner` tracks which instance each pixel shows (-1 = stuff).
        owner = torch.full((h, w), -1, dtype=torch.long)
        classes = []
        count = 1 + int(rand(1).item() * self.max_things)
        for k in range(count):
            cls = int(rand(1).item() * 4)
            mask = _shape_mask(cls, h, w, gen)
            colour = rand(3)
            tex = _texture(int(rand(1).item() * 4), h, w, gen)
            shade = 0.55 + 0.45 * tex
            image = torch.where(mask, colour[:, None, None] * shade, image)
            owner[mask] = k
            classes.append(cls)
        image = (image + 0.03 * torch.randn((3, h, w), generator=gen)).clamp(0, 1)

        labels, masks = [], []
        sem = torch.where(sky, SKY, GROUND)
        for k, cls in enumerate(classes):
            mask = owner == k
            if int(mask.sum()) >= self.min_area:
                labels.append(cls)
                masks.append(mask)
                sem = torch.where(mask, cls, sem)
        for stuff, region in ((SKY, sem == SKY), (GROUND, sem == GROUND)):
            if bool(region.any()):
                labels.append(stuff)
                masks.append(region)
        masks_t = torch.stack(masks)
        pan = torch.zeros(h, w, dtype=torch.long)
        for i, mask in enumerate(masks_t):
            pan[mask] = i + 1
        segments = [{"id": i + 1, "category_id": c, "isthing": IS_THING[c]} for i, c in enumerate(labels)]
        return {
            "image": image,
            "labels": torch.tensor(labels, dtype=torch.long),
            "masks": masks_t,
            "sem_seg": sem.long(),
            "pan_seg": pan,
            "segments_info": segments,
        }

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: Optional[torch.Generator] = None,
                drop_last: bool = False) -> Iterator[tuple[Tensor, list[dict], list[dict]]]:
        """Iterate over ``(images [B, 3, H, W], targets, samples)`` batches."""
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start:start + batch_size].tolist()
            if drop_last and len(idx) < batch_size:
                return
            yield collate([self[i] for i in idx])


def collate(samples: list[dict]) -> tuple[Tensor, list[dict], list[dict]]:
    """Stack images; targets as Mask2Former expects (``labels``, float ``masks``)."""
    images = torch.stack([s["image"] for s in samples])
    targets = [{"labels": s["labels"], "masks": s["masks"].float()} for s in samples]
    return images, targets, samples
