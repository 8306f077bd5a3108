# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Writes a tiny COCO-format dataset from the synthetic shapes: instance JSON and panoptic JSON + PNGs.

    python examples/make_tiny_coco.py data/tiny_coco --images 8 --size 64

Layout (as COCO's)::

    ROOT/images/000000000001.png ...              the images
    ROOT/annotations/instances.json              things: compressed RLE, uncompressed RLE, polygons, one crowd
    ROOT/annotations/panoptic.json               things and stuff, one crowd segment, void pixels
    ROOT/annotations/panoptic/000000000001.png   segment ids as R + 256 G + 256^2 B

The files exercise what a real COCO file holds: non-contiguous category ids, every segmentation encoding, crowd
regions, void, segment ids above 255 and 65535, and one image without any annotation. :func:`write_tiny_coco` also
returns what each image's training target must be, so tests can check a loader against it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _shapes import CLASS_NAMES, IS_THING, ShapesDataset  # noqa: E402

__all__ = ["write_tiny_coco", "save_png", "rle_uncompressed", "THING_IDS", "STUFF_IDS", "BOX_ID"]

# COCO ids of the shapes classes, deliberately not 0..K-1; the boxes drawn as polygons get their own category.
THING_IDS = (2, 5, 7, 9)
STUFF_IDS = (20, 31)
BOX_ID = 11


def rle_uncompressed(mask: torch.Tensor) -> dict:
    """COCO's uncompressed RLE: run lengths of the column-major flattened mask, starting with a run of zeros."""
    flat = mask.t().flatten().to(torch.int8)
    change = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    bounds = torch.cat([torch.tensor([0]), change, torch.tensor([flat.numel()])])
    runs = (bounds[1:] - bounds[:-1]).tolist()
    if flat.numel() and bool(flat[0]):
        runs = [0] + runs
    return {"size": [mask.shape[0], mask.shape[1]], "counts": runs}


def save_png(image: torch.Tensor, path: str) -> None:
    """Writes a uint8 Tensor[3, H, W] as an RGB PNG."""
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy(), mode="RGB").save(path)


def _segment_id(k: int) -> int:
    # Ids that need all three PNG channels for some segments (k * 40000 + 7 crosses 65535 from k = 2 on).
    return 7 + 40_000 * k


def write_tiny_coco(root: str, *, num_images: int = 4, image_size: int = 64, seed: int = 0) -> list[dict]:
    """Writes the dataset under ``root``; returns per image ``{"image_id", "labels", "masks", "crowd", ...}``.

    The returned records (in image id order) are the expected training targets: ``labels`` (contiguous, over the
    instance file's categories), ``masks`` for the instance file (non-crowd only), ``pan_labels`` / ``pan_masks``
    for the panoptic file (non-crowd things and stuff), ``sem_seg`` (255 on void), and ``image`` (uint8 [3, H, W]).
    The last image has no annotation at all.
    """
    from pycocotools import mask as mask_api

    shapes = ShapesDataset(num_images, image_size=image_size, seed=seed, max_things=4)
    image_dir = os.path.join(root, "images")
    pan_dir = os.path.join(root, "annotations", "panoptic")
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(pan_dir, exist_ok=True)
    # Contiguous labels follow sorted COCO ids: 2, 5, 7, 9, 11 (box) in the instance file.
    instance_ids = sorted(THING_IDS + (BOX_ID,))
    pan_ids = sorted(THING_IDS + STUFF_IDS)
    images, instances, panoptic, expected = [], [], [], []
    for index in range(num_images + 1):
        image_id = 1 + 2 * index  # non-contiguous image ids too
        name = f"{image_id:012d}.png"
        empty = index == num_images  # the extra image: no annotation
        sample = shapes[min(index, num_images - 1)]
        image = (sample["image"] * 255).round().to(torch.uint8)
        record = {"image_id": image_id, "labels": [], "masks": [], "pan_labels": [], "pan_masks": []}
        h = w = image_size
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        if empty:
            image = torch.full_like(image, 127)
            save_png(torch.zeros(3, h, w, dtype=torch.uint8), os.path.join(pan_dir, name))
            panoptic.append({"image_id": image_id, "file_name": name, "segments_info": []})
            record.update(sem_seg=torch.full((h, w), 255, dtype=torch.int64), image=image)
            save_png(image, os.path.join(image_dir, name))
            expected.append(record)
            continue
        # A box drawn on the image and annotated as a polygon (its pixels are known exactly: [x0, x1) x [y0, y1)).
        x0, y0 = 3 + index, 5
        x1, y1 = x0 + 10, y0 + 7
        image[:, y0:y1, x0:x1] = torch.tensor([250, 250, 20], dtype=torch.uint8)[:, None, None]
        save_png(image, os.path.join(image_dir, name))
        crowd_thing = 0 if index == 1 else -1  # one crowd instance in the second image
        segments, pan = [], torch.zeros(h, w, dtype=torch.int64)
        void = torch.zeros(h, w, dtype=torch.bool)
        void[-2:] = True  # the bottom two rows are unlabelled in the panoptic file
        sem = torch.full((h, w), 255, dtype=torch.int64)
        thing_k = 0
        for k, (cls, mask) in enumerate(zip(sample["labels"].tolist(), sample["masks"])):
            coco_id = THING_IDS[cls] if IS_THING[cls] else STUFF_IDS[cls - len(THING_IDS)]
            if IS_THING[cls]:
                crowd = thing_k == crowd_thing
                kind = thing_k % 2  # alternate compressed and uncompressed RLE
                thing_k += 1
                if kind == 0:
                    rle = mask_api.encode(mask.numpy().astype("uint8", order="F"))
                    rle["counts"] = rle["counts"].decode("ascii")
                else:
                    rle = rle_uncompressed(mask)
                instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": coco_id,
                                  "segmentation": rle, "area": int(mask.sum()), "iscrowd": int(crowd),
                                  "bbox": [0, 0, 0, 0]})
                if not crowd:
                    record["labels"].append(instance_ids.index(coco_id))
                    record["masks"].append(mask)
            else:
                crowd = False
            visible = mask & ~void
            if not bool(visible.any()):
                continue
            segment = _segment_id(k + 1)
            pan[visible] = segment
            sem[visible] = pan_ids.index(coco_id)
            segments.append({"id": segment, "category_id": coco_id, "iscrowd": int(crowd),
                             "area": int(visible.sum()), "bbox": [0, 0, 0, 0]})
            if not crowd:
                record["pan_labels"].append(pan_ids.index(coco_id))
                record["pan_masks"].append(visible)
        box = torch.zeros(h, w, dtype=torch.bool)
        box[y0:y1, x0:x1] = True
        polygon = [[x0, y0, x1, y0, x1, y1, x0, y1]]
        instances.append({"id": len(instances) + 1, "image_id": image_id, "category_id": BOX_ID,
                          "segmentation": polygon, "area": int(box.sum()), "iscrowd": 0, "bbox": [x0, y0, 10, 7]})
        record["labels"].append(instance_ids.index(BOX_ID))
        record["masks"].append(box)
        rgb = torch.stack([pan % 256, pan // 256 % 256, pan // 65536]).to(torch.uint8)
        save_png(rgb, os.path.join(pan_dir, name))
        panoptic.append({"image_id": image_id, "file_name": name, "segments_info": segments})
        record.update(sem_seg=sem, image=image)
        expected.append(record)
    for record in expected:
        for key in ("masks", "pan_masks"):
            record[key] = torch.stack(record[key]) if record[key] else torch.zeros(0, image_size, image_size,
                                                                                    dtype=torch.bool)
        for key in ("labels", "pan_labels"):
            record[key] = torch.tensor(record[key], dtype=torch.int64)

    names = dict(zip(THING_IDS + STUFF_IDS, CLASS_NAMES))
    instance_categories = [{"id": c, "name": names.get(c, "box"), "supercategory": "shape"} for c in instance_ids]
    pan_categories = [{"id": c, "name": names[c], "isthing": int(c in THING_IDS)} for c in pan_ids]
    with open(os.path.join(root, "annotations", "instances.json"), "w") as f:
        json.dump({"images": images, "annotations": instances, "categories": instance_categories}, f)
    with open(os.path.join(root, "annotations", "panoptic.json"), "w") as f:
        json.dump({"images": images, "annotations": panoptic, "categories": pan_categories}, f)
    return expected


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="output folder")
    parser.add_argument("--images", type=int, default=8, help="annotated images (one empty image is added)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_tiny_coco(args.root, num_images=args.images, image_size=args.size, seed=args.seed)
    print(f"wrote {args.images + 1} images and their instance and panoptic annotations to {args.root}")


if __name__ == "__main__":
    main()
