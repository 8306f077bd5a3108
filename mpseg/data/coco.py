# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""COCO-format instance and panoptic datasets giving Mask2Former's training targets.

Both datasets check the annotation file when they are built (every annotation names a known image and category, every
instance mask has a segmentation of the image's size) and read images lazily; any problem raises an error naming the
file and the annotation (or image) id. Categories are sorted by COCO id and numbered 0..K-1 (``category_ids[label]``
gives the COCO id back), as detectron2 does. Crowd regions (``iscrowd=1``) are not training targets (Mask2Former's
rule); the panoptic dataset keeps them in ``segments_info`` for the evaluation.

Memory: target masks are dense ``bool`` (1 byte per pixel). 200 instances on a 1024x1024 crop (Mask2Former's
large-scale-jitter output) take 200 MiB per image, and mpseg's matcher and criterion read them as they are (no float
copy, unlike HF's image processor, which makes float32 masks); see ``docs/guide/coco.rst`` for measured figures.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["COCOInstanceDataset", "COCOPanopticDataset"]

Transforms = Callable[[Tensor, dict], tuple[Tensor, dict]]


def _mask_api():
    """pycocotools' mask module, or an ImportError naming the extra that installs it."""
    try:
        from pycocotools import mask as mask_api
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "COCO polygons and RLE (COCOInstanceDataset) and mask AP (InstanceEvaluator) need pycocotools, which the "
            "optional 'data' extra installs: pip install 'mpseg[data]'"
        ) from error
    return mask_api


def _load_json(path: str, required: tuple[str, ...]) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"annotation file {path} is not valid JSON: {error}") from error
    missing = [key for key in required if key not in data]
    if missing:
        raise ValueError(f"annotation file {path} has no {', '.join(repr(k) for k in missing)} list")
    return data


def read_rgb(path: str, *, what: str, expected_size: tuple[int, int] | None) -> Tensor:
    """An image file as uint8 Tensor[3, H, W] (grey and RGBA converted to RGB), its size checked if given."""
    import numpy as np
    from PIL import Image

    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: file {path} not found")
    with Image.open(path) as file:
        image = torch.from_numpy(np.array(file.convert("RGB"))).permute(2, 0, 1).contiguous()
    if expected_size is not None and tuple(image.shape[-2:]) != tuple(expected_size):
        raise ValueError(
            f"{what}: file {path} is {image.shape[-2]}x{image.shape[-1]} (HxW) but the annotation file says "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    return image


class _COCOBase(torch.utils.data.Dataset):
    """Categories, images and image reading shared by the instance and panoptic datasets."""

    def __init__(self, image_root: str, annotation_file: str, transforms: Transforms | None,
                 required: tuple[str, ...]) -> None:
        self.image_root = str(image_root)
        self.annotation_file = str(annotation_file)
        self.transforms = transforms
        data = _load_json(self.annotation_file, ("images", "categories", *required))
        self.categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in self.categories]
        self._label = {cid: label for label, cid in enumerate(self.category_ids)}
        # Sorted by id as detectron2 does, so the order does not depend on how the file was written.
        self.images = sorted(data["images"], key=lambda im: im["id"])
        self._image_index = {int(im["id"]): i for i, im in enumerate(self.images)}
        self._data = data

    @property
    def num_classes(self) -> int:
        """K, the number of categories (labels are 0..K-1)."""
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.images)

    def _where(self, kind: str, ident) -> str:
        return f"{self.annotation_file}, {kind} {ident}"

    def _check_image_id(self, image_id, where: str) -> int:
        if image_id not in self._image_index:
            raise ValueError(f"{where}: image_id {image_id} is not in the file's 'images'")
        return self._image_index[image_id]

    def _check_category(self, category_id, where: str) -> int:
        if category_id not in self._label:
            raise ValueError(
                f"{where}: category_id {category_id} is not in the file's 'categories' (ids {self.category_ids})"
            )
        return self._label[category_id]

    def _read_image(self, info: dict) -> Tensor:
        path = os.path.join(self.image_root, info["file_name"])
        size = (int(info["height"]), int(info["width"])) if "height" in info and "width" in info else None
        return read_rgb(path, what=f"image id {info['id']}", expected_size=size)

    def _finish(self, image: Tensor, target: dict) -> tuple[Tensor, dict]:
        image = image.float().div_(255)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target


class COCOInstanceDataset(_COCOBase):
    """Images and Mask2Former instance targets from a COCO instance annotation file (polygons, RLE, crowd).

    Args:
        image_root (str): folder the images' ``file_name`` entries are relative to.
        annotation_file (str): COCO instance JSON (``images``, ``annotations``, ``categories``).
        transforms (callable, optional): ``(image, target) -> (image, target)``, e.g.
            :class:`~mpseg.data.LargeScaleJitter`.

    Attributes:
        category_ids (list[int]): COCO category id of each contiguous label.
        categories (list[dict]): the file's categories sorted by id.
        images (list[dict]): the file's images sorted by id (``dataset[i]`` is ``images[i]``).

    An item is ``(image, target)``: image float Tensor[3, H, W] in [0, 1]; target ``{"labels": int64[N], "masks":
    bool[N, H, W], "image_id": int}`` with the non-crowd annotations in file order (N = 0 for an image without
    them).

    Raises:
        ValueError: (when built) an annotation names an unknown image or category, has an empty segmentation, a
            polygon with fewer than 3 points, or an RLE of another size than its image; the file holds no
            annotation. The message names the file and the annotation id.
        FileNotFoundError: (when an item is read) the image file is missing; the message names it and the image id.
    """

    def __init__(self, image_root: str, annotation_file: str, transforms: Transforms | None = None) -> None:
        _mask_api()  # fail now, not in a data-loader worker, when the extra is missing
        super().__init__(image_root, annotation_file, transforms, ("annotations",))
        annotations = self._data.pop("annotations")
        if not annotations:
            raise ValueError(f"annotation file {self.annotation_file} has an empty 'annotations' list")
        self._annotations: list[list[dict]] = [[] for _ in self.images]
        for ann in annotations:
            where = self._where("annotation id", ann.get("id"))
            index = self._check_image_id(ann.get("image_id"), where)
            self._check_category(ann.get("category_id"), where)
            self._check_segmentation(ann.get("segmentation"), self.images[index], where)
            self._annotations[index].append(ann)

    @staticmethod
    def _check_segmentation(segmentation, image: dict, where: str) -> None:
        if not segmentation:
            raise ValueError(f"{where}: empty segmentation {segmentation!r}")
        if isinstance(segmentation, list):
            for polygon in segmentation:
                if len(polygon) < 6 or len(polygon) % 2:
                    raise ValueError(f"{where}: a polygon needs at least 3 (x, y) points, got {len(polygon)} numbers")
        elif isinstance(segmentation, dict):
            size = [int(v) for v in segmentation.get("size", ())]
            expected = [int(image["height"]), int(image["width"])]
            if size != expected:
                raise ValueError(f"{where}: RLE mask of size {size} (HxW) on image id {image['id']} of size {expected}")
        else:
            raise ValueError(f"{where}: segmentation must be a list of polygons or an RLE dict, got "
                             f"{type(segmentation).__name__}")

    def annotations(self, index: int) -> list[dict]:
        """The raw annotation dicts of image ``index`` (crowd ones included).

        Args:
            index (int): position in the dataset.

        Returns:
            list[dict]: the annotations of ``images[index]`` in file order.
        """
        return self._annotations[index]

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        info = self.images[index]
        image = self._read_image(info)
        height, width = image.shape[-2:]
        kept = [ann for ann in self._annotations[index] if not ann.get("iscrowd", 0)]
        labels = torch.tensor([self._label[ann["category_id"]] for ann in kept], dtype=torch.int64)
        masks = self._decode(kept, height, width)
        return self._finish(image, {"labels": labels, "masks": masks, "image_id": int(info["id"])})

    def _decode(self, annotations: list[dict], height: int, width: int) -> Tensor:
        if not annotations:
            return torch.zeros(0, height, width, dtype=torch.bool)
        mask_api = _mask_api()
        rles = []
        for ann in annotations:
            segmentation = ann["segmentation"]
            if isinstance(segmentation, list):  # polygons: one RLE each, merged into one mask
                rles.append(mask_api.merge(mask_api.frPyObjects(segmentation, height, width)))
            elif isinstance(segmentation["counts"], list):  # uncompressed RLE
                rles.append(mask_api.frPyObjects(segmentation, height, width))
            else:
                rles.append(segmentation)
        decoded = mask_api.decode(rles)  # [H, W, N] uint8, Fortran order
        return torch.from_numpy(decoded).permute(2, 0, 1).contiguous().bool()


class COCOPanopticDataset(_COCOBase):
    """Images and Mask2Former panoptic targets (one mask per thing and stuff segment) from COCO panoptic files.

    Args:
        image_root (str): folder of the images (``file_name`` of each entry of ``images``).
        annotation_file (str): COCO panoptic JSON (``images``, ``annotations`` with ``segments_info``,
            ``categories`` with ``isthing``).
        panoptic_root (str): folder of the panoptic PNGs (``file_name`` of each annotation); a pixel's segment id is
            ``R + 256 G + 256^2 B``, 0 is void.
        transforms (callable, optional): ``(image, target) -> (image, target)``.

    Attributes:
        category_ids (list[int]): COCO category id of each contiguous label.
        is_thing (list[bool]): per label, whether the category is a thing.
        categories (list[dict]): the file's categories sorted by id.
        images (list[dict]): the file's images sorted by id.

    An item is ``(image, target)``: target ``{"labels": int64[N], "masks": bool[N, H, W], "image_id": int,
    "sem_seg": int64[H, W], "pan_seg": int64[H, W], "segments_info": list[dict]}``. ``labels``/``masks`` hold the
    non-crowd segments (things and stuff) in file order; ``sem_seg`` is each pixel's label (crowd pixels included,
    255 on void); ``pan_seg`` the segment ids of the PNG and ``segments_info`` every segment as ``{"id",
    "category_id" (contiguous label), "iscrowd", "isthing"}``: what :class:`mpseg.evaluation.PanopticEvaluator` and
    :class:`mpseg.evaluation.SemanticEvaluator` take.

    Raises:
        ValueError: (when built) an annotation names an unknown image, or a segment an unknown category; two
            annotations for one image. (When read) the PNG's size differs from the image's, or it holds a segment
            id its ``segments_info`` does not list. Messages name the files and ids.
        FileNotFoundError: the image or PNG is missing.
    """

    def __init__(self, image_root: str, annotation_file: str, panoptic_root: str,
                 transforms: Transforms | None = None) -> None:
        super().__init__(image_root, annotation_file, transforms, ("annotations",))
        self.panoptic_root = str(panoptic_root)
        self.is_thing = [bool(c.get("isthing", 0)) for c in self.categories]
        self._annotations: list[dict | None] = [None] * len(self.images)
        for ann in self._data.pop("annotations"):
            where = self._where("annotation of image_id", ann.get("image_id"))
            index = self._check_image_id(ann.get("image_id"), where)
            if self._annotations[index] is not None:
                raise ValueError(f"{where}: a second annotation for this image")
            for segment in ann.get("segments_info", ()):
                self._check_category(segment.get("category_id"), f"{where}, segment id {segment.get('id')}")
            self._annotations[index] = ann

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        info = self.images[index]
        image = self._read_image(info)
        height, width = image.shape[-2:]
        ann = self._annotations[index]
        segments = [] if ann is None else ann.get("segments_info", [])
        if ann is None:
            pan_seg = torch.zeros(height, width, dtype=torch.int64)
        else:
            path = os.path.join(self.panoptic_root, ann["file_name"])
            rgb = read_rgb(path, what=f"panoptic PNG of image id {info['id']}", expected_size=(height, width))
            rgb = rgb.to(torch.int64)
            pan_seg = rgb[0] + 256 * rgb[1] + 256 * 256 * rgb[2]
        segments_info = [
            {"id": int(s["id"]), "category_id": self._label[s["category_id"]], "iscrowd": int(s.get("iscrowd", 0)),
             "isthing": self.is_thing[self._label[s["category_id"]]]}
            for s in segments
        ]
        # One pass over the pixels: every distinct id, then per-id tables for labels and the masks.
        ids, inverse = torch.unique(pan_seg, return_inverse=True)
        row = {int(s["id"]): k for k, s in enumerate(segments_info)}
        unknown = [int(i) for i in ids.tolist() if i != 0 and i not in row]
        if unknown:
            raise ValueError(
                f"panoptic PNG {os.path.join(self.panoptic_root, ann['file_name'])} (image id {info['id']}) holds "
                f"segment ids {unknown[:10]} that its segments_info in {self.annotation_file} does not list"
            )
        semantic_of_id = torch.tensor([255 if i == 0 else segments_info[row[i]]["category_id"] for i in ids.tolist()],
                                      dtype=torch.int64)
        sem_seg = semantic_of_id[inverse]
        kept = [s for s in segments_info if not s["iscrowd"]]
        position = {int(i): k for k, i in enumerate(ids.tolist())}
        # A listed segment absent from the PNG gets an empty mask (index -1 matches no pixel).
        slots = torch.tensor([position.get(s["id"], -1) for s in kept], dtype=torch.int64)
        masks = inverse[None] == slots[:, None, None]
        target = {
            "labels": torch.tensor([s["category_id"] for s in kept], dtype=torch.int64),
            "masks": masks,
            "image_id": int(info["id"]),
            "sem_seg": sem_seg,
            "pan_seg": pan_seg,
            "segments_info": segments_info,
        }
        return self._finish(image, target)
