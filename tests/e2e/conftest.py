"""Shared fixtures of the end-to-end tests: one archive of the seed-tiny checkpoint and one
real TorchServe (CPU) for the whole session, stopped at the end whatever happens."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.seed import MODEL, SEED, seed_model_config
from tests.e2e.torchserve import TorchServe


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def model_store(e2e_root) -> Path:
    store = e2e_root / "model-store"
    store.mkdir()
    return store


@pytest.fixture(scope="session")
def seed_archive(e2e_root, model_store) -> Path:
    """captioner.mar from the seed-tiny checkpoint, default (deflate) format, the shipped config
    with `cpu_dtype` pinned to the goldens' float32 (`seed_model_config`)."""
    from export import build_archive

    result = build_archive(SEED / "weights.pt", SEED / "config.json", model_name=MODEL, output=model_store,
                           model_config=seed_model_config(e2e_root / "seed-config"), progress=lambda _line: None)
    return result.path


@pytest.fixture(scope="session")
def server(e2e_root, model_store, seed_archive):
    """TorchServe started from the shipped config.properties (ports and paths replaced); it loads
    captioner.mar at start (other archives the tests add to the store are registered by them)."""
    with TorchServe(e2e_root / "ts", model_store=model_store, overrides={"load_models": seed_archive.name}) as ts:
        ts.wait_model_ready(MODEL)
        yield ts
    assert not ts.stray_processes(), "processes of the test TorchServe survived stop()"
