#!/usr/bin/env bash
# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
#
# Release smoke test: build the sdist and the wheel as a release would (`python -m build --no-isolation`, the wheel
# built from the sdist, so a file missing from the sdist fails here), check what they contain, install the wheel into
# a fresh virtual environment and use it from a directory outside the source tree.
#
# Kept cheap for CI:
# - The wheel is built C++-only (MPSEG_NO_CUDA=1, ~30 s). The CUDA kernels are compiled (and their build checked) by the
#   editable install that `make test` does; compiling them a second time here would cost 2-4 minutes and test nothing
#   that the packaging could break.
# - The fresh venv does not download torch: a .pth file puts the build venv's site-packages (torch, numpy, ...) after
#   the fresh venv's own site-packages. The editable mpseg of the build venv is not activated through that path (its
#   .pth hook only runs for site directories), and the test asserts that mpseg is imported from the wheel.
#
# Usage: .ci/smoke_wheel.sh [python of a venv with torch, setuptools, wheel, ninja, build]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-${PY:-.venv/bin/python}}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WORK=${SMOKE_DIR:-$ROOT/build/smoke-wheel}
rm -rf "$WORK"
mkdir -p "$WORK"

t0=$(date +%s)
echo "== build sdist + wheel (C++ only)"
MPSEG_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} "$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 \
    || { tail -n 60 "$WORK/build.log"; echo "smoke-wheel: build failed (log: $WORK/build.log)"; exit 1; }
t1=$(date +%s)

echo "== check archive contents"
"$PY" - "$WORK/dist" <<'EOF'
import glob, sys, tarfile, zipfile

dist = sys.argv[1]
(sdist,) = glob.glob(f"{dist}/mpseg-*.tar.gz")
(wheel,) = glob.glob(f"{dist}/mpseg-*.whl")
with tarfile.open(sdist) as tar:
    names = ["/".join(n.split("/")[1:]) for n in tar.getnames()]
with zipfile.ZipFile(wheel) as whl:
    wnames = whl.namelist()
problems = []
for required in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "csrc/mpseg.cpp",
                 "csrc/ms_deform_attn/ms_deform_attn.h", "csrc/ms_deform_attn/sampling.h",
                 "csrc/ms_deform_attn/cpu/ms_deform_attn_kernel.cpp",
                 "csrc/ms_deform_attn/cuda/ms_deform_attn_kernel.cu", "csrc/point_sampling/sampling.h",
                 "csrc/point_sampling/cpu/point_sampling_kernel.cpp",
                 "csrc/point_sampling/cuda/point_sampling_kernel.cu"):
    if required not in names:
        problems.append(f"sdist lacks {required}")
if not any(n.startswith("mpseg/_C") and n.endswith(".so") for n in wnames):
    problems.append("wheel lacks the compiled extension mpseg/_C*.so")
for required in ("mpseg/_csrc/mpseg.cpp", "mpseg/_csrc/ms_deform_attn/sampling.h",
                 "mpseg/_csrc/ms_deform_attn/cuda/ms_deform_attn_kernel.cu", "mpseg/_csrc/point_sampling/sampling.h",
                 "mpseg/_csrc/point_sampling/cpu/point_sampling_kernel.cpp"):
    if required not in wnames:
        problems.append(f"wheel lacks {required} (sources for the just-in-time fallback)")
if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in wnames):
    problems.append("wheel lacks the LICENSE in its .dist-info")
if problems:
    sys.exit("smoke-wheel: " + "; ".join(problems))
print(f"sdist: {sdist.split('/')[-1]} ({len(names)} files); wheel: {wheel.split('/')[-1]} ({len(wnames)} files)")
EOF

echo "== install the wheel into a fresh venv"
BASE=$("$PY" -c "import sys; print(sys._base_executable)")
"$BASE" -m venv --without-pip "$WORK/venv"
# pip of the build venv installs into the fresh one; --no-deps: the dependencies come from the build venv (below).
"$PY" -m pip --disable-pip-version-check --python "$WORK/venv/bin/python" install -q --no-deps \
    "$WORK"/dist/mpseg-*.whl
# Only now make the build venv's packages visible (after the install, so that pip never sees its editable mpseg).
SP_MAIN=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
SP_NEW=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$SP_MAIN" >"$SP_NEW/_mpseg_smoke_base.pth"
t2=$(date +%s)

echo "== smoke test (from a temp dir, prebuilt extension only)"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$TMP"
MPSEG_EXTENSION=prebuilt MPSEG_SMOKE_VENV="$WORK/venv" "$WORK/venv/bin/python" - <<'EOF'
import os
from pathlib import Path

import torch

import mpseg
from mpseg import _extension

venv = Path(os.environ["MPSEG_SMOKE_VENV"]).resolve()
where = Path(mpseg.__file__).resolve()
assert venv in where.parents, f"mpseg imported from {where}, not from the wheel installed in {venv}"
status = _extension.load()
assert status.source == "prebuilt", f"compiled extension did not load: {status.reason()}"
assert venv in Path(status.path).resolve().parents, f"extension loaded from {status.path}, not from the wheel"
assert (where.parent / "_csrc" / "mpseg.cpp").is_file(), "mpseg/_csrc missing: the JIT fallback has no sources"

# The compiled CPU kernel against the pure-PyTorch reference, values and gradients.
g = torch.Generator().manual_seed(0)
shapes = torch.tensor([[6, 8], [3, 4]])
start = torch.tensor([0, 48])
B, Q, M, D, L, P = 2, 5, 2, 4, 2, 3
value = torch.randn(B, 60, M, D, generator=g, dtype=torch.float64, requires_grad=True)
loc = (torch.rand(B, Q, M, L, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1).requires_grad_()
weights = torch.rand(B, Q, M, L, P, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()
results = {}
for backend in ("cpu", "reference"):
    out = mpseg.ms_deform_attn(value, shapes, start, loc, weights, backend=backend)
    grads = torch.autograd.grad(out.square().sum(), (value, loc, weights))
    results[backend] = (out, *grads)
for name, a, b in zip(("output", "grad value", "grad locations", "grad weights"), results["cpu"], results["reference"]):
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
# The point kernel of the mask losses against its PyTorch path (bit for bit).
from mpseg.ops import point_sampling as ps
masks = torch.rand(3, 20, 30, generator=g) > 0.5
coords = torch.rand(4, 50, 2, generator=g)
index = torch.tensor([2, 0, 1, 2])
kernel = torch.ops.mpseg._sample_masks_at_points(masks, coords, index, 24, 30)
torch.testing.assert_close(kernel, ps._sample_masks_at_points_torch(masks, coords, index, (24, 30), torch.float32),
                           rtol=0, atol=0)
print(f"smoke: mpseg {mpseg.__version__} from {where.parent}; extension {status.path}; cpu kernels == reference")
EOF
"$WORK/venv/bin/python" -m mpseg.info
t3=$(date +%s)
echo "smoke-wheel: OK (build $((t1 - t0)) s, install $((t2 - t1)) s, smoke test $((t3 - t2)) s)"
