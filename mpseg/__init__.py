# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""mpseg: Mask2Former and MP-Former (mask-piloted Transformer) building blocks for PyTorch.

Data flows one way: ``ops`` (functional, compiled kernels) -> ``layers`` (``nn.Module``s) -> ``training`` (matcher,
criterion) -> ``inference`` / ``diagnostics``. Everything public is re-exported here.
"""

from .ops import available_backends, ms_deform_attn, ms_deform_attn_reference, point_sample
from .layers import (
    MaskedAttentionDecoder,
    MaskPilot,
    MaskPilotNoiser,
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    PositionEmbeddingSine,
)
from .training import HungarianMatcher, SetCriterion
from .inference import instance_inference, panoptic_inference, semantic_inference
from .diagnostics import layer_consistency
from . import convert

__version__ = "0.1.0.dev0"

__all__ = [
    "__version__",
    # ops
    "available_backends",
    "ms_deform_attn",
    "ms_deform_attn_reference",
    "point_sample",
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
    # inference and diagnostics
    "semantic_inference",
    "panoptic_inference",
    "instance_inference",
    "layer_consistency",
    "convert",
]
