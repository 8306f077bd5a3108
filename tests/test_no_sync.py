# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""The GPU path of the op, the layers and the training blocks never makes the host wait for the device, apart from the
Hungarian matching's one copy of its cost matrix.

Without a GPU (CI): the code runs on *fake* CUDA tensors (``FakeTensorMode``: tensors with a device and a shape but no
data), so every branch taken is the one a GPU takes. A dispatch mode on top fails the test on every operation that
would synchronise on a real GPU: a read of a device value (``.item()``, ``int()``, ``.tolist()``, ``bool()``:
``aten._local_scalar_dense``), an operation whose output shape depends on device data (``nonzero``, boolean
indexing), a device-to-host copy other than the matcher's, and a blocking host-to-device copy (``torch.tensor(list,
device="cuda")``, ``cpu_tensor.to("cuda")``). Reads of CPU tensors are free and allowed (they return 0 here, the fake
CPU tensors having no data either). With a GPU, the same step also runs for real under
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import contextlib
import sys
import traceback

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import mpseg
import mpseg.ops.ms_deform_attn
from mpseg import _extension
from mpseg.training import matcher as matcher_module

# The module, not the function of the same name that mpseg.ops re-exports (`from mpseg.ops import ms_deform_attn`).
msda_module = sys.modules["mpseg.ops.ms_deform_attn"]

aten = torch.ops.aten

# Operations whose output shape depends on the data: on a GPU they read a count back.
_DATA_DEPENDENT = {
    aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default, aten._unique2.default,
    aten.unique_dim.default, aten.equal.default, aten.is_nonzero.default, aten.repeat_interleave.Tensor,
}


class SyncDetector(TorchDispatchMode):
    """Records every operation that would synchronise a real GPU with the host (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.violations: list[str] = []
        self.device_to_host = 0
        self.allowed_copies = 0  # device-to-host copies inside the matcher's cost_matrices

    def _flag(self, what: str) -> None:
        # Where: the innermost frame in mpseg (or the test), so that a failure names the line to fix.
        frames = [f for f in traceback.extract_stack()[:-2] if "/mpseg/" in f.filename or "/tests/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.violations.append(f"{what} at {where}")

    @staticmethod
    def _on_device(tensor) -> bool:
        return isinstance(tensor, torch.Tensor) and tensor.device.type not in ("cpu", "meta")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func is aten._local_scalar_dense.default:
            if self._on_device(args[0]):
                self._flag("read of a device value (.item() / int() / bool() / .tolist())")
            else:
                return False if args[0].dtype == torch.bool else 0  # a free read of a CPU value
        elif func in _DATA_DEPENDENT and any(self._on_device(t) for t in tensors):
            self._flag(f"{func} on a device tensor (data-dependent output)")
        elif func is aten._to_copy.default and tensors:
            target = torch.device(kwargs.get("device") or tensors[0].device)
            if self._on_device(tensors[0]) and target.type == "cpu":
                self.device_to_host += 1
            elif not self._on_device(tensors[0]) and target.type == "cuda" and not kwargs.get("non_blocking"):
                self._flag("blocking host-to-device copy (pageable memory, non_blocking=False)")
        elif func is aten.copy_.default:
            dst, src = args[0], args[1]
            if self._on_device(src) and not self._on_device(dst):
                self.device_to_host += 1
            elif self._on_device(dst) and not self._on_device(src) and not (len(args) > 2 and args[2]):
                self._flag("blocking host-to-device copy_ (non_blocking=False)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_cuda(monkeypatch):
    """Fake CUDA tensors, the compiled ops chosen as on a CUDA build, and the matcher's copies counted."""
    if not (_extension.is_loaded() or _extension.load().loaded) or not _extension.build_info().get("with_cuda"):
        # A build without CUDA would pick the reference, which reads the level sizes: choose as a CUDA build does.
        why_not = msda_module._why_not
        monkeypatch.setattr(msda_module, "_why_not", lambda device_type: {**why_not(device_type), "cuda": None})
    detector = SyncDetector()
    original = matcher_module.HungarianMatcher.cost_matrices

    def counted(self, *args, **kwargs):
        before = detector.device_to_host
        result = original(self, *args, **kwargs)
        detector.allowed_copies += detector.device_to_host - before
        return result

    monkeypatch.setattr(matcher_module.HungarianMatcher, "cost_matrices", counted)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cuda"), detector:
        yield detector


def _step_modules(num_classes: int = 3):
    pixel_decoder = mpseg.MSDeformAttnPixelDecoder(
        in_channels=[32, 32, 32, 32], strides=[4, 8, 16, 32], conv_dim=32, mask_dim=32, transformer_nheads=2,
        transformer_dim_feedforward=64, transformer_enc_layers=1,
    )
    decoder = mpseg.MaskedAttentionDecoder(
        32, num_classes, hidden_dim=32, num_queries=6, nheads=2, dim_feedforward=64, dec_layers=2, mask_dim=32,
        query_pos=False,
    )
    noiser = mpseg.MaskPilotNoiser(num_classes, hidden_dim=32, num_groups=2)
    matcher = mpseg.HungarianMatcher(num_points=16)
    criterion = mpseg.SetCriterion(num_classes, matcher, num_points=16)
    return pixel_decoder, decoder, noiser, criterion


def _training_step(modules, device: str, backward: bool = True) -> tuple[torch.Tensor, int]:
    """One MP-Former training step (forward, losses, backward) on 64x64 images; returns the loss and the number of
    matchings run (the syncs the GPU path is allowed)."""
    pixel_decoder, decoder, noiser, criterion = modules
    features = [torch.randn(2, 32, 64 // s, 64 // s, device=device) for s in (4, 8, 16, 32)]
    targets = [
        {"labels": torch.tensor([0, 2], device=device) if device == "cpu" else torch.full((2,), 1, device=device),
         "masks": torch.rand(2, 64, 64, device=device) > 0.5},
        {"labels": torch.zeros(0, dtype=torch.int64, device=device),
         "masks": torch.zeros(0, 64, 64, dtype=torch.bool, device=device)},
    ]
    mask_features, multi_scale = pixel_decoder(features)
    pilot = noiser(targets)
    outputs = decoder(multi_scale, mask_features, pilot=pilot)
    losses = criterion(outputs, targets)
    if backward:
        losses["loss"].backward()
    matchings = 1 + len(outputs["aux_outputs"])  # the matching queries of every prediction; pilots are not matched
    return losses["loss"], matchings


def test_training_step_on_fake_cuda_has_no_host_sync(monkeypatch):
    # Forward and losses. (The autograd engine needs a real CUDA device for CUDA tensors, fake or not, so the backward
    # runs in test_training_step_on_gpu_under_sync_debug_mode, on a GPU; mpseg's backward rules read no host values.)
    with fake_cuda(monkeypatch) as detector:
        modules = _step_modules()
        loss, matchings = _training_step(modules, "cuda", backward=False)
        assert loss.device.type == "cuda"
    assert detector.violations == []
    # The one allowed transfer: the cost matrix of every matching, nothing else.
    assert detector.allowed_copies == matchings
    assert detector.device_to_host == matchings


def test_op_on_fake_cuda_has_no_host_sync(monkeypatch):
    with fake_cuda(monkeypatch) as detector:
        value = torch.randn(2, 20, 2, 8)
        locations = torch.rand(2, 5, 2, 2, 3, 2)
        weights = torch.rand(2, 5, 2, 2, 3)
        # Metadata the user made on the device: checked there (queued assertion), never read back.
        shapes = ((1 - torch.arange(2)) * 2 + 2).unsqueeze(1).expand(2, 2).contiguous()  # [[4, 4], [2, 2]]
        starts = torch.arange(2) * 16  # [0, 16]
        out = mpseg.ms_deform_attn(value, shapes, starts, locations, weights)
        # The backward op itself (the autograd engine cannot run on fake CUDA tensors, see above).
        torch.ops.mpseg._ms_deform_attn_backward(torch.ones_like(out), value, shapes, starts, locations, weights)
        # Metadata of known sizes: no check at all.
        shapes, starts = mpseg.level_metadata([(4, 4), (2, 2)], "cuda")
        mpseg.ms_deform_attn(value, shapes, starts, locations, weights)
        # Point sampling with an index on the device.
        masks = torch.rand(3, 8, 8) > 0.5
        index = torch.zeros(4, dtype=torch.int64)
        mpseg.sample_masks_at_points(masks, torch.rand(4, 5, 2), mask_index=index)
    assert detector.violations == []
    assert detector.device_to_host == 0


def test_detector_catches_syncs(monkeypatch):
    # The detector itself: each of these would synchronise a GPU.
    cases = {
        "read": lambda x: int(x.sum()),
        "tolist": lambda x: x.tolist(),
        "nonzero": lambda x: x.nonzero(),
        "boolean index": lambda x: x[x > 0],
        "blocking upload": lambda x: torch.tensor([1, 2], device="cuda"),
        "download": lambda x: x.cpu(),
    }
    for name, fn in cases.items():
        with fake_cuda(monkeypatch) as detector:
            x = torch.randn(4)
            try:
                fn(x)
            except Exception:  # fake tensors cannot give data-dependent outputs either: counts as caught
                detector.violations.append("raised")
        assert detector.violations or detector.device_to_host, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs under `make gpu-check`)")
def test_training_step_on_gpu_under_sync_debug_mode(monkeypatch):
    """On a real GPU: the same step with torch.cuda.set_sync_debug_mode("error"), the matchings' copies excepted."""
    original = matcher_module.HungarianMatcher.cost_matrices

    def allowed(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return original(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    monkeypatch.setattr(matcher_module.HungarianMatcher, "cost_matrices", allowed)
    modules = [m.cuda() for m in _step_modules()]
    _training_step(modules, "cuda")  # warm-up: lazy CUDA initialisation, pinned-memory pools, kernel loading
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = _training_step(modules, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
