# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021): dispatch, input checks and registrations.

Four backends compute the same function: the C++ CPU kernel (``"cpu"``), the CUDA kernel (``"cuda"``), both in
``mpseg._C`` and sharing one definition of the per-sample arithmetic (``csrc/ms_deform_attn/sampling.h``), the Triton
kernels (``"triton"``, :mod:`mpseg.ops._triton`; GPU tensors, or CPU tensors under ``TRITON_INTERPRET=1``), and the
pure-PyTorch :func:`~mpseg.ms_deform_attn_reference` (``"reference"``). The choice is automatic (the kernel of the
inputs' device, else the reference with a one-time warning; Triton only when asked for), or forced with ``backend=``,
``MPSEG_MSDA_BACKEND`` or :func:`use_backend`. A forced backend that cannot run raises an error listing why each
backend can or cannot run.

The compiled op is a real custom op (``torch.ops.mpseg.ms_deform_attn``): its autograd, fake-tensor and autocast rules
are registered here by :func:`_register_kernels` (called once the library is loaded), so it works with
``torch.library.opcheck`` and ``torch.compile(fullgraph=True)``, forward and backward.
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import Tensor

from .. import _config, _extension
from .._sync import check_on_device, host_to_device, reads_for_free
from .._config import use_backend
from . import _triton
from ._export import ms_deform_attn_decomposed
from ._reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "available_backends", "use_backend", "level_metadata"]

_BACKENDS = _config.MSDA_BACKENDS


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def _check_inputs(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor]:
    """Checks shapes, dtypes and devices (no data read); returns the level metadata as int64."""
    names = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")
    args = (value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    for name, arg in zip(names, args):
        if not isinstance(arg, Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor, got {type(arg).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be 4-d [B, S, M, D], got shape {_shape(value)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be 6-d [B, Q, M, L, P, 2], got shape {_shape(sampling_locations)}"
        )
    if attention_weights.dim() != 5:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be 5-d [B, Q, M, L, P], got shape {_shape(attention_weights)}"
        )
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be [L, 2] (H, W), got shape {_shape(spatial_shapes)}")
    if level_start_index.dim() != 1:
        raise ValueError(f"ms_deform_attn: level_start_index must be 1-d [L], got shape {_shape(level_start_index)}")
    if not value.is_floating_point():
        raise TypeError(f"ms_deform_attn: value must be a floating-point tensor, got {value.dtype}")
    for name, arg in (("sampling_locations", sampling_locations), ("attention_weights", attention_weights)):
        if arg.dtype != value.dtype:
            raise TypeError(f"ms_deform_attn: {name} must have value's dtype {value.dtype}, got {arg.dtype}")
    for name, arg in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if arg.is_floating_point() or arg.is_complex() or arg.dtype == torch.bool:
            raise TypeError(f"ms_deform_attn: {name} must be an integer tensor (int64), got {arg.dtype}")
    for name, arg in zip(names[1:], args[1:]):
        if arg.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} must be on value's device {value.device}, got {arg.device}")
    batch, _, heads, _ = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    expected = (batch, queries, heads, levels, points, 2)
    if _shape(sampling_locations) != expected:
        raise ValueError(
            f"ms_deform_attn: sampling_locations must be [B, Q, M, L, P, 2] = {expected} (B and M of value), "
            f"got {_shape(sampling_locations)}"
        )
    if _shape(attention_weights) != expected[:-1]:
        raise ValueError(
            f"ms_deform_attn: attention_weights must be [B, Q, M, L, P] = {expected[:-1]}, got {_shape(attention_weights)}"
        )
    if spatial_shapes.shape[0] != levels:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must have L = {levels} rows (the L of sampling_locations), "
            f"got {spatial_shapes.shape[0]}"
        )
    if level_start_index.shape[0] != levels:
        raise ValueError(
            f"ms_deform_attn: level_start_index must have L = {levels} entries, got {level_start_index.shape[0]}"
        )
    return spatial_shapes.long(), level_start_index.long()


def _check_levels(spatial_shapes: Tensor, level_start_index: Tensor, rows: int) -> None:
    """Checks the level metadata against value's S rows, without a host sync (see :func:`_check_levels_on_device`).

    CPU metadata is read on the host (free, with a detailed message); metadata on a GPU is checked there, queued, never
    read back. Either way the pair is then remembered (while neither tensor is modified in place), so the encoder's
    layers, which all pass the same tensors, check them once per forward; :func:`level_metadata` makes pairs that
    need no check at all.
    """
    if spatial_shapes.device.type == "meta" or _levels_checked(spatial_shapes, level_start_index, rows):
        return
    if reads_for_free(spatial_shapes):
        _check_levels_host(spatial_shapes, level_start_index, rows)
    else:
        _check_levels_on_device(spatial_shapes, level_start_index, rows)
    _mark_levels_checked(spatial_shapes, level_start_index, rows)


def _levels_checked(spatial_shapes: Tensor, level_start_index: Tensor, rows: int) -> bool:
    mark = getattr(spatial_shapes, "_mpseg_levels_checked", None)
    return (
        mark is not None
        and mark[0] == rows
        and mark[1] == spatial_shapes._version
        and mark[2]() is level_start_index
        and mark[3] == level_start_index._version
    )


def _mark_levels_checked(spatial_shapes: Tensor, level_start_index: Tensor, rows: int) -> None:
    # On the tensor itself (no global registry to leak): the pair, its row count and both in-place versions.
    spatial_shapes._mpseg_levels_checked = (
        rows, spatial_shapes._version, weakref.ref(level_start_index), level_start_index._version
    )


def _check_levels_on_device(spatial_shapes: Tensor, level_start_index: Tensor, rows: int) -> None:
    """The checks of :func:`_check_levels_host` as tensor operations on the metadata's device, reported by
    :func:`mpseg._sync.check_on_device` (a queued device-side assertion on a GPU, never a host read)."""
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    consistent = (
        (spatial_shapes > 0).all()
        & (level_start_index == sizes.cumsum(0) - sizes).all()
        & (sizes.sum() == rows)
    )
    check_on_device(
        consistent,
        f"ms_deform_attn: spatial_shapes / level_start_index do not describe value's S = {rows} rows (positive "
        "(H, W) per level, level_start_index = 0, H_0*W_0, ..., sum of H*W = S); pass the same tensors on the CPU "
        "for the failing level",
    )


def level_metadata(shapes: Sequence[tuple[int, int]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """``spatial_shapes`` and ``level_start_index`` for levels of known sizes, made without a host sync.

    The sizes are Python ints, checked on the host; the tensors are cached per (sizes, device) and marked as checked,
    so a model that calls :func:`ms_deform_attn` with them never synchronises with the device for the level checks
    (the pixel decoder does this every forward).

    Args:
        shapes (sequence of (int, int)): ``(H_l, W_l)`` of each level, all positive.
        device (torch.device or str): where the tensors live.

    Returns:
        tuple[Tensor[L, 2], Tensor[L]]: int64 ``spatial_shapes`` and ``level_start_index``. Do not modify them in
        place (they are shared; a modified pair is checked again, and fails).

    Example:
        >>> import mpseg
        >>> shapes, starts = mpseg.level_metadata([(8, 8), (4, 4)], "cpu")
        >>> shapes.tolist(), starts.tolist()
        ([[8, 8], [4, 4]], [0, 64])
    """
    key = (tuple((int(h), int(w)) for h, w in shapes), torch.device(device))
    if torch.compiler.is_compiling():
        return _make_level_metadata(*key)  # constants of the graph; the cache is eager-mode bookkeeping
    rows = sum(h * w for h, w in key[0])
    cached = _LEVEL_METADATA.get(key)
    if cached is None or not _levels_checked(*cached, rows):
        cached = _make_level_metadata(*key)
        _mark_levels_checked(*cached, rows)
        if type(cached[0]) is Tensor:  # not the data-less tensors of a FakeTensorMode (tracing, tests)
            _LEVEL_METADATA[key] = cached
    return cached


_LEVEL_METADATA: dict[tuple, tuple[Tensor, Tensor]] = {}


def _make_level_metadata(shapes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[Tensor, Tensor]:
    if not shapes or any(h <= 0 or w <= 0 for h, w in shapes):
        raise ValueError(f"level_metadata: shapes must be one or more positive (H, W) pairs, got {list(shapes)}")
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    # device="cpu" explicitly: under torch.set_default_device("cuda") torch.tensor(list) would be a blocking upload.
    return (
        host_to_device(torch.tensor(shapes, dtype=torch.int64, device="cpu"), device),
        host_to_device(torch.tensor(starts, dtype=torch.int64, device="cpu"), device),
    )


def _check_levels_host(spatial_shapes: Tensor, level_start_index: Tensor, rows: int) -> None:
    """The level checks on CPU metadata, with a message naming the failing level."""
    levels = spatial_shapes.shape[0]
    data = torch.cat([spatial_shapes.reshape(-1), level_start_index]).tolist()
    shapes, starts = data[: 2 * levels], data[2 * levels :]
    total = 0
    for level in range(levels):
        height, width = shapes[2 * level], shapes[2 * level + 1]
        if height <= 0 or width <= 0:
            raise ValueError(
                f"ms_deform_attn: spatial_shapes[{level}] must be positive (H, W), got ({height}, {width})"
            )
        if starts[level] != total:
            raise ValueError(
                f"ms_deform_attn: level_start_index[{level}] must be {total} (sum of H*W of the earlier levels), "
                f"got {starts[level]}; level_start_index = {starts}"
            )
        total += height * width
    if total != rows:
        raise ValueError(
            f"ms_deform_attn: spatial_shapes must add up to value's S = {rows} rows (sum of H*W), got {total} from "
            f"{[tuple(shapes[i : i + 2]) for i in range(0, 2 * levels, 2)]}"
        )


def _why_not(device_type: str) -> dict[str, str | None]:
    """For each backend, ``None`` if it can run on tensors of ``device_type``, else the reason it cannot."""
    status = _extension.load()
    compiled = None if status.loaded else f"compiled ops not loaded ({status.reason()})"
    reasons: dict[str, str | None] = {}
    reasons["cpu"] = compiled or (None if device_type == "cpu" else f"inputs are on {device_type}, not cpu")
    cuda = compiled
    if cuda is None and not _extension.build_info().get("with_cuda", False):
        cuda = "mpseg._C was built without CUDA"
    if cuda is None and device_type != "cuda":
        cuda = f"inputs are on {device_type}, not cuda"
    reasons["cuda"] = cuda
    reasons["triton"] = _triton.why_not(device_type)
    reasons["reference"] = None
    return reasons


def _resolve_backend(requested: str | None, device_type: str) -> str:
    # Under torch.compile this runs once at trace time and its result is a constant of the graph (see the marking
    # below), so the extension loading and bookkeeping here never need to be traced. `requested` is read by the traced
    # caller (from the argument or mpseg._config), so dynamo guards on it and a new choice recompiles.
    reasons = _why_not(device_type)
    if requested is None:
        if device_type in ("cpu", "cuda"):
            if reasons[device_type] is None:
                return device_type
            _extension.warn_fallback_once(f"ms_deform_attn on {device_type} ({reasons[device_type]})")
        return "reference"
    if reasons[requested] is not None:
        listed = "; ".join(f"{name}: {why or 'can run'}" for name, why in reasons.items())
        raise RuntimeError(f"ms_deform_attn: backend {requested!r} cannot run on {device_type} tensors. {listed}")
    if requested == "triton":
        _triton.load()  # registers torch.ops.mpseg_triton (once)
    return requested


# What torch.compiler.assume_constant_result(_resolve_backend) does, set by hand: the public decorator imports
# torch._dynamo, which would add ~2 s to `import mpseg`. tests/test_ms_deform_attn.py checks that the decorator still
# works this way.
_resolve_backend._dynamo_marked_constant = True


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends of :func:`ms_deform_attn` that can run in this process.

    Args:
        device: only backends that can run on tensors of this device (e.g. ``"cpu"``, ``"cuda:0"``); by default,
            backends that can run on some device present here.

    Returns:
        list[str]: a subset of ``["cpu", "cuda", "triton", "reference"]``.
    """
    if device is not None:
        reasons = _why_not(torch.device(device).type)
        return [name for name, why in reasons.items() if why is None]
    names = [name for name, why in _why_not("cpu").items() if why is None]
    if torch.cuda.is_available():
        on_cuda = _why_not("cuda")
        names = [name for name in _BACKENDS if name in names or on_cuda[name] is None]
    return names


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    backend: str | None = None,
) -> Tensor:
    """Multi-scale deformable attention: attention-weighted bilinear samples of multi-level values.

    For each query ``q`` and head ``m``, the output is ``sum over l, p of attention_weights[b, q, m, l, p] *
    bilinear(value of level l, head m; sampling_locations[b, q, m, l, p])``, with
    ``grid_sample(align_corners=False, padding_mode="zeros")`` semantics: location ``(x, y)`` in ``[0, 1]`` maps to
    pixel coordinate ``(x * W - 0.5, y * H - 0.5)``; samples outside the map, and NaN or infinite locations, contribute
    zero (and get zero gradient). Differentiable in ``value``, ``sampling_locations`` and ``attention_weights`` (once:
    double backward raises). float32/float64, and bfloat16/float16 with float32 accumulation. Under autocast the
    compiled op runs in float32 (as Deformable DETR's module does), returning float32.

    Args:
        value (Tensor[B, S, M, D]): per-head values of all levels, flattened level after level (``S = sum H_l*W_l``).
        spatial_shapes (Tensor[L, 2], int64): ``(H_l, W_l)`` of each level.
        level_start_index (Tensor[L], int64): first row of each level in ``S`` (``0, H_0*W_0, ...``).
        sampling_locations (Tensor[B, Q, M, L, P, 2]): normalised ``(x, y)`` sampling locations.
        attention_weights (Tensor[B, Q, M, L, P]): weight of each sample (usually softmax over ``L*P``).
        backend: ``"cpu"``, ``"cuda"``, ``"triton"``, ``"reference"``, or ``None`` for the configured default
            (``MPSEG_MSDA_BACKEND`` / :func:`use_backend`, automatic unless set).

    Returns:
        Tensor[B, Q, M * D]: heads concatenated, in value's dtype.

    Raises:
        TypeError: an argument is not a tensor or has the wrong dtype.
        ValueError: inconsistent shapes, devices, or level metadata (``spatial_shapes``, ``level_start_index``).
        RuntimeError: the requested backend cannot run here (the message says why for each backend).

    Example:
        >>> import torch, mpseg
        >>> shapes = torch.tensor([[8, 8], [4, 4]])
        >>> starts = torch.tensor([0, 64])
        >>> value = torch.randn(2, 80, 8, 32)
        >>> locations = torch.rand(2, 10, 8, 2, 4, 2)
        >>> weights = torch.rand(2, 10, 8, 2, 4).softmax(-1)
        >>> mpseg.ms_deform_attn(value, shapes, starts, locations, weights).shape
        torch.Size([2, 10, 256])
    """
    spatial_shapes, level_start_index = _check_inputs(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    if not torch.compiler.is_compiling():
        # Data-dependent checks cannot be traced (and would cost a sync per call in a compiled graph).
        _check_levels(spatial_shapes, level_start_index, value.shape[1])
    if backend is None:
        requested = _config.msda_backend()
    else:
        requested = _config._parse_backend(backend, "backend")
    choice = _resolve_backend(requested, value.device.type)
    if choice == "reference":
        if torch.compiler.is_exporting():
            # The reference needs the level sizes as Python ints, which torch.export cannot give (spatial_shapes is
            # traced there); the gather-based decomposition reads them as data, so it exports (ONNX included).
            return ms_deform_attn_decomposed(value, spatial_shapes, level_start_index, sampling_locations,
                                             attention_weights)
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if choice == "triton":
        return torch.ops.mpseg_triton.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                                     attention_weights)
    return torch.ops.mpseg.ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights)


# Registrations of the compiled op (run by mpseg._extension.load() right after the library is loaded).


def _fake_forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    batch, _, heads, channels = value.shape
    return value.new_empty((batch, sampling_locations.shape[1], heads * channels))


def _fake_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    return (
        torch.empty_like(value, memory_format=torch.contiguous_format),
        torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
        torch.empty_like(attention_weights, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    if grad_output.is_cuda:
        # The CUDA kernel sums grad_value with atomicAdd (last bits vary between runs). Reported here, not in C++: the
        # stable ABI the extension is built against has no call for it.
        torch._C._alert_not_deterministic("mpseg::_ms_deform_attn_backward (CUDA, atomicAdd into grad_value)")
    return _backward_with(torch.ops.mpseg._ms_deform_attn_backward, ctx, grad_output)


def _backward_with(backward_op, ctx, grad_output):
    """The autograd rule of a forward op whose backward op (same schema for every backend) is ``backward_op``."""
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = backward_op(
        grad_output.contiguous(), value, spatial_shapes, level_start_index, sampling_locations, attention_weights
    )
    needs = ctx.needs_input_grad
    return (
        grad_value if needs[0] else None,
        None,
        None,
        grad_locations if needs[3] else None,
        grad_weights if needs[4] else None,
    )


def _no_double_backward(ctx, *grads):
    raise RuntimeError(
        "mpseg.ms_deform_attn supports one backward pass only (double backward, e.g. gradient penalties through "
        "this op, is not implemented); use backend='reference' for higher-order gradients"
    )


def _register_kernels() -> None:
    """Registers fake-tensor, autograd and autocast rules of ``torch.ops.mpseg.ms_deform_attn`` (called once, by
    :func:`mpseg._extension.load`)."""
    torch.library.register_fake("mpseg::ms_deform_attn")(_fake_forward)
    torch.library.register_fake("mpseg::_ms_deform_attn_backward")(_fake_backward)
    torch.library.register_autograd("mpseg::ms_deform_attn", _backward, setup_context=_setup_context)
    torch.library.register_autograd("mpseg::_ms_deform_attn_backward", _no_double_backward)
    # Deformable DETR's module casts to float32 around the kernel: bilinear weights and sums over L*P samples lose
    # too much in half precision. Autocast does the same here, so mixed-precision models get float32 attention.
    for device_type in ("cpu", "cuda"):
        torch.library.register_autocast("mpseg::ms_deform_attn", device_type, torch.float32)
