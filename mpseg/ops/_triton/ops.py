# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""``torch.ops.mpseg_triton``: the Triton kernels as PyTorch operators (imported by :func:`mpseg.ops._triton.load`).

Each op is a :func:`torch.library.triton_op` whose body launches its kernels through :func:`torch.library.wrap_triton`,
so ``torch.compile`` (and ``make_fx``) trace into the launches instead of treating the op as opaque; the same body run
on fake tensors is the op's fake (meta) implementation. Schemas and semantics are those of the C++ ops of
``torch.ops.mpseg``.

Under ``TRITON_INTERPRET=1`` the kernels are interpreted functions, which ``wrap_triton`` cannot trace (they run
eagerly on real data only). There the body calls a twin op, ``_<name>_interpreted``: an opaque
:func:`torch.library.custom_op` with a fake implementation, whose real implementation launches the interpreted kernels.
The arithmetic, launch code and registrations are the same in both modes; only what ``torch.compile`` sees differs.
"""

from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._library.triton import is_wrap_triton_enabled

from ..ms_deform_attn import _backward_with, _fake_backward, _fake_forward, _no_double_backward, _setup_context
from ..point_sampling import _fake_sample_masks, _fake_select, _no_backward, _non_differentiable
from . import TUNING, interpreting, kernels

__all__: list[str] = []

_NAMESPACE = "mpseg_triton"
_INT32_LIMIT = 2**31 - 1


class _Launcher:
    """Kernels of one kernel module, launchable as ``launcher.kernel_name[grid](...)``: the interpreted functions as
    they are, the compiled ones through ``wrap_triton`` (traceable)."""

    def __init__(self, module_name: str, interpret: bool) -> None:
        self.module = kernels(module_name, interpret)
        self.interpret = interpret

    def __getattr__(self, name: str):
        kernel = getattr(self.module, name)
        return kernel if self.interpret else torch.library.wrap_triton(kernel)


def _define(name: str, schema: str, impl: Callable, fake: Callable, module_name: str):
    """Registers ``mpseg_triton::<name>`` (a triton_op) and its interpreted twin; ``impl(launcher, *args)`` is the
    body of both."""
    interpreted = torch.library.custom_op(
        f"{_NAMESPACE}::_{name}_interpreted",
        lambda *args: impl(_Launcher(module_name, True), *args),
        mutates_args=(),
        schema=schema,
    )
    interpreted.register_fake(fake)

    def body(*args):
        if interpreting():
            return getattr(torch.ops.mpseg_triton, f"_{name}_interpreted")(*args)
        return impl(_Launcher(module_name, False), *args)

    return torch.library.triton_op(f"{_NAMESPACE}::{name}", body, mutates_args=(), schema=schema)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(message)


def _pow2_at_least(n: int) -> int:
    return 1 if int(n) <= 1 else 1 << (int(n) - 1).bit_length()


def _needs_int64(*tensors: Tensor) -> bool:
    # Offsets are computed in 32-bit integers unless some tensor's flat index (or twice it, for (x, y) pairs) could
    # overflow them. Decided from shapes only: no device data read.
    return any(2 * t.numel() > _INT32_LIMIT for t in tensors)


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


# ------------------------------------------------------------------------------------------------------------------
# Multi-scale deformable attention.


def _msda_shapes(value: Tensor, sampling_locations: Tensor) -> tuple[int, int, int, int, int, int, int]:
    batch, rows, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    return batch, rows, heads, channels, queries, levels, points


def _check_msda(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                attention_weights: Tensor) -> None:
    # Direct calls of the op skip mpseg.ms_deform_attn's checks; these keep every kernel read in bounds (the level
    # metadata itself is checked on the device, inside the kernels).
    if value.dim() != 4 or sampling_locations.dim() != 6 or attention_weights.dim() != 5:
        raise ValueError(
            f"mpseg_triton.ms_deform_attn: expected value [B, S, M, D], sampling_locations [B, Q, M, L, P, 2], "
            f"attention_weights [B, Q, M, L, P]; got {tuple(value.shape)}, {tuple(sampling_locations.shape)}, "
            f"{tuple(attention_weights.shape)}"
        )
    batch, _, heads, _, queries, levels, points = _msda_shapes(value, sampling_locations)
    expected = (batch, queries, heads, levels, points)
    if tuple(sampling_locations.shape) != expected + (2,) or tuple(attention_weights.shape) != expected:
        raise ValueError(
            f"mpseg_triton.ms_deform_attn: sampling_locations must be {expected + (2,)} and attention_weights "
            f"{expected}, got {tuple(sampling_locations.shape)} and {tuple(attention_weights.shape)}"
        )
    if tuple(spatial_shapes.shape) != (levels, 2) or tuple(level_start_index.shape) != (levels,):
        raise ValueError(
            f"mpseg_triton.ms_deform_attn: spatial_shapes must be [{levels}, 2] and level_start_index [{levels}], got "
            f"{tuple(spatial_shapes.shape)} and {tuple(level_start_index.shape)}"
        )
    if spatial_shapes.dtype != torch.int64 or level_start_index.dtype != torch.int64:
        raise TypeError("mpseg_triton.ms_deform_attn: spatial_shapes and level_start_index must be int64")
    for name, arg in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if arg.dtype != value.dtype:
            raise TypeError(
                f"mpseg_triton.ms_deform_attn: {name} must have value's dtype {value.dtype}, got {arg.dtype}"
            )


def _msda_blocks(channels: int, queries: int, points: int, block_elements: int) -> dict[str, int]:
    """Tile sizes: every point and channel of a query in one program, as many queries as ``block_elements`` allow."""
    block_d = _pow2_at_least(channels)
    block_p = _pow2_at_least(points)
    block_q = max(1, min(block_elements // (block_d * block_p), _pow2_at_least(queries)))
    return {"BLOCK_Q": block_q, "BLOCK_P": block_p, "BLOCK_D": block_d}


def _msda_forward(k: _Launcher, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                  sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    _check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, rows, heads, channels, queries, levels, points = _msda_shapes(value, sampling_locations)
    out = value.new_empty((batch, queries, heads * channels))
    if out.numel() == 0:
        return out
    if levels * points == 0:
        return out.zero_()
    value, sampling_locations, attention_weights = (
        t.contiguous() for t in (value, sampling_locations, attention_weights))
    blocks = _msda_blocks(channels, queries, points, TUNING.msda_forward_block)
    grid = (batch * heads * triton.cdiv(queries, blocks["BLOCK_Q"]),)
    k.msda_forward_kernel[grid](
        value, spatial_shapes.contiguous(), level_start_index.contiguous(), sampling_locations, attention_weights, out,
        rows, queries, heads, levels, points, channels,
        **blocks, ACC_DTYPE=_acc_dtype(value.dtype), INDEX_64=_needs_int64(value, sampling_locations, out),
        num_warps=TUNING.msda_forward_warps, num_stages=TUNING.num_stages,
    )
    return out


def _msda_backward(k: _Launcher, grad_output: Tensor, value: Tensor, spatial_shapes: Tensor,
                   level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor):
    _check_msda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, rows, heads, channels, queries, levels, points = _msda_shapes(value, sampling_locations)
    if tuple(grad_output.shape) != (batch, queries, heads * channels) or grad_output.dtype != value.dtype:
        raise ValueError(
            f"mpseg_triton._ms_deform_attn_backward: grad_output must be {(batch, queries, heads * channels)} of "
            f"dtype {value.dtype}, got {tuple(grad_output.shape)} of dtype {grad_output.dtype}"
        )
    if not k.interpret:
        # Compiled, the value gradient is summed by atomic adds in whatever order the GPU runs them (the interpreter
        # runs programs one after another: deterministic). Same report as the CUDA kernel's.
        torch._C._alert_not_deterministic("mpseg_triton._ms_deform_attn_backward")
    # Half types accumulate the scattered value gradient in float32 (atomics of many samples into one row), then cast.
    accumulate = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=accumulate, device=value.device)
    grad_locations = torch.zeros(sampling_locations.shape, dtype=value.dtype, device=value.device)
    grad_weights = torch.zeros(attention_weights.shape, dtype=value.dtype, device=value.device)
    if attention_weights.numel() and channels:
        value, sampling_locations, attention_weights, grad_output = (
            t.contiguous() for t in (value, sampling_locations, attention_weights, grad_output))
        blocks = _msda_blocks(channels, queries, points, TUNING.msda_backward_block)
        grid = (batch * heads * triton.cdiv(queries, blocks["BLOCK_Q"]),)
        k.msda_backward_kernel[grid](
            grad_output, value, spatial_shapes.contiguous(), level_start_index.contiguous(), sampling_locations,
            attention_weights, grad_value, grad_locations, grad_weights,
            rows, queries, heads, levels, points, channels,
            **blocks, ACC_DTYPE=_acc_dtype(value.dtype), INDEX_64=_needs_int64(value, sampling_locations, grad_output),
            num_warps=TUNING.msda_backward_warps, num_stages=TUNING.num_stages,
        )
    return grad_value.to(value.dtype), grad_locations, grad_weights


_MSDA_SCHEMA = ("(Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
                "Tensor attention_weights) -> Tensor")
_MSDA_BACKWARD_SCHEMA = ("(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
                         "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)")

ms_deform_attn = _define("ms_deform_attn", _MSDA_SCHEMA, _msda_forward, _fake_forward, "msda_kernels")
ms_deform_attn_backward = _define("_ms_deform_attn_backward", _MSDA_BACKWARD_SCHEMA, _msda_backward,
                                  _fake_backward, "msda_kernels")


def _backward(ctx, grad_output):
    return _backward_with(torch.ops.mpseg_triton._ms_deform_attn_backward, ctx, grad_output)


ms_deform_attn.register_autograd(_backward, setup_context=_setup_context)
ms_deform_attn_backward.register_autograd(_no_double_backward)
# As for the C++ op: under autocast the kernel runs in float32 (Deformable DETR casts around its kernel too).
for _device_type in ("cpu", "cuda"):
    torch.library.register_autocast(f"{_NAMESPACE}::ms_deform_attn", _device_type, torch.float32)


# ------------------------------------------------------------------------------------------------------------------
# Point lookups of the mask losses.


def _sample_masks(k: _Launcher, masks: Tensor, coords: Tensor, mask_index: Tensor | None, canvas_h: int,
                  canvas_w: int) -> Tensor:
    # The checks of csrc/point_sampling/point_sampling.h, same messages (RuntimeError, as TORCH_CHECK raises).
    name = "_sample_masks_at_points"
    _require(masks.dim() == 3, f"{name}: masks must be [N, H, W], got shape {list(masks.shape)}")
    _require(coords.dtype in (torch.float32, torch.float64),
             f"{name}: coords must be float32 or float64, got {coords.dtype}")
    _require(coords.dim() in (2, 3) and coords.shape[-1] == 2,
             f"{name}: coords must be [P, 2] or [R, P, 2], got shape {list(coords.shape)}")
    _require(masks.dtype != torch.complex64 and masks.dtype != torch.complex128,
             f"{name}: masks must be bool, integer or floating point, got {masks.dtype}")
    num_masks, height, width = masks.shape
    shared = coords.dim() == 2
    _require(canvas_h >= height and canvas_w >= width,
             f"{name}: the canvas ({canvas_h}, {canvas_w}) must be at least the mask size ({height}, {width})")
    rows = num_masks
    if mask_index is not None:
        _require(mask_index.dim() == 1 and mask_index.dtype == torch.int64,
                 f"{name}: mask_index must be int64 [R], got {mask_index.dtype} of shape {list(mask_index.shape)}")
        _require(not shared, f"{name}: mask_index needs per-row coords [R, P, 2], got shape {list(coords.shape)}")
        rows = mask_index.shape[0]
        if mask_index.device.type == "cpu":  # free on the host; on a GPU the kernel turns a bad index into NaN
            bad = ((mask_index < 0) | (mask_index >= num_masks)).nonzero()
            if bad.numel():
                r = int(bad[0, 0])
                raise RuntimeError(f"{name}: mask_index[{r}] = {int(mask_index[r])} is out of range for {num_masks} "
                                   "masks")
    _require(shared or coords.shape[0] == rows,
             f"{name}: coords [R, P, 2] must have R = {rows} rows (masks.size(0), or mask_index's length), got shape "
             f"{list(coords.shape)}")
    points = coords.shape[-2]
    out = torch.zeros((rows, points), dtype=coords.dtype, device=coords.device)
    if rows * points == 0 or height * width == 0:
        return out
    if masks.dtype == torch.bool:
        masks = masks.view(torch.uint8)  # same bytes; a uint8 pointer is portable across Triton versions
    index = mask_index.contiguous() if mask_index is not None else coords  # (unused pointer when there is no index)
    block = TUNING.points_block
    # Floating-point contraction off in direct launches: the results must equal the PyTorch path's to the last bit,
    # and a fused multiply-add rounds once where it rounds twice.
    options = {} if is_wrap_triton_enabled() else {"enable_fp_fusion": False}
    k.sample_masks_kernel[(triton.cdiv(rows * points, block),)](
        masks.contiguous(), coords.contiguous(), index, out, rows, points, height, width, num_masks,
        canvas_w, canvas_h,
        SHARED=shared, HAS_INDEX=mask_index is not None, INDEX_64=_needs_int64(masks, out), BLOCK=block,
        num_warps=TUNING.points_warps, num_stages=TUNING.num_stages, **options,
    )
    return out


def _select(k: _Launcher, logits: Tensor, coords: Tensor, keep: int) -> Tensor:
    name = "_select_uncertain_points"
    _require(logits.dim() == 3, f"{name}: logits must be [N, H, W], got shape {list(logits.shape)}")
    _require(logits.dtype in (torch.float32, torch.float64),
             f"{name}: logits must be float32 or float64, got {logits.dtype}")
    _require(coords.dtype in (torch.float32, torch.float64),
             f"{name}: coords must be float32 or float64, got {coords.dtype}")
    _require(coords.dim() == 3 and coords.shape[0] == logits.shape[0] and coords.shape[2] == 2,
             f"{name}: coords must be [N, S, 2] with N = {logits.shape[0]}, got shape {list(coords.shape)}")
    num_masks, height, width = logits.shape
    candidates = coords.shape[1]
    _require(0 <= keep <= candidates, f"{name}: k must be in [0, S] = [0, {candidates}], got {keep}")
    out = coords.new_empty((num_masks, keep, 2))
    if num_masks * keep == 0:
        return out
    if height * width == 0:
        return out.copy_(coords[:, :keep])  # every key ties (-0.0): the first k candidates, as the C++ kernel keeps
    key_bits = 64 if logits.dtype == torch.float64 else 32
    keys = torch.empty((num_masks, candidates), dtype=torch.int64 if key_bits == 64 else torch.int32,
                       device=logits.device)
    radix = TUNING.select_radix_bits
    k.select_uncertain_kernel[(num_masks,)](
        logits.contiguous(), coords.contiguous(), keys, out, candidates, keep, height, width,
        KEY_BITS=key_bits, RADIX_BITS=radix, NUM_BINS=1 << radix,
        BLOCK=min(TUNING.select_block, _pow2_at_least(candidates)),
        num_warps=TUNING.select_warps, num_stages=TUNING.num_stages,
    )
    return out


sample_masks_at_points = _define(
    "_sample_masks_at_points",
    "(Tensor masks, Tensor coords, Tensor? mask_index, SymInt canvas_h, SymInt canvas_w) -> Tensor",
    _sample_masks, _fake_sample_masks, "point_kernels",
)
select_uncertain_points = _define(
    "_select_uncertain_points", "(Tensor logits, Tensor coords, SymInt k) -> Tensor", _select, _fake_select,
    "point_kernels",
)


for _op in (sample_masks_at_points, select_uncertain_points):
    _op.register_autograd(_no_backward, setup_context=_non_differentiable)
