#!/usr/bin/env bash
# Copyright 2026 mpseg developers. Licensed under the Apache License, Version 2.0.
#
# Install test: what a user gets from `pip install`, on the OLDEST supported torch (2.13), never touching it.
#
#   1. `make dist`'s build (sdist + wheel via `python -m build --no-isolation`, the wheel built from the sdist, so a file
#      missing from the sdist fails here) in the dev venv (torch 2.14.1), C++ only; the archives' contents and the
#      wheel's tag (cp310-abi3: one wheel for every CPython >= 3.10 and, through PyTorch's stable ABI, every torch >= 2.13).
#   2. A fresh venv holding torch 2.13.0+cpu (an older torch than the build used).
#   (a) The wheel installed into it: the extension loads prebuilt (MPSEG_EXTENSION=prebuilt, no just-in-time build),
#       `python -m mpseg.info` shows it, the op matches the pure-PyTorch reference (values and gradients), and torch is
#       the same torch as before the install.
#   (b) After `pip uninstall mpseg`, a plain `pip install <clean copy of the source tree>` (build isolation on, as a
#       user types it) into the same venv (torch 2.13.0+cpu): torch unchanged, prebuilt extension loads, op matches.
#
# MPSEG_NO_CUDA=1 throughout (the C++ build takes seconds; the CUDA sources are compiled by `make test`'s editable
# install). Each stage prints its time. Usage: .ci/install_test.sh [python of the dev venv]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${1:-${PY:-.venv/bin/python}}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
WORK=${INSTALL_TEST_DIR:-$ROOT/build/install-test}
OLD_TORCH=${OLD_TORCH:-2.13.0}  # the lower bound of pyproject.toml; 2.13.0+cpu is a local wheel here
rm -rf "$WORK"
mkdir -p "$WORK"
export MPSEG_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2}
BASE=$("$PY" -c "import sys; print(sys._base_executable)")
start=$(date +%s)
last=$start
stage() {
    local now
    now=$(date +%s)
    echo "== $1 (previous stage $((now - last)) s)"
    last=$now
}

stage "build sdist + wheel (C++ only, no isolation)"
"$PY" -m build --no-isolation --outdir "$WORK/dist" . >"$WORK/build.log" 2>&1 \
    || { tail -n 60 "$WORK/build.log"; echo "install-test: build failed (log: $WORK/build.log)"; exit 1; }

stage "check archive contents and the wheel tag"
"$PY" - "$WORK/dist" <<'EOF'
import glob, sys, tarfile, zipfile

dist = sys.argv[1]
(sdist,) = glob.glob(f"{dist}/mpseg-*.tar.gz")
(wheel,) = glob.glob(f"{dist}/mpseg-*.whl")
with tarfile.open(sdist) as tar:
    names = ["/".join(n.split("/")[1:]) for n in tar.getnames()]
with zipfile.ZipFile(wheel) as whl:
    wnames = whl.namelist()
    metadata = next(whl.read(n).decode() for n in wnames if n.endswith(".dist-info/METADATA"))
    tags = [line.split(": ", 1)[1] for n in wnames if n.endswith(".dist-info/WHEEL")
            for line in whl.read(n).decode().splitlines() if line.startswith("Tag: ")]
problems = []
for required in ("LICENSE", "README.md", "pyproject.toml", "setup.py", "csrc/mpseg.cpp", "csrc/stable_api.h",
                 "csrc/cuda_stable.h", "csrc/ms_deform_attn/ms_deform_attn.h", "csrc/ms_deform_attn/sampling.h",
                 "csrc/ms_deform_attn/cpu/ms_deform_attn_kernel.cpp",
                 "csrc/ms_deform_attn/cuda/ms_deform_attn_kernel.cu", "csrc/point_sampling/sampling.h",
                 "csrc/point_sampling/cpu/point_sampling_kernel.cpp",
                 "csrc/point_sampling/cuda/point_sampling_kernel.cu"):
    if required not in names:
        problems.append(f"sdist lacks {required}")
if "mpseg/_C.abi3.so" not in wnames:
    problems.append(f"wheel lacks the limited-API extension mpseg/_C.abi3.so: {[n for n in wnames if n.endswith('.so')]}")
for required in ("mpseg/_csrc/mpseg.cpp", "mpseg/_csrc/stable_api.h", "mpseg/_csrc/ms_deform_attn/sampling.h",
                 "mpseg/_csrc/ms_deform_attn/cuda/ms_deform_attn_kernel.cu", "mpseg/_csrc/point_sampling/sampling.h",
                 "mpseg/_csrc/point_sampling/cpu/point_sampling_kernel.cpp"):
    if required not in wnames:
        problems.append(f"wheel lacks {required} (sources for the just-in-time fallback)")
if not any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in wnames):
    problems.append("wheel lacks the LICENSE in its .dist-info")
if not (len(tags) == 1 and tags[0].startswith("cp310-abi3-")) or "-cp310-abi3-" not in wheel:
    problems.append(f"wheel is not tagged cp310-abi3-<platform>: {wheel.split('/')[-1]}, tags {tags}")
requires = sorted(line.split(": ", 1)[1] for line in metadata.splitlines()
                  if line.startswith("Requires-Dist: ") and "extra ==" not in line)
if requires != ["numpy", "scipy", "torch>=2.13"]:
    problems.append(f"unexpected required dependencies {requires}")
if problems:
    sys.exit("install-test: " + "; ".join(problems))
print(f"sdist: {sdist.split('/')[-1]} ({len(names)} files); wheel: {wheel.split('/')[-1]} ({len(wnames)} files); "
      f"requires {requires}")
EOF

# The smoke test, run from a directory outside the source tree with the fresh venv's python.
cat >"$WORK/smoke.py" <<'EOF'
import json, os, subprocess, sys
from pathlib import Path

import torch

expected_torch = os.environ["EXPECTED_TORCH"]
assert torch.__version__ == expected_torch, f"torch changed: {expected_torch} before, {torch.__version__} now"
import mpseg
from mpseg import _extension

venv = Path(sys.prefix).resolve()
where = Path(mpseg.__file__).resolve()
assert venv in where.parents, f"mpseg imported from {where}, not from {venv}"
status = _extension.load()
assert status.source == "prebuilt", f"compiled extension did not load prebuilt: {status.reason()}"
assert venv in Path(status.path).resolve().parents, f"extension loaded from {status.path}, not from {venv}"
built = _extension.build_info()
assert built["stable_abi_target"] == "2.10" and not built["with_cuda"], built
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
# The point kernel of the mask losses (SymInt arguments) against its PyTorch path, bit for bit.
from mpseg.ops import point_sampling as ps
masks = torch.rand(3, 20, 30, generator=g) > 0.5
coords = torch.rand(4, 50, 2, generator=g)
index = torch.tensor([2, 0, 1, 2])
kernel = torch.ops.mpseg._sample_masks_at_points(masks, coords, index, 24, 30)
torch.testing.assert_close(kernel, ps._sample_masks_at_points_torch(masks, coords, index, (24, 30), torch.float32),
                           rtol=0, atol=0)
# A bad input still gets the C++ check's message (exceptions cross the stable ABI as RuntimeError).
try:
    torch.ops.mpseg.ms_deform_attn(value.detach()[0], shapes, start, loc.detach(), weights.detach())
except RuntimeError as error:
    assert "value must be 4-d [B, S, M, D], got shape [60, 2, 4]" in str(error), str(error)
else:
    raise AssertionError("a 3-d value must be refused")
info = json.loads(subprocess.run([sys.executable, "-m", "mpseg.info"], capture_output=True, text=True,
                                 check=True).stdout)
assert info["extension"]["source"] == "prebuilt" and info["torch"] == expected_torch, info
print("python -m mpseg.info:", json.dumps({key: info[key] for key in ("torch", "extension", "backends")}))
print(f"smoke: mpseg {mpseg.__version__} on torch {torch.__version__} (extension built against torch "
      f"{built['torch_version']}, stable ABI {built['stable_abi_target']}); {status.path}; kernels == reference")
EOF

# A fresh venv holding the old torch (from the local wheel), and its torch version.
fresh_venv() {
    "$BASE" -m venv "$1"
    "$1/bin/python" -m pip install -q "torch==$OLD_TORCH" >"$1.log" 2>&1 || { tail -n 30 "$1.log"; exit 1; }
    "$1/bin/python" -c "import torch; print(torch.__version__)"
}
smoke() {  # venv, torch version it must still hold
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && MPSEG_EXTENSION=prebuilt EXPECTED_TORCH="$2" "$1/bin/python" "$WORK/smoke.py")
    rm -rf "$tmp"
}

stage "(a) fresh venv with torch $OLD_TORCH"
TORCH_A=$(fresh_venv "$WORK/venv-wheel")
echo "torch before: $TORCH_A"
stage "(a) pip install the wheel"
"$WORK/venv-wheel/bin/python" -m pip install -q "$WORK"/dist/mpseg-*.whl
stage "(a) smoke test"
smoke "$WORK/venv-wheel" "$TORCH_A"

# (b) reuses (a)'s venv (creating a second one costs about a minute): mpseg goes, torch and mpseg's dependencies stay.
stage "(b) pip uninstall mpseg (the venv keeps torch $OLD_TORCH)"
"$WORK/venv-wheel/bin/python" -m pip uninstall -q -y mpseg
TORCH_B=$("$WORK/venv-wheel/bin/python" -c "import torch; print(torch.__version__)")
echo "torch before: $TORCH_B"
stage "(b) plain pip install of a clean copy (build isolation)"
mkdir -p "$WORK/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
"$WORK/venv-wheel/bin/python" -m pip install "$WORK/src" >"$WORK/pip-source.log" 2>&1 \
    || { tail -n 60 "$WORK/pip-source.log"; echo "install-test: pip install . failed"; exit 1; }
grep -E "^Successfully installed" "$WORK/pip-source.log" || true
stage "(b) smoke test"
smoke "$WORK/venv-wheel" "$TORCH_B"
stage "done"
echo "install-test: OK in $(( $(date +%s) - start )) s"
