# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Triton kernels of multi-scale deformable attention (forward and backward).

Kernels only: this file imports nothing but Triton, so :mod:`mpseg.ops._triton` can load it twice, once compiled for
GPUs and once under Triton's interpreter (which Triton decides when a kernel is decorated). Launch, registration and
the design notes are in :mod:`mpseg.ops._triton.ms_deform_attn` and ``docs/api/triton.rst``.

One program owns ``BLOCK_Q`` queries of one (batch, head) and all ``D`` channels. Its tile has one row per (query,
point) pair, ``BLOCK_Q * BLOCK_P`` rows of ``BLOCK_D`` channels: the channels of a value row are contiguous, so every
corner read is a row of ``D`` consecutive elements (vector loads), the ``P`` points of a level are gathered at once
(more independent loads in flight), and the reductions (over points in the forward, over channels for the per-sample
gradients of the backward) stay in the program's registers. Levels are visited one by one; their metadata is read on
the device (no host sync) and a level that does not fit value's rows is treated as empty, as the C++ kernels do, so a
wrong ``spatial_shapes`` can never read out of bounds.
"""

import triton
import triton.language as tl


@triton.jit
def _corners(loc_x, loc_y, height, width, active):
    """Bilinear corners of samples at normalised (loc_x, loc_y) on a height x width level (``sampling.h`` semantics:
    ``grid_sample`` with zero padding, ``align_corners=False``). Returns the four in-level rows (y * W + x), their
    validity, their weights, the fractional parts (fx, fy) and whether any corner lies inside (NaN/inf: none)."""
    width_f = width.to(loc_x.dtype)
    height_f = height.to(loc_x.dtype)
    x = loc_x * width_f - 0.5
    y = loc_y * height_f - 0.5
    # Some corner is inside iff floor(x) in [-1, W-1] and floor(y) in [-1, H-1]; written so that NaN fails. The range
    # is checked before any float-to-int conversion (of a NaN or a huge value).
    inside = active & (x >= -1.0) & (x < width_f) & (y >= -1.0) & (y < height_f)
    x = tl.where(inside, x, 0.0)
    y = tl.where(inside, y, 0.0)
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    w32 = width.to(tl.int32)
    h32 = height.to(tl.int32)
    x0_in = (x0 >= 0) & (x0 < w32)
    x1_in = (x0 + 1 >= 0) & (x0 + 1 < w32)
    y0_in = inside & (y0 >= 0) & (y0 < h32)
    y1_in = inside & (y0 + 1 >= 0) & (y0 + 1 < h32)
    ok00 = y0_in & x0_in
    ok01 = y0_in & x1_in
    ok10 = y1_in & x0_in
    ok11 = y1_in & x1_in
    hx = 1.0 - fx
    hy = 1.0 - fy
    w00 = tl.where(ok00, hy * hx, 0.0)
    w01 = tl.where(ok01, hy * fx, 0.0)
    w10 = tl.where(ok10, fy * hx, 0.0)
    w11 = tl.where(ok11, fy * fx, 0.0)
    row00 = y0 * w32 + x0
    return (row00, row00 + 1, row00 + w32, row00 + w32 + 1, ok00, ok01, ok10, ok11, w00, w01, w10, w11, fx, fy,
            inside)


@triton.jit
def _level(shapes_ptr, starts_ptr, level, num_rows):
    """(height, width, start) of one level, checked against value's rows (``level_in_bounds`` in C++): a level that
    does not fit gets size 0 x 0, on which every corner is invalid (so it reads nothing and contributes zero)."""
    height = tl.load(shapes_ptr + 2 * level)
    width = tl.load(shapes_ptr + 2 * level + 1)
    start = tl.load(starts_ptr + level)
    safe_width = tl.maximum(width, 1)
    usable = ((height > 0) & (width > 0) & (start >= 0) & (start <= num_rows)
              & (height <= (num_rows - start) // safe_width))
    # (Sizes zeroed rather than a boolean carried along: Triton 3.8's interpreter mis-types `block & scalar` masks.)
    return tl.where(usable, height, 0), tl.where(usable, width, 0), tl.where(usable, start, 0)


@triton.jit
def _tile(pid, num_queries, num_heads, num_points, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr,
          INDEX_64: tl.constexpr):
    """Splits the flat program id into (batch, head, query block); returns them with the query and point of every row
    of the tile, and which rows are real (query < Q, point < P)."""
    query_blocks = tl.cdiv(num_queries, BLOCK_Q)
    block = pid % query_blocks
    head = (pid // query_blocks) % num_heads
    batch = pid // (query_blocks * num_heads)
    if INDEX_64:
        batch = batch.to(tl.int64)
    rows = tl.arange(0, BLOCK_Q * BLOCK_P)
    queries = block * BLOCK_Q + rows // BLOCK_P
    points = rows % BLOCK_P
    return batch, head, queries, points, (queries < num_queries) & (points < num_points)


@triton.jit
def _gather(rows_ptr, r00, r01, r10, r11, ok00, ok01, ok10, ok11, row_stride, chans, d_ok, ACC_DTYPE: tl.constexpr,
            INDEX_64: tl.constexpr):
    """The four corner rows [rows, BLOCK_D] (zeros where a corner is invalid), and their element offsets."""
    if INDEX_64:
        r00, r01, r10, r11 = r00.to(tl.int64), r01.to(tl.int64), r10.to(tl.int64), r11.to(tl.int64)
    cols = chans[None, :]
    o00 = r00[:, None] * row_stride + cols
    o01 = r01[:, None] * row_stride + cols
    o10 = r10[:, None] * row_stride + cols
    o11 = r11[:, None] * row_stride + cols
    m00 = ok00[:, None] & d_ok[None, :]
    m01 = ok01[:, None] & d_ok[None, :]
    m10 = ok10[:, None] & d_ok[None, :]
    m11 = ok11[:, None] & d_ok[None, :]
    v00 = tl.load(rows_ptr + o00, mask=m00, other=0.0).to(ACC_DTYPE)
    v01 = tl.load(rows_ptr + o01, mask=m01, other=0.0).to(ACC_DTYPE)
    v10 = tl.load(rows_ptr + o10, mask=m10, other=0.0).to(ACC_DTYPE)
    v11 = tl.load(rows_ptr + o11, mask=m11, other=0.0).to(ACC_DTYPE)
    return v00, v01, v10, v11, o00, o01, o10, o11, m00, m01, m10, m11


@triton.jit
def _level_rows(value_offset, start, row_stride, INDEX_64: tl.constexpr):
    if INDEX_64:
        return value_offset + start * row_stride
    return value_offset + start.to(tl.int32) * row_stride


@triton.jit
def msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    num_rows, num_queries, num_heads, num_levels, num_points, channels,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    batch, head, queries, points, active = _tile(tl.program_id(0), num_queries, num_heads, num_points, BLOCK_Q,
                                                 BLOCK_P, INDEX_64)
    chans = tl.arange(0, BLOCK_D)
    d_ok = chans < channels
    row_stride = num_heads * channels  # elements between consecutive rows of value (and queries of the output)
    value_offset = (batch * num_rows * num_heads + head) * channels
    # Index of sample (batch, query, head, 0, point) in the flattened [B, Q, M, L, P] layout.
    samples = ((batch * num_queries + queries) * num_heads + head) * (num_levels * num_points) + points
    acc = tl.zeros((BLOCK_Q * BLOCK_P, BLOCK_D), dtype=ACC_DTYPE)
    for level in range(num_levels):
        height, width, start = _level(shapes_ptr, starts_ptr, level, num_rows)
        level_rows = value_ptr + _level_rows(value_offset, start, row_stride, INDEX_64)
        sample = samples + level * num_points
        loc_x = tl.load(loc_ptr + 2 * sample, mask=active, other=0.0).to(ACC_DTYPE)
        loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=active, other=0.0).to(ACC_DTYPE)
        attn = tl.load(attn_ptr + sample, mask=active, other=0.0).to(ACC_DTYPE)
        r00, r01, r10, r11, ok00, ok01, ok10, ok11, w00, w01, w10, w11, fx, fy, inside = _corners(
            loc_x, loc_y, height, width, active)
        v00, v01, v10, v11, o00, o01, o10, o11, m00, m01, m10, m11 = _gather(
            level_rows, r00, r01, r10, r11, ok00, ok01, ok10, ok11, row_stride, chans, d_ok, ACC_DTYPE, INDEX_64)
        sampled = w00[:, None] * v00 + w01[:, None] * v01 + w10[:, None] * v10 + w11[:, None] * v11
        acc += tl.where(inside, attn, 0.0)[:, None] * sampled
    # Sum over the points of each query (rows of one query are consecutive): a reduction in registers.
    total = tl.sum(tl.reshape(acc, (BLOCK_Q, BLOCK_P, BLOCK_D)), axis=1)
    out_queries = tl.program_id(0) % tl.cdiv(num_queries, BLOCK_Q) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    out = out_ptr + (batch * num_queries + out_queries[:, None]) * row_stride + head * channels + chans[None, :]
    tl.store(out, total.to(out_ptr.dtype.element_ty), mask=(out_queries < num_queries)[:, None] & d_ok[None, :])


@triton.jit
def msda_backward_kernel(
    grad_out_ptr, value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_rows, num_queries, num_heads, num_levels, num_points, channels,
    BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    batch, head, queries, points, active = _tile(tl.program_id(0), num_queries, num_heads, num_points, BLOCK_Q,
                                                 BLOCK_P, INDEX_64)
    chans = tl.arange(0, BLOCK_D)
    d_ok = chans < channels
    row_stride = num_heads * channels
    value_offset = (batch * num_rows * num_heads + head) * channels
    samples = ((batch * num_queries + queries) * num_heads + head) * (num_levels * num_points) + points
    # grad_output of each row's query (read once per point: the repeats hit the cache).
    grad_out = tl.load(grad_out_ptr + (batch * num_queries + queries[:, None]) * row_stride + head * channels
                       + chans[None, :], mask=active[:, None] & d_ok[None, :], other=0.0).to(ACC_DTYPE)
    for level in range(num_levels):
        height, width, start = _level(shapes_ptr, starts_ptr, level, num_rows)
        level_offset = _level_rows(value_offset, start, row_stride, INDEX_64)
        sample = samples + level * num_points
        loc_x = tl.load(loc_ptr + 2 * sample, mask=active, other=0.0).to(ACC_DTYPE)
        loc_y = tl.load(loc_ptr + 2 * sample + 1, mask=active, other=0.0).to(ACC_DTYPE)
        attn = tl.load(attn_ptr + sample, mask=active, other=0.0).to(ACC_DTYPE)
        r00, r01, r10, r11, ok00, ok01, ok10, ok11, w00, w01, w10, w11, fx, fy, inside = _corners(
            loc_x, loc_y, height, width, active)
        v00, v01, v10, v11, o00, o01, o10, o11, m00, m01, m10, m11 = _gather(
            value_ptr + level_offset, r00, r01, r10, r11, ok00, ok01, ok10, ok11, row_stride, chans, d_ok, ACC_DTYPE,
            INDEX_64)
        # dot_c = <grad_output, value_c> over the channels: reduced in registers, one per corner and sample.
        dot00 = tl.sum(grad_out * v00, axis=1)
        dot01 = tl.sum(grad_out * v01, axis=1)
        dot10 = tl.sum(grad_out * v10, axis=1)
        dot11 = tl.sum(grad_out * v11, axis=1)
        # sample_gradients() of sampling.h: d weight / d x = (-hy, hy, -fy, fy), d weight / d y = (-hx, -fx, hx, fx).
        grad_attn = w00 * dot00 + w01 * dot01 + w10 * dot10 + w11 * dot11
        dx = (1.0 - fy) * (dot01 - dot00) + fy * (dot11 - dot10)
        dy = (1.0 - fx) * (dot10 - dot00) + fx * (dot11 - dot01)
        scale = tl.where(inside, attn, 0.0)
        grad_x = tl.where(inside, scale * width.to(ACC_DTYPE) * dx, 0.0)
        grad_y = tl.where(inside, scale * height.to(ACC_DTYPE) * dy, 0.0)
        tl.store(grad_attn_ptr + sample, tl.where(inside, grad_attn, 0.0).to(grad_attn_ptr.dtype.element_ty),
                 mask=active)
        tl.store(grad_loc_ptr + 2 * sample, grad_x.to(grad_loc_ptr.dtype.element_ty), mask=active)
        tl.store(grad_loc_ptr + 2 * sample + 1, grad_y.to(grad_loc_ptr.dtype.element_ty), mask=active)
        # The value gradient scatters: samples of any program may share a corner, hence atomics (relaxed: only the
        # sum matters), one per channel, contiguous along the row. The buffer is float32 for half types.
        weighted = scale[:, None] * grad_out
        grad_rows = grad_value_ptr + level_offset
        tl.atomic_add(grad_rows + o00, w00[:, None] * weighted, mask=m00, sem="relaxed")
        tl.atomic_add(grad_rows + o01, w01[:, None] * weighted, mask=m01, sem="relaxed")
        tl.atomic_add(grad_rows + o10, w10[:, None] * weighted, mask=m10, sem="relaxed")
        tl.atomic_add(grad_rows + o11, w11[:, None] * weighted, mask=m11, sem="relaxed")
