# Builds a trous wheel with CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST, against torch==2.14.1.
#
#   docker build -t trous-wheel .                                   # wheel in /dist of the image
#   docker build --target wheel --output type=local,dest=dist .     # wheel copied to ./dist
#   docker build --build-arg TORCH_CUDA_ARCH_LIST="9.0" ...         # one target GPU (H100)
#
# The wheel requires the torch it was built against exactly (Requires-Dist: torch==2.14.1), its version
# names torch, CUDA and archs (trous-0.1.0+torch2.14.1.cu130.sm90-...whl), and trous/_build_info.json
# records the same for `python -m trous.info` and the import check (another torch: one clear ImportError).
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ARG TORCH_VERSION=2.14.1
# CUDA 13.0 wheels of torch; the image's toolkit (nvcc) must match torch.version.cuda's major.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
ARG MAX_JOBS=8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev python3-venv python3-pip git \
 && rm -rf /var/lib/apt/lists/*

# Ubuntu 24.04's python is externally managed (PEP 668): install into a virtual environment.
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
RUN pip install --upgrade pip \
 && pip install --index-url ${TORCH_INDEX_URL} torch==${TORCH_VERSION} \
 && python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /src
# Only the sources: no host build products (.venv, build/, a host-built _C*.so) enter the image.
COPY pyproject.toml setup.py MANIFEST.in README.md ./
# The build requirements are pyproject's (torch is not among them: the build uses the one above).
RUN reqs="$(python setup.py --requirements build)" && pip install numpy ${reqs}
COPY csrc ./csrc
COPY python ./python
RUN rm -f python/trous/_C*.so python/trous/_build_info.json

# TROUS_CUDA=1 fails the build instead of silently producing a CPU-only wheel; there is no GPU here,
# so the archs come from TORCH_CUDA_ARCH_LIST (setup.py never gates CUDA on a visible GPU).
ENV CUDA_HOME=/usr/local/cuda \
    TROUS_CUDA=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    MAX_JOBS=${MAX_JOBS}
RUN mkdir -p /dist \
 && pip wheel -v . --no-build-isolation --no-deps -w /dist 2>&1 | tee /dist/build.log
# The wheel holds the extension and _build_info.json, which says CUDA kernels for exactly these archs;
# its version carries the label, it requires torch==TORCH_VERSION, and it installs and imports here.
RUN whl="$(ls /dist/trous-*.whl)" \
 && echo "built $whl" \
 && python -m zipfile -l "$whl" | grep -E "trous/_C[^/]*\.so" \
 && python -m zipfile -l "$whl" | grep "trous/_build_info.json" \
 && mkdir -p /tmp/check && cd /tmp/check && python -m zipfile -e "$whl" . \
 && cat trous/_build_info.json && grep -E "^(Version|Requires-Dist: torch)" trous-*.dist-info/METADATA \
 && python -c "import json, os; i = json.load(open('trous/_build_info.json')); \
assert i['cuda_kernels'] and i['archs'] == os.environ['TORCH_CUDA_ARCH_LIST'], i; \
assert '+torch${TORCH_VERSION}.cu' in i['version'] and i['requires'] == ['torch==${TORCH_VERSION}'], i" \
 && cd / && rm -rf /tmp/check \
 && pip install "$whl" && python -m trous.info

# `--target wheel --output type=local,dest=dist` exports just the wheel (and its build log).
FROM scratch AS wheel
COPY --from=build /dist /

FROM build
