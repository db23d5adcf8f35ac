# The two commands a newcomer needs: `make serve` (the service) and `make test` (the suite).
#
#   make serve [WEIGHTS=path/to/weights.pt]   environment, checkpoint, archive, TorchServe (Ctrl-C stops it)
#   make test                                 the whole test suite (what .ci/run runs)
#
# The checkpoint: WEIGHTS=path, else weights/weights.pt (`make serve`, `make archive` and
# `make weights` download it there when it is missing).
# `make serve` also reads INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT, GRPC_INFERENCE_PORT,
# GRPC_MANAGEMENT_PORT (other ports than config.properties'), OMP_NUM_THREADS (CPU threads of
# the worker; default all cores but one) and ARCHIVE_FORMAT (zip-store or default): see
# scripts/serve.py. TORCH_INDEX_URL: where the environment's torch comes from, e.g.
# https://download.pytorch.org/whl/cu126 on a GPU node whose NVIDIA driver is older than 580
# (PyPI's torch 2.13.0 is built for CUDA 13.0), or https://download.pytorch.org/whl/cpu.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TORCH_INDEX_URL ?=
TORCH_PIN := $(shell sed -n 's/^ *"\(torch==[^"]*\)".*/\1/p' pyproject.toml)
# KServe's model server for tests/e2e/test_kserve.py, apart from the project's environment.
KSERVE_VENV ?= .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
WEIGHTS ?=
CHECKPOINT = $(or $(WEIGHTS),weights/weights.pt)
RANDOM_WEIGHTS = weights/random-init-weights.pt
UI_PORT ?= 8501
BENCH_ARGS ?=

.PHONY: venv serve archive weights weights-random verify-weights ui bench docker-build docker-build-cpu \
        test test-unit test-integration test-e2e test-ui clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(if $(TORCH_INDEX_URL),$(PIP) install -q '$(TORCH_PIN)' --index-url $(TORCH_INDEX_URL))
	$(PIP) install -q -e '.[test,ui]'
	touch $(STAMP)

venv: $(STAMP)

$(KSERVE_STAMP): tests/e2e/kserve-requirements.txt
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install -q -r tests/e2e/kserve-requirements.txt
	touch $(KSERVE_STAMP)

# --- The service --------------------------------------------------------------------------
serve: $(STAMP)
	$(PY) scripts/serve.py serve --weights "$(WEIGHTS)"

# model-store/captioner.mar only (rebuilt when the checkpoint or the code changed).
archive: $(STAMP)
	$(PY) scripts/serve.py archive --weights "$(WEIGHTS)"

weights: $(STAMP)
	$(PY) -m weights fetch

# A full-size RANDOM-INIT checkpoint (nonsense captions), for smoke tests without the download
# (an existing file is kept: `python -m weights random --force` replaces it).
weights-random: $(STAMP)
	@if [ -f $(RANDOM_WEIGHTS) ]; then echo "$(RANDOM_WEIGHTS) exists; kept"; \
	else $(PY) -m weights random --output $(RANDOM_WEIGHTS); fi

verify-weights: $(STAMP)
	$(PY) -m weights verify "$(CHECKPOINT)"

# The web page, against the server of `make serve` (its key file in this folder).
ui: $(STAMP)
	CAPTION_KEY_FILE=$${CAPTION_KEY_FILE:-$(CURDIR)/key_file.json} $(PY) -m streamlit run ui/app.py \
	  --server.headless true --server.address 127.0.0.1 --server.port $(UI_PORT) \
	  --browser.gatherUsageStats false --client.toolbarMode minimal --server.maxUploadSize 24

# The model benchmark (engine vs the seed's algorithm); e.g. BENCH_ARGS="--batch-sizes 1,8".
bench: $(STAMP)
	$(PY) -m bench model --weights "$(CHECKPOINT)" $(BENCH_ARGS)

docker-build:
	docker build -t caption-serve:gpu .

docker-build-cpu:
	docker build -t caption-serve:cpu --build-arg VARIANT=cpu .

# --- Tests --------------------------------------------------------------------------------
test: $(STAMP) $(KSERVE_STAMP)
	$(PY) -m pytest tests

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

test-integration: $(STAMP)
	$(PY) -m pytest tests/integration

test-e2e: $(STAMP) $(KSERVE_STAMP)
	$(PY) -m pytest tests/e2e

test-ui: $(STAMP)
	$(PY) -m pytest tests/ui

clean:
	rm -rf build model-store logs .pytest_cache
