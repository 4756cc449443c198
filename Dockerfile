# Two images from one file, both installing from the same pinned requirements:
#   docker build --target operator -t ndif-operator:dev .   # kopf operator: no torch, no ray
#   docker build --target runtime  -t ndif-runtime:dev .    # Ray Serve replicas (KubeRay head/worker image)
# The runtime image's Ray and Python versions must match the RayService's rayVersion (2.60.0, py3.11).

FROM python:3.11-slim AS base
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY requirements.txt pyproject.toml README.md ./
COPY ndif_operator ./ndif_operator
COPY model_runtime ./model_runtime
COPY crds ./crds
RUN python -m pip install --upgrade pip

FROM base AS operator
# Only the operator's pins (the section of requirements.txt between the operator and runtime headers).
RUN sed -n '/^# --- operator ---/,/^# --- runtime ---/p' requirements.txt > /tmp/operator.txt \
 && pip install -r /tmp/operator.txt && pip install --no-deps . \
 && python -c "import sys, ndif_operator.cli; assert 'torch' not in sys.modules"
USER 65532:65532
ENTRYPOINT ["ndif-operator"]
CMD ["run"]

FROM base AS runtime
# Everything but the test tools. On GPU nodes, install the CUDA build of torch 2.13.0 instead.
RUN sed -n '1,/^# --- test ---/p' requirements.txt > /tmp/runtime.txt \
 && pip install -r /tmp/runtime.txt && pip install --no-deps .
USER 1000:1000
