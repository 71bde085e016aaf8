SHELL := /bin/bash
# make test  : set up .venv (torch 2.14.1 from local disk, test deps), build, run the whole suite.
# make bench : same set-up and build, then `python -m trous.bench`.
# make lint  : ruff and clang-format checks (run by .ci/run before the tests).
# Both are re-runnable: the venv and the ninja build directory are reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: all venv build test bench wheel info lint format clean

all: build

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install --quiet --disable-pip-version-check numpy pytest ninja pybind11 setuptools wheel matplotlib tqdm
	# Linters of `make lint`, pinned so that every machine formats alike.
	$(PIP) install --quiet --disable-pip-version-check ruff==0.17.6 clang-format==23.1.5
	# The dcls package is the drop-in peer; tests skip with a message if it cannot be installed.
	-$(PIP) install --quiet --disable-pip-version-check --no-deps dcls==0.1.1
	touch $@

venv: $(VENV)/.deps-stamp

# The -Xptxas -v register / shared-memory report of every CUDA kernel is kept in build/build.log.
build: venv
	mkdir -p build
	$(PY) setup.py build_ext --inplace 2>&1 | tee build/build.log; test $${PIPESTATUS[0]} -eq 0
	$(PY) -c "import sys, site; open(site.getsitepackages()[0] + '/trous-src.pth', 'w').write('$(CURDIR)/python\n')"

test: build
	$(PY) -m pytest tests -q

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

# A wheel for TORCH_CUDA_ARCH_LIST (e.g. "9.0"), built against the installed torch.
wheel: venv
	$(PIP) wheel . --no-build-isolation --no-deps -w dist

clean:
	rm -rf build dist python/trous/_C*.so python/trous/_build_info.json
