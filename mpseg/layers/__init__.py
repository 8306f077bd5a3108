# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""``nn.Module`` building blocks. Layers import ops, never the training code."""

from .decoder import MaskedAttentionDecoder
from .mask_pilot import MaskPilot, MaskPilotNoiser
from .ms_deform_attn import MSDeformAttn
from .pixel_decoder import MSDeformAttnPixelDecoder
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "MSDeformAttn",
    "PositionEmbeddingSine",
    "MSDeformAttnPixelDecoder",
    "MaskedAttentionDecoder",
    "MaskPilotNoiser",
    "MaskPilot",
]
