# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""Moving small host data to an accelerator, and checking device data, without waiting for the device.

A GPU training step should never make the host wait for the GPU: every ``.item()``, ``int(tensor)``, ``.tolist()``,
``.cpu()`` and every blocking host-to-device copy of pageable memory (``torch.tensor(list, device="cuda")``,
``cpu_tensor.to("cuda")``) empties the launch queue. mpseg's GPU path allows itself one such copy per Hungarian
matching (the cost matrix, which SciPy solves on the CPU); everything else goes through the two helpers here.

* :func:`host_to_device` copies a CPU tensor without a stream synchronisation (pinned staging, ``non_blocking``).
* :func:`check_on_device` checks a boolean condition computed on the device: on the CPU it raises a ``ValueError``
  with the message at once (reading a CPU tensor is free); on a GPU it queues a device-side assertion
  (``torch._assert_async``), which fails the next synchronising call with a "device-side assert" error instead of
  returning wrong numbers. (Run the same call on CPU tensors, or with ``CUDA_LAUNCH_BLOCKING=1``, for the message.)

``tests/test_no_sync.py`` checks that the GPU path of the op, the layers and the training blocks uses nothing else.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["host_to_device", "check_on_device", "reads_for_free"]


def reads_for_free(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s values on the host costs no device synchronisation (a CPU tensor)."""
    return tensor.device.type == "cpu"


def host_to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor.to(device)`` without a host synchronisation for a CPU ``tensor`` and a CUDA ``device``.

    A blocking copy from pageable memory waits until the GPU has run everything queued before it. Staged through
    pinned memory and issued ``non_blocking``, the copy is ordered on the current stream instead, and PyTorch's pinned
    allocator keeps the staging buffer alive until the copy is done. Other cases are a plain ``.to``.
    """
    device = torch.device(device)
    if torch.compiler.is_compiling() or device.type == "cpu" or tensor.device.type != "cpu":
        # Compiled graphs hold such tensors as constants; pinning is eager-mode bookkeeping.
        return tensor.to(device)
    if device.type == "cuda" and torch.cuda.is_available() and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def check_on_device(condition: Tensor, message: str) -> None:
    """Fails when the 0-d bool ``condition`` is False, without reading it back from a GPU.

    Args:
        condition (Tensor[], bool): computed on the device of the data it checks.
        message (str): the error's text (shown at once on the CPU; see the module docstring for GPUs).

    Raises:
        ValueError: on the CPU, when ``condition`` is False.
    """
    if reads_for_free(condition):
        if not bool(condition):
            raise ValueError(message)
        return
    torch._assert_async(condition, message)
