# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""mpseg: Mask2Former and MP-Former (mask-piloted Transformer) building blocks for PyTorch.

Data flows one way: ``ops`` (functional, compiled kernels) -> ``layers`` (``nn.Module``s) -> ``training`` (matcher,
criterion) -> ``inference`` / ``diagnostics``. Everything public is re-exported here.
"""

from .ops import (
    available_backends,
    level_metadata,
    ms_deform_attn,
    ms_deform_attn_reference,
    point_sample,
    sample_masks_at_points,
    sample_uncertain_points,
    use_backend,
)
from .layers import (
    MaskedAttentionDecoder,
    MaskPilot,
    MaskPilotNoiser,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    PositionEmbeddingSine,
)
from .training import DEFAULT_WEIGHT_DICT, HungarianMatcher, SetCriterion, dice_loss, sigmoid_ce_loss
from .inference import instance_inference, panoptic_inference, resize_mask_logits, semantic_inference
from .diagnostics import layer_consistency
from . import convert, data, evaluation

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # ops
    "available_backends",
    "use_backend",
    "level_metadata",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "point_sample",
    "sample_uncertain_points",
    "sample_masks_at_points",
    # layers
    "MSDeformAttn",
    "PositionEmbeddingSine",
    "MSDeformAttnPixelDecoder",
    "MaskedAttentionDecoder",
    "MaskPilotNoiser",
    "MaskPilot",
    # training
    "HungarianMatcher",
    "SetCriterion",
    "DEFAULT_WEIGHT_DICT",
    "sigmoid_ce_loss",
    "dice_loss",
    # inference and diagnostics
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "resize_mask_logits",
    "layer_consistency",
    "convert",
    # COCO-format data and evaluation (the `data` extra for COCO masks and mask AP)
    "data",
    "evaluation",
]
