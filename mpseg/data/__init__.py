# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""COCO-format datasets, Mask2Former's training augmentation and padding-aware batching (the ``data`` extra).

``import mpseg.data`` works without the extra; :class:`COCOInstanceDataset` needs ``pycocotools`` (``pip install
'mpseg[data]'``) to decode polygons and RLE, and says so when it is missing. Images and panoptic PNGs are read with
Pillow.
"""

from .coco import COCOInstanceDataset, COCOPanopticDataset
from .transforms import LargeScaleJitter, collate

__all__ = ["COCOInstanceDataset", "COCOPanopticDataset", "LargeScaleJitter", "collate"]
