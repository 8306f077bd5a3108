# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Triton kernels of the point lookups of the mask losses (the C++/CUDA ops of ``csrc/point_sampling``).

Kernels only (see :mod:`mpseg.ops._triton.msda_kernels` for why). Semantics follow ``mpseg/ops/point_sampling.py``:

* ``sample_masks_kernel``: bilinear values of target masks at points, computed operation by operation as
  ``_sample_masks_at_points_torch`` computes them (the same roundings in the same order), so the results are equal to
  the last bit. Launched with floating-point contraction off (no fused multiply-add), which the bit-equality needs.
* ``select_uncertain_kernel``: the ``k`` most uncertain of ``S`` candidate points of one mask, in candidate order.
  The uncertainties become order-preserving unsigned integers; a radix select (``RADIX_BITS`` bits per pass, a
  histogram per pass held in registers) finds the k-th largest key, and one scan with prefix sums keeps the keys above
  it plus the first ones equal to it. The same kept set as ``torch.topk`` up to ties, like the C++ kernel.
"""

import triton
import triton.language as tl


@triton.jit
def sample_masks_kernel(
    masks_ptr, coords_ptr, index_ptr, out_ptr,
    num_rows, num_points, height, width, num_masks, canvas_w, canvas_h,
    SHARED: tl.constexpr, HAS_INDEX: tl.constexpr, INDEX_64: tl.constexpr, BLOCK: tl.constexpr,
):
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if INDEX_64:
        flat = flat.to(tl.int64)
    active = flat < num_rows * num_points
    row = flat // num_points
    if SHARED:
        point = flat % num_points
    else:
        point = flat
    cx = tl.load(coords_ptr + 2 * point, mask=active, other=0.0)
    cy = tl.load(coords_ptr + 2 * point + 1, mask=active, other=0.0)
    if HAS_INDEX:
        mask_id = tl.load(index_ptr + row, mask=active, other=0)
    else:
        mask_id = row
    # A mask_index entry outside [0, N) reads nothing and gives NaN (the wrapper rejects such indices up front).
    id_ok = (mask_id >= 0) & (mask_id < num_masks)
    active_id = active & id_ok
    mask_id = tl.where(id_ok, mask_id, 0)
    # grid_sample's unnormalisation as the PyTorch path writes it: pixel = ((2c - 1) + 1) * (size / 2) - 0.5.
    x = ((2.0 * cx - 1.0) + 1.0) * (canvas_w.to(cx.dtype) / 2.0) - 0.5
    y = ((2.0 * cy - 1.0) + 1.0) * (canvas_h.to(cy.dtype) / 2.0) - 0.5
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    # Integer corners from clamped floats: the in-range tests below give the same answers as on the exact floor, and a
    # NaN, infinite or huge coordinate is never converted to an integer (its weights are NaN or 0 anyway).
    x0 = tl.minimum(tl.maximum(tl.where(x0f == x0f, x0f, -2.0), -2.0), width.to(x.dtype)).to(tl.int32)
    y0 = tl.minimum(tl.maximum(tl.where(y0f == y0f, y0f, -2.0), -2.0), height.to(y.dtype)).to(tl.int32)
    wx0 = (1.0 - fx) * ((x0 >= 0) & (x0 < width)).to(x.dtype)
    wx1 = fx * ((x0 >= -1) & (x0 < width - 1)).to(x.dtype)
    wy0 = (1.0 - fy) * ((y0 >= 0) & (y0 < height)).to(y.dtype)
    wy1 = fy * ((y0 >= -1) & (y0 < height - 1)).to(y.dtype)
    xc0 = tl.minimum(tl.maximum(x0, 0), width - 1)
    xc1 = tl.minimum(tl.maximum(x0 + 1, 0), width - 1)
    plane = masks_ptr + mask_id * (height * width)
    row0 = plane + tl.minimum(tl.maximum(y0, 0), height - 1) * width
    row1 = plane + tl.minimum(tl.maximum(y0 + 1, 0), height - 1) * width
    # The clamped pixels are read even where their weight is 0, as the PyTorch path does (0 * inf is NaN there too).
    out_dtype = out_ptr.dtype.element_ty
    total = tl.load(row0 + xc0, mask=active_id, other=0).to(out_dtype) * (wx0 * wy0).to(out_dtype)
    total += tl.load(row0 + xc1, mask=active_id, other=0).to(out_dtype) * (wx1 * wy0).to(out_dtype)
    total += tl.load(row1 + xc0, mask=active_id, other=0).to(out_dtype) * (wx0 * wy1).to(out_dtype)
    total += tl.load(row1 + xc1, mask=active_id, other=0).to(out_dtype) * (wx1 * wy1).to(out_dtype)
    tl.store(out_ptr + flat, tl.where(id_ok, total, float("nan")), mask=active)


@triton.jit
def _uncertainty_keys(logits_ptr, coords_ptr, candidates, height, width, KEY_BITS: tl.constexpr):
    """Order-preserving unsigned keys of the uncertainty -|logit| at candidate points (NaN logit: +inf, above all),
    the logit read bilinearly as ``point_sample`` does (coordinates converted to the logits' dtype first)."""
    dtype = logits_ptr.dtype.element_ty
    cx = tl.load(coords_ptr + 2 * candidates).to(dtype)
    cy = tl.load(coords_ptr + 2 * candidates + 1).to(dtype)
    x = ((2.0 * cx - 1.0) + 1.0) * (width.to(dtype) / 2.0) - 0.5
    y = ((2.0 * cy - 1.0) + 1.0) * (height.to(dtype) / 2.0) - 0.5
    finite = (cx - cx == 0.0) & (cy - cy == 0.0)
    inside = finite & (x >= -1.0) & (x < width.to(dtype)) & (y >= -1.0) & (y < height.to(dtype))
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    ok_x0 = (x0 >= 0) & (x0 < width)
    ok_x1 = (x0 + 1 >= 0) & (x0 + 1 < width)
    ok_y0 = inside & (y0 >= 0) & (y0 < height)
    ok_y1 = inside & (y0 + 1 >= 0) & (y0 + 1 < height)
    base = logits_ptr + y0 * width + x0
    value = tl.load(base, mask=ok_y0 & ok_x0, other=0.0) * ((1.0 - fy) * (1.0 - fx))
    value += tl.load(base + 1, mask=ok_y0 & ok_x1, other=0.0) * ((1.0 - fy) * fx)
    value += tl.load(base + width, mask=ok_y1 & ok_x0, other=0.0) * (fy * (1.0 - fx))
    value += tl.load(base + width + 1, mask=ok_y1 & ok_x1, other=0.0) * (fy * fx)
    value = tl.where(finite, value, float("nan"))
    key = -tl.abs(value)
    key = tl.where(key != key, float("inf"), key)
    if KEY_BITS == 32:
        bits = key.to(tl.uint32, bitcast=True)
        sign = tl.full(bits.shape, 0x80000000, tl.uint32)
        ones = tl.full(bits.shape, 0xFFFFFFFF, tl.uint32)
    else:
        bits = key.to(tl.uint64, bitcast=True)
        sign = tl.full(bits.shape, 0x8000000000000000, tl.uint64)
        ones = tl.full(bits.shape, 0xFFFFFFFFFFFFFFFF, tl.uint64)
    # Flip every bit of a negative number, only the sign bit of a positive one: unsigned order = float order. (XOR
    # with all ones, not ~: the interpreter computes ~ as a signed -1 XOR, which overflows unsigned types.)
    return tl.where((bits & sign) != 0, bits ^ ones, bits | sign)


@triton.jit
def select_uncertain_kernel(
    logits_ptr, coords_ptr, keys_ptr, out_ptr,
    num_candidates, keep, height, width,
    KEY_BITS: tl.constexpr, RADIX_BITS: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK: tl.constexpr,
):
    mask_id = tl.program_id(0).to(tl.int64)
    logits = logits_ptr + mask_id * height * width
    coords = coords_ptr + mask_id * num_candidates * 2
    keys_row = keys_ptr + mask_id * num_candidates
    out = out_ptr + mask_id * keep * 2
    offsets = tl.arange(0, BLOCK)
    key_type = tl.uint32 if KEY_BITS == 32 else tl.uint64
    store_type = tl.int32 if KEY_BITS == 32 else tl.int64
    # Pass 1: the keys, kept in a scratch row (read again by every radix pass).
    for begin in range(0, num_candidates, BLOCK):
        candidates = begin + offsets
        active = candidates < num_candidates
        keys = _uncertainty_keys(logits, coords, tl.where(active, candidates, 0), height, width, KEY_BITS)
        tl.store(keys_row + candidates, keys.to(store_type, bitcast=True), mask=active)
    # Radix select of the keep-th largest key, most significant digit first. `prefix` holds the digits fixed so far,
    # `known` their bits, `need` how many keys matching the prefix are still to be kept.
    bins = tl.arange(0, NUM_BINS)
    prefix = tl.zeros((), dtype=key_type)
    known = tl.zeros((), dtype=key_type)
    digit_mask = tl.full((), NUM_BINS - 1, key_type)
    need = keep
    for step in tl.static_range(KEY_BITS // RADIX_BITS):
        shift = KEY_BITS - RADIX_BITS * (step + 1)
        histogram = tl.zeros((NUM_BINS,), dtype=tl.int32)
        for begin in range(0, num_candidates, BLOCK):
            candidates = begin + offsets
            active = candidates < num_candidates
            keys = tl.load(keys_row + candidates, mask=active, other=0).to(key_type, bitcast=True)
            matching = active & ((keys & known) == prefix)
            digits = ((keys >> shift) & digit_mask).to(tl.int32)
            one_hot = (digits[:, None] == bins[None, :]) & matching[:, None]
            histogram += tl.sum(one_hot.to(tl.int32), axis=0)
        # Keys in bins >= b, for every b; the chosen bin is the highest one that still holds the need-th key.
        at_or_above = tl.sum(tl.where(bins[None, :] >= bins[:, None], histogram[None, :], 0), axis=1)
        chosen = tl.max(tl.where(at_or_above >= need, bins, -1), axis=0)
        need -= tl.sum(tl.where(bins > chosen, histogram, 0), axis=0)
        prefix = prefix | (chosen.to(key_type) << shift)
        known = known | (digit_mask << shift)
    # Keep the keys above the threshold and the first `need` equal to it, in candidate order.
    threshold = prefix
    kept = tl.zeros((), dtype=tl.int32)
    ties = tl.zeros((), dtype=tl.int32)
    for begin in range(0, num_candidates, BLOCK):
        candidates = begin + offsets
        active = candidates < num_candidates
        keys = tl.load(keys_row + candidates, mask=active, other=0).to(key_type, bitcast=True)
        tie = active & (keys == threshold)
        tie_rank = ties + tl.cumsum(tie.to(tl.int32), axis=0) - tie.to(tl.int32)
        take = (active & (keys > threshold)) | (tie & (tie_rank < need))
        slot = kept + tl.cumsum(take.to(tl.int32), axis=0) - take.to(tl.int32)
        x = tl.load(coords + 2 * candidates, mask=take, other=0.0)
        y = tl.load(coords + 2 * candidates + 1, mask=take, other=0.0)
        tl.store(out + 2 * slot, x, mask=take)
        tl.store(out + 2 * slot + 1, y, mask=take)
        kept += tl.sum(take.to(tl.int32), axis=0)
        ties += tl.sum(tie.to(tl.int32), axis=0)
