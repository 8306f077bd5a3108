# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
"""`make gpu-check` without a GPU, and its benchmark report run on the CPU with tiny shapes.

The GPU report (benchmarks/bench_gpu_report.py) runs here with ``--device cpu --smoke``: every step of it (inputs, each
backend's error against the float64 reference, the timings, a backend that cannot run reported instead of measured,
the markdown) except the CUDA-only calls (synchronisation, peak memory) and the MP-Former training step (too slow for
CI on a CPU).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    # GPU_CHECK_NVIDIA_SMI points the script at a tool that lists no GPU (as on the CI machine, and here also where a
    # GPU is present): it must stop before building or installing anything.
    env = {**os.environ, "GPU_CHECK_NVIDIA_SMI": "false", "GPU_CHECK_REPORT": str(tmp_path / "report.md")}
    result = subprocess.run(["bash", str(ROOT / ".ci" / "gpu_check.sh"), sys.executable], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "no CUDA GPU found" in result.stderr
    assert not (tmp_path / "report.md").exists()


def test_makefile_has_gpu_check_target():
    makefile = (ROOT / "Makefile").read_text()
    assert "\ngpu-check:\n\t.ci/gpu_check.sh $(PY)\n" in makefile


@pytest.fixture
def gpu_report(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_gpu_report

    return bench_gpu_report


def test_gpu_report_smoke_on_cpu(gpu_report, tmp_path):
    # --skip-training: the training step costs ~20 s of CPU even with tiny shapes (not run in CI; gpu-check runs it).
    report = gpu_report.main(["--device", "cpu", "--smoke", "--report", str(tmp_path / "r.md"), "--max-time", "0.001",
                              "--skip-training"])
    text = report.read_text()
    assert text.startswith("# mpseg GPU check")
    assert "Automatic backend of `mpseg.ms_deform_attn` for cpu tensors: **cpu**" in text
    rows = {line.split(" | ")[2]: line for line in text.splitlines() if line.startswith("| smoke 16x16")}
    assert set(rows) == {"cuda", "triton", "reference"}
    assert "not measured: RuntimeError" in rows["cuda"]  # CPU tensors: the CUDA backend cannot run, and says why
    assert "not measured" in rows["triton"] or "e-" in rows["triton"]  # reported, measured once it can run
    error = float(rows["reference"].rstrip(" |").split(" | ")[-1])
    assert error < 1e-5  # float32 reference against float64


def test_bench_ms_deform_attn_delegates_cuda(gpu_report, monkeypatch):
    import bench_ms_deform_attn

    calls = []
    monkeypatch.setattr(gpu_report, "main", lambda argv: calls.append(argv))
    monkeypatch.setattr(sys, "argv", ["bench_ms_deform_attn.py", "--device", "cuda", "--report", "x.md"])
    bench_ms_deform_attn.main()
    assert calls == [["--device", "cuda", "--report", "x.md"]]
