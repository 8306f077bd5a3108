# mpseg developer commands. Every target sets up its own virtual environment (.venv) first, so each works on a fresh
# machine: `make demo`, `make test`. The venv pins torch 2.14.1 + torchvision 0.29.1 and installs mpseg editable with
# --no-build-isolation, so the extension is compiled against the torch that runs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml mpseg/_build_config.py

.PHONY: setup demo test test-sanitize bench gpu-check docs doctest dist install-test clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check "setuptools>=77" wheel ninja numpy
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation -e ".[test,examples]"
	$(PY) -m mpseg.info
	touch $@

# Mask2Former vs MP-Former trained from scratch on synthetic shapes, side by side in two one-thread processes (<= 10 min
# on 2 cores after the setup). Prints mIoU / PQ / mask AP / layer consistency, writes PNGs and results.json to
# outputs/shapes_demo. Options go through DEMO_ARGS: `make demo DEMO_ARGS="--seed 1"` (another seed),
# `make demo DEMO_ARGS=--quick` (a smoke run under a minute), `make demo DEMO_ARGS="--steps 3000 --out out/long"`;
# `python examples/shapes_demo.py --help` lists them all.
DEMO_ARGS ?=
demo: setup
	$(PY) examples/shapes_demo.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest tests -n auto $(PYTEST_ARGS)

# The op tests again, against a C++-only build with AddressSanitizer + UndefinedBehaviorSanitizer (JIT-built into its
# own cache folder; the regular extension is not touched). The sanitizer runtimes must be the first libraries of the
# Python process, hence LD_PRELOAD; the first command builds (and checks) the sanitizer build, the second runs the op
# tests marked `sanitize` against it.
SANITIZE_ENV := MPSEG_SANITIZE=1 MPSEG_NO_CUDA=1 MPSEG_EXTENSION=jit MPSEG_CACHE_DIR=$(CURDIR)/build/sanitize \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)"
test-sanitize: setup
	$(SANITIZE_ENV) $(PY) -c "from mpseg import _extension as e; s = e.load(); assert s.loaded, s.reason(); \
	assert e.build_info()['sanitize'], 'not a sanitizer build'; print('mpseg: sanitizer build in', s.path)"
	$(SANITIZE_ENV) $(PY) -m pytest tests/test_ms_deform_attn.py tests/test_point_sample.py -m "sanitize" -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_ms_deform_attn.py

# On a machine with an NVIDIA GPU: builds with CUDA for that GPU, runs the tests on the GPU, benchmarks the
# ms_deform_attn backends and an MP-Former training step, and writes build/gpu-check/report.md (under 8 minutes).
# Without a GPU it stops at once with "no CUDA GPU found". No dependency on setup: the script checks the GPU first.
gpu-check:
	.ci/gpu_check.sh $(PY)

# Docs tools: the `docs` extra of pyproject.toml, installed on its own (reinstalling mpseg would recompile the kernels).
$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install -q --disable-pip-version-check $$($(PY) -c 'import tomllib; \
	print(" ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["docs"]))')
	touch $@

# HTML docs; warnings are errors. docs/_static/attention_masks.png is committed: redraw it with
# `$(PY) docs/scripts/draw_attention_masks.py` when the decoder or the noiser changes.
docs: $(VENV)/.docs-installed
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

# The examples: docstrings run by pytest in their own module's namespace (as they are written), the guides'
# testcode/doctest blocks by Sphinx.
doctest: $(VENV)/.docs-installed
	$(PY) -m pytest --doctest-modules mpseg -q -p no:cacheprovider
	$(PY) -m sphinx -W --keep-going -q -b doctest docs docs/_build/doctest

# Release archives in dist/: sdist, and a wheel built from it (CUDA kernels included when nvcc is found; MPSEG_NO_CUDA=1
# for a C++-only wheel). The wheel is tagged cp310-abi3-<platform>: PyTorch's stable ABI and CPython's limited API make
# it load on every torch >= 2.13 and every CPython >= 3.10.
$(VENV)/.build-installed: $(VENV)/.installed
	$(PY) -m pip install -q --disable-pip-version-check build
	touch $@
dist: $(VENV)/.build-installed
	rm -rf dist
	$(PY) -m build --no-isolation --outdir dist .

# The install test (.ci/install_test.sh): `make dist`'s archives (C++ only) checked, the wheel installed into a fresh
# venv holding torch 2.13.0+cpu, and a plain `pip install .` of a clean copy into another; in both, torch unchanged,
# the prebuilt extension loads and matches the reference.
install-test: $(VENV)/.build-installed
	.ci/install_test.sh $(PY)

clean:
	rm -rf build dist *.egg-info docs/_build mpseg/*.so
