# Two images from one file, each installing only its own pinned requirements
# (requirements/<image>.txt, generated from the package extras by tools/image_requirements.py):
#   docker build --target operator -t ndif-operator:0.1.0 .
#       The Kopf operator: no torch, no ray; non-root; entrypoint `ndif-operator run`.
#   docker build --target runtime -t ndif-runtime:0.1.0 .                        # GPU nodes (CUDA torch)
#   docker build --target runtime --build-arg TORCH_VARIANT=cpu -t ndif-runtime:0.1.0-cpu .
#       What KubeRay (v1.7) runs as the head and the workers of the RayService: Python 3.11 and
#       Ray 2.60.0 (= the RayService's rayVersion), nnsight, transformers, model_runtime; `bash`
#       and `wget` for the exec probes KubeRay injects into worker containers; user 1000.
# `make lint` runs hadolint on this file; tests/images checks the copied paths and the pins.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: one wheel of this package (no dependencies), shared by both images -------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ndif_operator ./ndif_operator
COPY model_runtime ./model_runtime
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- operator ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 NDIF_LOG_FORMAT=json
COPY requirements/operator.txt /tmp/requirements.txt
COPY --from=build /wheels /tmp/wheels
RUN pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/requirements.txt \
 && python -c "import sys, ndif_operator.operator.handlers; assert not {'torch', 'ray'} & set(sys.modules)"
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["ndif-operator"]
CMD ["run"]

# --- runtime (KubeRay head and workers) -----------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# gpu: PyPI's Linux torch wheel (CUDA, with its nvidia-* runtime wheels); cpu: PyTorch's CPU index.
ARG TORCH_VARIANT=gpu
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 NDIF_LOG_FORMAT=json \
    OMP_NUM_THREADS=1 RAY_USAGE_STATS_ENABLED=0 HOME=/home/ray
# KubeRay's worker probes run `bash -c "wget ... | grep success"`; ray needs no other system package.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 1000 --create-home --home-dir /home/ray --shell /bin/bash ray
COPY requirements/runtime.txt /tmp/requirements.txt
COPY --from=build /wheels /tmp/wheels
RUN if [ "$TORCH_VARIANT" = cpu ]; then \
      pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0; \
    fi \
 && pip install --no-cache-dir -r /tmp/requirements.txt \
 && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/requirements.txt \
 && python -c "import ray, torch, nnsight, model_runtime.gateway.app; assert ray.__version__ == '2.60.0'"
# The sandbox's write guard as dispatcher kernels, compiled against this image's torch; the
# compiler leaves with the layer. The check fails the build if the replica would fall back.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ ninja-build \
 && python -m model_runtime.sandbox.native.build \
 && apt-get purge -y --auto-remove g++ ninja-build \
 && rm -rf /var/lib/apt/lists/* \
 && python -c "from model_runtime.sandbox import native_guard as n; assert n.load(), n.failure()"
USER 1000:1000
WORKDIR /home/ray
