SHELL := /bin/bash
# make test  : set up .venv (torch 2.14.1 from local disk, test deps), build, run the whole suite.
# make bench : same set-up and build, then `python -m trous.bench`.
# make fuzz  : the property suite with many examples, and the tests above 2^31 elements.
# make lint  : ruff and clang-format checks (run by .ci/run before the tests).
# Both are re-runnable: the venv and the ninja build directory are reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: all venv build test fuzz bench wheel sdist info lint format clean

all: build

# The requirements come from the package itself (`setup.py --requirements`: pyproject's build
# requirements and setup.py's extras), each install with torch==$(TORCH_VERSION) so none swaps torch.
PIPI := $(PIP) install --quiet --disable-pip-version-check
REQS := $(PY) setup.py --requirements
$(VENV)/.deps-stamp: Makefile setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIPI) torch==$(TORCH_VERSION)
	r="$$($(REQS) build test)" && $(PIPI) torch==$(TORCH_VERSION) $$(echo "$$r" | grep -v -i '^dcls')
	# The dcls package is the drop-in peer (in the test extra); tests skip with a message if it cannot be installed.
	-r="$$($(REQS) test)" && $(PIPI) --no-deps $$(echo "$$r" | grep -i '^dcls')
	# Integrations (trous[hf], trous[timm]): their tests skip with a message where these did not install.
	-r="$$($(REQS) hf timm)" && $(PIPI) torch==$(TORCH_VERSION) $$r
	# Linters of `make lint`, pinned so that every machine formats alike.
	$(PIPI) ruff==0.17.6 clang-format==23.1.5
	touch $@

venv: $(VENV)/.deps-stamp

# The -Xptxas -v register / shared-memory report of every CUDA kernel is kept in build/build.log.
build: venv
	mkdir -p build
	$(PY) setup.py build_ext --inplace 2>&1 | tee build/build.log; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import sys, site; open(site.getsitepackages()[0] + '/trous-src.pth', 'w').write('$(CURDIR)/python\n')"

# The families' SIMD kernels have scalar twins (CPUs without AVX2): the second run forces them
# (TROUS_CPU_SIMD=0) through the tests of the kernels that have SIMD paths.
SIMD_TESTS := tests/kvcache tests/dcls/test_dcls_banded.py tests/pconv/test_pconv_channel_partial.py tests/pconv/test_pconv_masked.py tests/attention/test_attention_cpu.py
test: build
	$(PY) -m pytest tests -q
	TROUS_CPU_SIMD=0 $(PY) -m pytest $(SIMD_TESTS) -q -m "not slow and not props"

# The property suite with many random examples (TROUS_FUZZ_EXAMPLES, default 1000 per test) and the
# tests above 2^31 elements (up to about 8 GB of memory each).
fuzz: build
	TROUS_HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest tests -q -m "props or slow"

# ruff (pyproject.toml) and clang-format (.clang-format) over every tracked source; `make format` applies them.
CXX_SOURCES = $(shell git ls-files 'csrc/*' 'tests/*.h' 'tests/*.cpp' 2>/dev/null)
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

format: venv
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/clang-format -i $(CXX_SOURCES)

bench: build
	$(PY) -m trous.bench

info: build
	$(PY) -m trous.info

# A wheel for TORCH_CUDA_ARCH_LIST (e.g. "9.0"), built against the installed torch: it requires that
# torch exactly and its version says torch, CUDA and archs (trous-0.1.0+torch2.14.1.cu130.sm90-...whl).
wheel: venv
	$(PIP) wheel . --no-build-isolation --no-deps -w dist
	@ls -t dist/trous-*.whl | head -1

# The sources (dist/trous-0.1.0.tar.gz): `pip install --no-build-isolation trous-0.1.0.tar.gz` builds
# them against the torch installed where it runs.
sdist: venv
	$(PY) -c "from setuptools import build_meta as b; print('dist/' + b.build_sdist('dist'))"

clean:
	rm -rf build dist python/trous/_C*.so python/trous/_build_info.json
