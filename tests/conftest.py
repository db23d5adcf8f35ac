"""Shared test fixtures: where the golden fixtures live, and a float32 engine on the tiny seed model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout; CAPTION_SHARED points elsewhere (e.g. a copy on a GPU box).
SHARED = Path(os.environ.get("CAPTION_SHARED", REPO.parent / "shared"))
SEED_TINY = SHARED / "fixtures" / "seed-tiny"
PREPROCESS = SHARED / "fixtures" / "preprocess"


@pytest.fixture(scope="session")
def golden() -> dict:
    return torch.load(SEED_TINY / "golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def expected_captions() -> dict:
    return json.loads((SEED_TINY / "expected_captions.json").read_text())


@pytest.fixture(scope="session")
def tiny_engine():
    from model.engine import CaptionEngine

    return CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json")


@pytest.fixture(scope="session")
def plain_tiny_engine():
    """With plain `nn.Linear`s (no oneDNN packing): copyable, castable to float64, compilable."""
    from model.engine import CaptionEngine

    return CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", prepack=False)


@pytest.fixture(scope="session")
def golden_pixels(golden) -> tuple[list[str], torch.Tensor]:
    names = list(golden["images"])
    return names, torch.stack([golden["images"][n]["pixel_values"] for n in names])
