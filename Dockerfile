# syntax=docker/dockerfile:1.7
# Caption service image: TorchServe 0.12 serving the seed caption model (GPU by default).
#
#   python -m weights fetch                          # puts weights/weights.pt in the context
#   docker build -t caption-serve:gpu .              # CUDA image, archive built from it
#   docker build -t caption-serve:cpu --build-arg VARIANT=cpu .
#   docker run --gpus all -p 8080:8080 -p 127.0.0.1:8081:8081 -p 127.0.0.1:8082:8082 caption-serve:gpu
#
# Weights: if the build context has weights/weights.pt (or the file WEIGHTS_FILE names, relative
# to weights/), the model archive is built into the image. It is read through a build-time bind
# mount, so the raw checkpoint never becomes a layer of its own. Otherwise the image has no
# archive and builds it at start from a checkpoint mounted at /weights/weights.pt (or
# -e WEIGHTS=/path/inside/container). No key, token or password is baked in: TorchServe writes
# its key_file.json at start into /home/model-server/run.
#
# Ports (see docs/operations.md):
#   8080  inference API   /predictions/captioner, /ping       (inference key)
#   8081  management API  /models, /token                     (management key / API key)
#   8082  metrics         /metrics, Prometheus text format    (no token)
#
# The install and start steps live in docker/*.sh so they can be read, linted and dry-run
# outside Docker (tests/unit/test_dockerfile.py).

ARG VARIANT=gpu
# The CUDA runtime of the GPU variant. PyPI's torch 2.13.0 wheel brings its own CUDA 13.0
# libraries (cuBLAS, cuDNN, NCCL); the base image provides the matching CUDA runtime and the
# NVIDIA container-toolkit settings. The host driver must support CUDA 13.0 (>= 580).
ARG GPU_BASE_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu22.04
ARG CPU_BASE_IMAGE=ubuntu:22.04

FROM ${GPU_BASE_IMAGE} AS base-gpu
FROM ${CPU_BASE_IMAGE} AS base-cpu

# base-gpu or base-cpu: a stage above, tagged there (hadolint cannot see through the ARG).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
# Optional: another torch wheel index (e.g. https://download.pytorch.org/whl/cu126 for older
# drivers). Empty: PyPI for gpu, the CPU wheel index for cpu.
ARG TORCH_INDEX_URL=""
ARG MODEL_NAME=captioner
ARG MODEL_VERSION=1.0
ARG WEIGHTS_FILE=weights.pt

LABEL org.opencontainers.image.title="caption-serve" \
      org.opencontainers.image.description="TorchServe 0.12 serving a DINOv3 + Qwen3-style image captioning model" \
      org.opencontainers.image.licenses="MIT"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPTION_VARIANT=${VARIANT} \
    CAPTION_SRC=/opt/caption/src \
    CAPTION_HOME=/home/model-server \
    CAPTION_MODEL_STORE=/opt/caption/model-store \
    CAPTION_MODEL_NAME=${MODEL_NAME} \
    CAPTION_MODEL_VERSION=${MODEL_VERSION} \
    HF_HOME=/tmp/hf-home \
    TORCHINDUCTOR_CACHE_DIR=/home/model-server/.cache/torchinductor \
    PATH=/opt/venv/bin:${PATH}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# 1. System packages (Java 17, Python, tini) and the non-root user: changes rarely.
COPY docker/install.sh /opt/caption/src/docker/install.sh
RUN bash /opt/caption/src/docker/install.sh system

# 2. torch (the big layer): depends only on the variant and the torch index. Kept apart from
#    step 1 on purpose so that each is cached on its own.
# hadolint ignore=DL3059
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash /opt/caption/src/docker/install.sh torch

# 3. The project and its other dependencies.
COPY pyproject.toml config.properties metrics.yaml /opt/caption/src/
COPY model/ /opt/caption/src/model/
COPY handler/ /opt/caption/src/handler/
COPY export/ /opt/caption/src/export/
COPY weights/__init__.py weights/__main__.py weights/fetch.py weights/random_init.py weights/manifest.json /opt/caption/src/weights/
COPY docker/ /opt/caption/src/docker/
RUN bash /opt/caption/src/docker/install.sh app

# 4. The model archive, from weights/$WEIGHTS_FILE when the build context has it. A layer of
#    its own so that new weights rebuild only this step.
RUN --mount=type=bind,source=weights,target=/tmp/build-weights \
    bash /opt/caption/src/docker/install.sh archive "/tmp/build-weights/${WEIGHTS_FILE}"

USER 1000:1000
WORKDIR /home/model-server

EXPOSE 8080 8081 8082

# /ping on the inference port with the inference key from key_file.json (token authorization
# covers /ping in TorchServe 0.12); healthy once the model's workers are up.
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "/opt/caption/src/docker/healthcheck.py"]

ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/opt/caption/src/docker/entrypoint.sh"]
CMD ["serve"]
