#!/usr/bin/env bash
# `make gpu-check`: on a machine with an NVIDIA GPU, build mpseg with CUDA for that GPU, run the tests on the GPU
# (every device-parametrised test's cuda variant, the sync-debug-mode test, the Triton tests on the GPU rather than the
# interpreter), then benchmark the ms_deform_attn backends and an MP-Former training step, and write one markdown
# report (build/gpu-check/report.md). Budget: under 8 minutes on one current GPU. Without a GPU it stops at once.
#
# Usage: .ci/gpu_check.sh [python]   (the Makefile passes the venv's python; `make setup` creates it)
# Environment: GPU_CHECK_NVIDIA_SMI (default nvidia-smi; tests point it elsewhere), GPU_CHECK_REPORT.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
SMI=${GPU_CHECK_NVIDIA_SMI:-nvidia-smi}
REPORT=${GPU_CHECK_REPORT:-build/gpu-check/report.md}
start=$(date +%s)
stage() { echo "== gpu-check: $1 ($(( $(date +%s) - start )) s)"; }

# 1. A GPU, and its compute capability (the one architecture to build for).
arch=$("$SMI" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')
if [[ -z "$arch" ]]; then
  echo "gpu-check: no CUDA GPU found (\`$SMI\` lists none); nothing was built or run" >&2
  exit 2
fi
stage "GPU $("$SMI" --query-gpu=name --format=csv,noheader | head -n 1), compute capability $arch"

# 2. Set up and build with CUDA for this GPU (rebuilt if the existing build lacks CUDA or this architecture).
export TORCH_CUDA_ARCH_LIST="$arch"
make setup || exit 1
if ! "$PY" -c "
import sys, torch
from mpseg import _extension as e
s = e.load(); info = e.build_info()
ok = s.loaded and info.get('with_cuda') and any(str(a).startswith('${arch/./}') for a in info.get('cuda_archs', []))
sys.exit(0 if ok else 1)"; then
  stage "rebuilding the extension with CUDA for sm_${arch/./}"
  rm -f .venv/.installed
  FORCE_CUDA=1 make setup || exit 1
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch cannot use the GPU')" || exit 1

# 3. Tests on the GPU: the cuda variants of the device-parametrised tests and the GPU-only tests (their names hold
# cuda / gpu; the Triton tests' cuda variants run compiled kernels, TRITON_INTERPRET unset). The Triton tests' cpu
# (interpreter) variants are left to `make test`: triton fixes interpreted vs compiled at its first import.
stage "tests on the GPU"
mkdir -p "$(dirname "$REPORT")"
tests_log="$(dirname "$REPORT")/tests.txt"
env -u TRITON_INTERPRET timeout 180 "$PY" -m pytest tests -k "cuda or gpu" -n 4 -q -p no:cacheprovider \
  -rfEs 2>&1 | tee "$tests_log" | tail -n 30
tests_status=${PIPESTATUS[0]}

# 4. The benchmark report (it includes the test summary).
stage "benchmarks"
timeout 240 "$PY" benchmarks/bench_ms_deform_attn.py --device cuda --report "$REPORT" --tests "$tests_log"
bench_status=$?
stage "done: report in $REPORT (tests exit $tests_status, benchmarks exit $bench_status)"
[[ $tests_status -eq 0 && $bench_status -eq 0 ]]
