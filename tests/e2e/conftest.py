"""Shared fixtures of the end-to-end tests: one archive of the seed-tiny checkpoint and one
real TorchServe (CPU) for the whole session, stopped at the end whatever happens."""

from __future__ import annotations

import base64
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from torchserve import REPO, TorchServe  # noqa: E402

SEED = Path("/work/shared/fixtures/seed-tiny")
if not SEED.is_dir():  # a checkout with ../shared beside it
    SEED = REPO.parent / "shared" / "fixtures" / "seed-tiny"
IMAGE_NAMES = ("chelsea.png", "coffee.png", "rocket.jpg")
STYLE_KEYS = {"concise": "Concise", "narrative": "Narrative", "descriptive": "Descriptive"}
MODEL = "captioner"


def image_bytes(name: str) -> bytes:
    return (SEED / "images" / name).read_bytes()


def image_b64(name: str) -> str:
    return base64.b64encode(image_bytes(name)).decode()


def content_type(name: str) -> str:
    return "image/png" if name.endswith(".png") else "image/jpeg"


def golden(name: str, kind: str = "greedy", styles=("concise", "narrative", "descriptive")) -> dict:
    expected = json.loads((SEED / "expected_captions.json").read_text())
    return {STYLE_KEYS[s]: [expected[name][kind][s]] for s in styles}


@pytest.fixture(scope="session")
def e2e_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def model_store(e2e_root) -> Path:
    store = e2e_root / "model-store"
    store.mkdir()
    return store


@pytest.fixture(scope="session")
def seed_archive(model_store) -> Path:
    """captioner.mar from the seed-tiny checkpoint, default (deflate) format, shipped config."""
    from export import build_archive

    result = build_archive(SEED / "weights.pt", SEED / "config.json", model_name=MODEL, output=model_store,
                           progress=lambda _line: None)
    return result.path


@pytest.fixture(scope="session")
def server(e2e_root, model_store, seed_archive):
    """TorchServe started from the shipped config.properties (ports and paths replaced); it loads
    captioner.mar at start (other archives the tests add to the store are registered by them)."""
    ts = TorchServe(e2e_root / "ts", model_store=model_store, overrides={"load_models": seed_archive.name})
    try:
        ts.start()
        ts.wait_model_ready(MODEL)
        yield ts
    finally:
        ts.stop()
        assert not ts.stray_processes(), "processes of the test TorchServe survived stop()"
