# mpseg developer commands. Every target sets up its own virtual environment (.venv) first, so each works on a fresh
# machine: `make demo`, `make test`. The venv pins torch 2.14.1 + torchvision 0.29.1 and installs mpseg editable with
# --no-build-isolation, so the extension is compiled against the torch that runs it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=
SOURCES := $(shell find csrc -type f 2>/dev/null) setup.py pyproject.toml mpseg/_build_config.py

.PHONY: setup demo test test-sanitize bench docs clean

setup: $(VENV)/.installed

$(VENV)/.installed: $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_SPEC)
	$(PY) -m pip install -q --disable-pip-version-check "setuptools>=77" wheel ninja numpy
	$(PY) -m pip install --disable-pip-version-check --no-build-isolation -e ".[test]"
	$(PY) -m mpseg.info
	touch $@

demo: setup
	$(PY) benchmarks/bench_ms_deform_attn.py --quick

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

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
	$(SANITIZE_ENV) $(PY) -m pytest tests/test_ms_deform_attn.py -m "sanitize" -p no:cacheprovider $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/bench_ms_deform_attn.py

docs: setup
	$(PY) -m pip install -q --disable-pip-version-check -e ".[docs]" --no-build-isolation
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean:
	rm -rf build dist *.egg-info docs/_build mpseg/*.so
