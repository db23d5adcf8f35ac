#!/usr/bin/env bash
# Image build steps of the caption service, one per Dockerfile RUN (run as root at build time):
#
#   install.sh system            apt packages (Java 17 JRE, Python 3, tini; gcc for Triton on gpu),
#                                non-root user 1000
#   install.sh torch             /opt/venv with torch for $CAPTION_VARIANT (gpu | cpu)
#   install.sh app               the project and its dependencies (pyproject.toml) into /opt/venv
#   install.sh archive WEIGHTS   the .mar built from WEIGHTS into $CAPTION_MODEL_STORE (skipped,
#                                with a note, when WEIGHTS does not exist)
#
# --dry-run (first argument) or DRY_RUN=1 prints every command instead of running it, so the
# steps can be checked outside Docker (tests/unit/test_dockerfile.py does).
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi

VARIANT=${CAPTION_VARIANT:-gpu}
SRC=${CAPTION_SRC:-/opt/caption/src}
VENV=${CAPTION_VENV:-/opt/venv}
MODEL_STORE=${CAPTION_MODEL_STORE:-/opt/caption/model-store}
MODEL_NAME=${CAPTION_MODEL_NAME:-captioner}
MODEL_VERSION=${CAPTION_MODEL_VERSION:-1.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-}
USER_NAME=model-server
USER_ID=1000

# Ubuntu 22.04 packages: Java 17 for the TorchServe frontend, Python 3.11 for the workers (the
# Python this project is tested with; the current transformers, numpy and pillow need >= 3.11,
# so the system's 3.10 would get older ones), tini as PID 1 (forwards SIGTERM to the whole
# TorchServe process group).
PYTHON=python3.11
APT_PACKAGES=(openjdk-17-jre-headless "$PYTHON" "$PYTHON-venv" ca-certificates tini)
# GPU: torch.compile's Triton kernels build their launchers with the system C compiler against
# Python's headers when a worker first compiles (handler compile_encoder / compile_decode: gpu).
if [[ "$VARIANT" == gpu ]]; then
  APT_PACKAGES+=(gcc libc6-dev "$PYTHON-dev")
fi

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

step_system() {
  run apt-get update
  run apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
  run apt-get clean
  run bash -c "rm -rf /var/lib/apt/lists/*"
  if [[ "$DRY_RUN" == 1 ]] || ! getent passwd "$USER_ID" >/dev/null; then
    run groupadd --gid "$USER_ID" "$USER_NAME"
    run useradd --uid "$USER_ID" --gid "$USER_ID" --create-home --shell /bin/bash "$USER_NAME"
  fi
  # Writable at run time: TorchServe's working directory (key_file.json), its logs, a model
  # store for archives built at start, and torch.compile's cache (TORCHINDUCTOR_CACHE_DIR:
  # mount a volume there to keep it across containers). Everything else stays root-owned.
  run install -d -o "$USER_ID" -g "$USER_ID" /home/$USER_NAME/run /home/$USER_NAME/logs /home/$USER_NAME/model-store \
    /home/$USER_NAME/.cache /home/$USER_NAME/.cache/torchinductor
  run install -d "$MODEL_STORE"
}

step_torch() {
  local index=()
  case "$VARIANT" in
    gpu) [[ -n "$TORCH_INDEX_URL" ]] && index=(--index-url "$TORCH_INDEX_URL") ;;
    cpu) index=(--index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}") ;;
    *) echo "install.sh: CAPTION_VARIANT must be gpu or cpu, not '$VARIANT'" >&2; exit 2 ;;
  esac
  run "$PYTHON" -m venv "$VENV"
  run "$VENV/bin/pip" install --no-cache-dir --upgrade pip
  run "$VENV/bin/pip" install --no-cache-dir "${index[@]}" "torch==$TORCH_VERSION"
}

step_app() {
  # Editable: the code runs from $SRC (root-owned, read-only for the service user), so the
  # package data next to it (weights/manifest.json, model/assets) is found where it is.
  # torch is already installed and satisfies pyproject's torch==$TORCH_VERSION pin.
  run "$VENV/bin/pip" install --no-cache-dir -e "$SRC"
  run chmod +x "$SRC/docker/entrypoint.sh" "$SRC/docker/healthcheck.py"
}

step_archive() {
  local weights=${1:?usage: install.sh archive WEIGHTS}
  if [[ ! -f "$weights" ]]; then
    echo "install.sh: no checkpoint at $weights: the image gets no model archive;" \
         "mount one at run time (-v /path/weights.pt:/weights/weights.pt:ro)" >&2
    return 0
  fi
  run "$VENV/bin/python" -m export --weights "$weights" --output "$MODEL_STORE" \
      --model-name "$MODEL_NAME" --version "$MODEL_VERSION"
  run chmod -R a+rX "$MODEL_STORE"
}

case "${1:-}" in
  system) step_system ;;
  torch) step_torch ;;
  app) step_app ;;
  archive) shift; step_archive "$@" ;;
  *) echo "usage: install.sh [--dry-run] {system|torch|app|archive WEIGHTS}" >&2; exit 2 ;;
esac
