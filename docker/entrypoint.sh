#!/usr/bin/env bash
# Container start script of the caption service (the image's ENTRYPOINT, behind tini).
#
#   entrypoint.sh serve      (default) make sure a model archive exists, write the TorchServe
#                            config, exec `torchserve --foreground`
#   entrypoint.sh config     print the config that `serve` would use
#   entrypoint.sh CMD ...    run CMD instead (e.g. bash)
#
# The archive: $CAPTION_MODEL_STORE/$CAPTION_MODEL_NAME.mar when the image was built with
# weights; otherwise it is built at start from $WEIGHTS (default /weights/weights.pt, e.g.
# -v /srv/weights.pt:/weights/weights.pt:ro) into $CAPTION_HOME/model-store.
#
# The config: the project's config.properties with the container's addresses, model store and
# metrics file. enable_envvars_config=true lets TorchServe's own TS_* variables override any
# property TorchServe lists (TS_DEFAULT_WORKERS_PER_MODEL, TS_NUMBER_OF_GPU, TS_JOB_QUEUE_SIZE,
# TS_TOKEN_EXPIRATION_TIME_MIN, ...). Our own variables:
#   CAPTION_INFERENCE_BIND / _PORT   (0.0.0.0 / 8080)
#   CAPTION_MANAGEMENT_BIND / _PORT  (0.0.0.0 / 8081)  token-protected; publish it only to operators
#   CAPTION_METRICS_BIND / _PORT     (0.0.0.0 / 8082)  no token: keep it on a private network
#   CAPTION_DISABLE_TOKEN_AUTH       (false) true only behind something that authenticates
#                                    (the Kubernetes manifests' proxy sidecar)
#
# Token authorization (TorchServe 0.12 default): TorchServe writes key_file.json into its
# working directory, $CAPTION_RUN_DIR (default $CAPTION_HOME/run); nothing secret is in the image.
#
# CAPTION_DRY_RUN=1 writes the config but prints the commands (archive build, torchserve)
# instead of running them: tests/unit/test_dockerfile.py runs it outside Docker.
set -euo pipefail

SRC=${CAPTION_SRC:-/opt/caption/src}
HOME_DIR=${CAPTION_HOME:-/home/model-server}
RUN_DIR=${CAPTION_RUN_DIR:-$HOME_DIR/run}
LOG_DIR=${CAPTION_LOG_DIR:-$HOME_DIR/logs}
MODEL_STORE=${CAPTION_MODEL_STORE:-/opt/caption/model-store}
RUNTIME_STORE=${CAPTION_RUNTIME_MODEL_STORE:-$HOME_DIR/model-store}
MODEL_NAME=${CAPTION_MODEL_NAME:-captioner}
MODEL_VERSION=${CAPTION_MODEL_VERSION:-1.0}
WEIGHTS=${WEIGHTS:-/weights/weights.pt}
BASE_CONFIG=${CAPTION_BASE_CONFIG:-$SRC/config.properties}
PYTHON=${CAPTION_PYTHON:-python}
DRY_RUN=${CAPTION_DRY_RUN:-0}

run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$*"
  else
    "$@"
  fi
}

log() { printf 'entrypoint: %s\n' "$*" >&2; }

ensure_archive() {
  if [[ -f "$MODEL_STORE/$MODEL_NAME.mar" ]]; then
    log "model archive $MODEL_STORE/$MODEL_NAME.mar (built into the image)"
    return
  fi
  if [[ ! -f "$WEIGHTS" ]]; then
    log "no model archive in $MODEL_STORE and no checkpoint at $WEIGHTS."
    log "Mount the checkpoint: docker run -v /path/to/weights.pt:/weights/weights.pt:ro ..."
    log "(or -e WEIGHTS=/path/inside/the/container), or build the image with weights/weights.pt."
    exit 1
  fi
  log "building $RUNTIME_STORE/$MODEL_NAME.mar from $WEIGHTS"
  run mkdir -p "$RUNTIME_STORE"
  run "$PYTHON" -m export --weights "$WEIGHTS" --output "$RUNTIME_STORE" \
      --model-name "$MODEL_NAME" --version "$MODEL_VERSION"
  MODEL_STORE=$RUNTIME_STORE
}

write_config() {
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  "$PYTHON" "$SRC/docker/render_config.py" "$BASE_CONFIG" "$RUN_DIR/config.properties" \
    "inference_address=http://${CAPTION_INFERENCE_BIND:-0.0.0.0}:${CAPTION_INFERENCE_PORT:-8080}" \
    "management_address=http://${CAPTION_MANAGEMENT_BIND:-0.0.0.0}:${CAPTION_MANAGEMENT_PORT:-8081}" \
    "metrics_address=http://${CAPTION_METRICS_BIND:-0.0.0.0}:${CAPTION_METRICS_PORT:-8082}" \
    "model_store=$MODEL_STORE" \
    "load_models=$MODEL_NAME.mar" \
    "metrics_config=$SRC/metrics.yaml" \
    "disable_token_authorization=${CAPTION_DISABLE_TOKEN_AUTH:-false}" \
    "enable_envvars_config=true"
}

serve() {
  ensure_archive
  write_config
  cd "$RUN_DIR"
  # log4j2 and the metrics log go to $LOG_DIR (ts_log.log, model_log.log, access_log.log, ...).
  export LOG_LOCATION=$LOG_DIR METRICS_LOCATION=$LOG_DIR
  log "TorchServe in $RUN_DIR (key_file.json is written here unless token authorization is off)"
  run exec torchserve --foreground --ncs --ts-config "$RUN_DIR/config.properties" \
      --model-store "$MODEL_STORE" --models "$MODEL_NAME=$MODEL_NAME.mar"
}

case "${1:-serve}" in
  serve) serve ;;
  config)
    if [[ ! -f "$MODEL_STORE/$MODEL_NAME.mar" && -f "$WEIGHTS" ]]; then MODEL_STORE=$RUNTIME_STORE; fi
    write_config
    cat "$RUN_DIR/config.properties"
    ;;
  *) exec "$@" ;;
esac
