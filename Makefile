SHELL := /bin/bash
# make test  : set up .venv (torch 2.14.1 from local disk, test deps), build, run the whole suite.
# make bench : same set-up and build, then `python -m trous.bench`.
# Both are re-runnable: the venv and the ninja build directory are reused.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
export CUDA_HOME ?= $(if $(wildcard /usr/local/cuda/bin/nvcc),/usr/local/cuda,)
export MAX_JOBS ?= 2

.PHONY: all venv build test bench wheel info clean

all: build

$(VENV)/.deps-stamp: Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(PIP) install --quiet --disable-pip-version-check numpy pytest ninja pybind11 setuptools wheel matplotlib tqdm
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

bench: build
	$(PY) -m trous.bench

info: build
	$(PY) -m trous.info

# A wheel for TORCH_CUDA_ARCH_LIST (e.g. "9.0"), built against the installed torch.
wheel: venv
	$(PIP) wheel . --no-build-isolation --no-deps -w dist

clean:
	rm -rf build dist python/trous/_C*.so python/trous/_build_info.json
