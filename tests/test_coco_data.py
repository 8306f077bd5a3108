# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""COCO-format datasets on real files: a tiny dataset written to disk (examples/make_tiny_coco.py) is loaded with both
datasets and the targets are compared with the masks the writer started from (the truth, decoded independently of
pycocotools); bad files raise errors naming the file and the annotation; augmentation and batching."""

import json
import os
import shutil
import sys

import pytest
import torch
import torch.nn.functional as F

from mpseg.data import COCOInstanceDataset, COCOPanopticDataset, LargeScaleJitter, collate

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))

from make_tiny_coco import BOX_ID, STUFF_IDS, THING_IDS, rle_uncompressed, save_png, write_tiny_coco  # noqa: E402

SIZE = 48


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_coco")
    expected = write_tiny_coco(str(root), num_images=3, image_size=SIZE, seed=2)
    return root, expected


def instance_dataset(root, annotation="instances.json", **kwargs):
    return COCOInstanceDataset(str(root / "images"), str(root / "annotations" / annotation), **kwargs)


def panoptic_dataset(root, annotation="panoptic.json", **kwargs):
    return COCOPanopticDataset(str(root / "images"), str(root / "annotations" / annotation),
                               str(root / "annotations" / "panoptic"), **kwargs)


def test_rle_writer_decodes_back():
    # The fixture's own uncompressed-RLE encoder, checked against a hand-written case (column-major runs, zeros first).
    mask = torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    assert rle_uncompressed(mask) == {"size": [2, 3], "counts": [0, 2, 1, 1, 2]}


def test_instance_dataset_targets_equal_written_masks(tiny):
    root, expected = tiny
    ds = instance_dataset(root)
    assert len(ds) == len(expected) == 4
    assert ds.category_ids == sorted(THING_IDS + (BOX_ID,)) and ds.num_classes == 5
    raw = json.load(open(root / "annotations" / "instances.json"))
    kinds = {("poly" if isinstance(a["segmentation"], list) else
              "rle" if isinstance(a["segmentation"]["counts"], list) else "compressed") for a in raw["annotations"]}
    assert kinds == {"poly", "rle", "compressed"} and any(a["iscrowd"] for a in raw["annotations"])
    for (image, target), record in zip(ds, expected):
        assert target["image_id"] == record["image_id"]
        assert image.dtype == torch.float32 and image.shape == (3, SIZE, SIZE)
        torch.testing.assert_close(image, record["image"].float() / 255, rtol=0, atol=0)
        assert target["labels"].dtype == torch.int64 and target["masks"].dtype == torch.bool
        assert torch.equal(target["labels"], record["labels"])
        assert torch.equal(target["masks"], record["masks"])  # polygons, both RLE forms; crowd left out
    crowd_image = ds.images.index(next(im for im in ds.images if im["id"] == expected[1]["image_id"]))
    assert len(ds.annotations(crowd_image)) == len(ds[crowd_image][1]["labels"]) + 1
    _, empty = ds[len(ds) - 1]  # an image without annotations: an empty target
    assert empty["labels"].shape == (0,) and empty["masks"].shape == (0, SIZE, SIZE)


def test_instance_polygon_is_the_rectangle(tiny):
    # Hand-computed: the polygon (x0, y0)-(x1, y1) covers pixels [x0, x1) x [y0, y1), 10 x 7 = 70 pixels.
    root, _ = tiny
    _, target = instance_dataset(root)[0]
    box = target["masks"][target["labels"] == 4]
    assert box.shape[0] == 1 and int(box.sum()) == 70
    assert bool(box[0, 5:12, 3:13].all())


def test_panoptic_dataset_targets_equal_written_pngs(tiny):
    root, expected = tiny
    ds = panoptic_dataset(root)
    assert ds.category_ids == sorted(THING_IDS + STUFF_IDS)
    assert ds.is_thing == [True, True, True, True, False, False]
    crowd_seen = False
    for (image, target), record in zip(ds, expected):
        assert image.shape == (3, SIZE, SIZE) and target["image_id"] == record["image_id"]
        assert torch.equal(target["labels"], record["pan_labels"])
        assert torch.equal(target["masks"], record["pan_masks"])
        assert torch.equal(target["sem_seg"], record["sem_seg"])  # crowd pixels keep their class; void is 255
        ids = {s["id"] for s in target["segments_info"]}
        assert set(torch.unique(target["pan_seg"]).tolist()) - {0} == ids
        assert max(ids, default=0) < 256 ** 3
        crowd_seen |= any(s["iscrowd"] for s in target["segments_info"])
        for s in target["segments_info"]:
            assert s["isthing"] == ds.is_thing[s["category_id"]]
    assert crowd_seen
    assert max(s["id"] for s in ds[0][1]["segments_info"]) > 65535  # all three PNG channels in use
    _, empty = ds[len(ds) - 1]
    assert empty["masks"].shape == (0, SIZE, SIZE) and bool((empty["sem_seg"] == 255).all())


def _edit(root, tmp_path, annotation, change):
    """A copy of an annotation file with ``change(data)`` applied; returns the copy's path."""
    data = json.load(open(root / "annotations" / annotation))
    change(data)
    path = tmp_path / annotation
    path.write_text(json.dumps(data))
    return path


def _first_rle(data):
    return next(a for a in data["annotations"] if isinstance(a["segmentation"], dict))


@pytest.mark.parametrize("change, match", [
    (lambda d: d["annotations"][0].update(category_id=99), r"annotation id 1: category_id 99 is not in"),
    (lambda d: d["annotations"][1].update(image_id=1234), r"annotation id 2: image_id 1234 is not in"),
    (lambda d: d["annotations"][0].update(segmentation=[]), r"annotation id 1: empty segmentation"),
    (lambda d: d["annotations"][-1].update(segmentation=[[1, 2, 3, 4]]), r"at least 3 \(x, y\) points"),
    (lambda d: _first_rle(d)["segmentation"].update(size=[SIZE, SIZE + 1]), r"RLE mask of size \[48, 49\]"),
    (lambda d: d.update(annotations=[]), r"empty 'annotations' list"),
    (lambda d: d.pop("annotations"), r"has no 'annotations' list"),
])
def test_instance_bad_annotations_name_file_and_id(tiny, tmp_path, change, match):
    root, _ = tiny
    path = _edit(root, tmp_path, "instances.json", change)
    with pytest.raises(ValueError, match=match) as info:
        COCOInstanceDataset(str(root / "images"), str(path))
    assert str(path) in str(info.value)


def test_missing_image_and_wrong_image_size(tiny, tmp_path):
    root, _ = tiny
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    name = sorted(os.listdir(images))[1]
    os.remove(images / name)
    ds = COCOInstanceDataset(str(images), str(root / "annotations" / "instances.json"))
    with pytest.raises(FileNotFoundError, match=rf"image id 3: file .*{name} not found"):
        ds[1]
    path = _edit(root, tmp_path, "panoptic.json", lambda d: d["images"][0].update(height=SIZE + 2))
    ds = COCOPanopticDataset(str(root / "images"), str(path), str(root / "annotations" / "panoptic"))
    with pytest.raises(ValueError, match=rf"image id 1: file .* is 48x48 \(HxW\) but the annotation file says 50x48"):
        ds[0]


def test_panoptic_bad_inputs(tiny, tmp_path):
    root, _ = tiny

    def unknown_category(d):
        d["annotations"][0]["segments_info"][0]["category_id"] = 3

    path = _edit(root, tmp_path, "panoptic.json", unknown_category)
    with pytest.raises(ValueError, match=r"image_id 1, segment id \d+: category_id 3 is not in") as info:
        panoptic_dataset(root, annotation=str(path))
    assert str(path) in str(info.value)

    def unlisted_segment(d):
        d["annotations"][0]["segments_info"].pop(0)

    path = _edit(root, tmp_path, "panoptic.json", unlisted_segment)
    with pytest.raises(ValueError, match=r"panoptic PNG .*000000000001.png \(image id 1\) holds segment ids"):
        panoptic_dataset(root, annotation=str(path))[0]
    pan = tmp_path / "panoptic"
    shutil.copytree(root / "annotations" / "panoptic", pan)
    save_png(torch.zeros(3, SIZE, SIZE - 1, dtype=torch.uint8), str(pan / "000000000003.png"))
    ds = COCOPanopticDataset(str(root / "images"), str(root / "annotations" / "panoptic.json"), str(pan))
    with pytest.raises(ValueError, match=r"panoptic PNG of image id 3: file .* is 48x47"):
        ds[1]


def test_missing_extra_names_it(tiny, monkeypatch):
    root, _ = tiny
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'mpseg\[data\]'"):
        instance_dataset(root)


def _nearest_exact(x, size):
    """torch's nearest-exact resize: an independent implementation of the jitter's mask resampling."""
    return F.interpolate(x[None].to(torch.uint8), size=size, mode="nearest-exact")[0]


def test_large_scale_jitter_keeps_masks_aligned(tiny):
    root, _ = tiny
    ds = panoptic_dataset(root)
    image, target = ds[0]
    seen_flip = seen_crop = False
    for seed in range(8):
        jitter = LargeScaleJitter(32, scale_range=(0.5, 2.0), generator=torch.Generator().manual_seed(seed))
        out_image, out = jitter(image, target)
        # Replay the same draws and redo the geometry with torch's own resize.
        gen = torch.Generator().manual_seed(seed)
        scale = (0.5 + 1.5 * float(torch.rand((), generator=gen))) * (32 / SIZE)
        new = max(1, round(SIZE * scale))
        crop = min(new, 32)
        top = int(torch.randint(new - crop + 1, (), generator=gen))
        left = int(torch.randint(new - crop + 1, (), generator=gen))
        flip = float(torch.rand((), generator=gen)) < 0.5
        seen_flip |= flip
        seen_crop |= new > 32
        ref_masks = _nearest_exact(target["masks"], (new, new))[:, top:top + crop, left:left + crop].bool()
        ref_sem = _nearest_exact(target["sem_seg"][None], (new, new))[0, top:top + crop, left:left + crop]
        if flip:
            ref_masks, ref_sem = ref_masks.flip(-1), ref_sem.flip(-1)
        keep = ref_masks.flatten(1).any(1)
        assert out_image.shape == (3, crop, crop)
        assert torch.equal(out["masks"], ref_masks[keep]) and torch.equal(out["labels"], target["labels"][keep])
        assert torch.equal(out["sem_seg"], ref_sem.long())
        visible = set(torch.unique(out["pan_seg"]).tolist())
        assert {s["id"] for s in out["segments_info"]} == visible - {0}
    assert seen_flip and seen_crop


def test_collate_pads_images_and_targets(tiny):
    root, _ = tiny
    ds = panoptic_dataset(root)
    jitter = LargeScaleJitter(40, scale_range=(0.3, 0.9), generator=torch.Generator().manual_seed(0))
    items = [jitter(*ds[i]) for i in range(3)] + [ds[3]]
    images, targets = collate(items, size_divisibility=32, pad_value=(0.1, 0.2, 0.3))
    height = max(i.shape[1] for i, _ in items)
    width = max(i.shape[2] for i, _ in items)
    assert images.shape == (4, 3, -(-height // 32) * 32, -(-width // 32) * 32)
    for b, ((image, target), padded) in enumerate(zip(items, targets)):
        h, w = image.shape[-2:]
        assert padded["image_size"] == (h, w) and "image_size" not in target
        assert torch.equal(images[b, :, :h, :w], image)
        assert torch.equal(images[b, :, h:, :], torch.tensor([0.1, 0.2, 0.3])[:, None, None].expand(3, images.shape[-2] - h, images.shape[-1]))
        assert padded["masks"].shape[-2:] == images.shape[-2:] and padded["masks"].dtype == torch.bool
        assert torch.equal(padded["masks"][:, :h, :w], target["masks"]) and not padded["masks"][:, h:].any()
        assert bool((padded["sem_seg"][h:] == 255).all()) and bool((padded["pan_seg"][:, w:] == 0).all())
    with pytest.raises(ValueError, match="empty batch"):
        collate([])
