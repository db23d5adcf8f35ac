"""The seed-tiny fixture files the end-to-end tests send and expect (read-only shared material)."""

from __future__ import annotations

import base64
import json
import os
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# ../shared beside the checkout; CAPTION_SHARED points elsewhere (as in tests/conftest.py).
SHARED = Path(os.environ.get("CAPTION_SHARED", REPO.parent / "shared"))
SEED = SHARED / "fixtures" / "seed-tiny"
IMAGE_NAMES = ("chelsea.png", "coffee.png", "rocket.jpg")
STYLE_KEYS = {"concise": "Concise", "narrative": "Narrative", "descriptive": "Descriptive"}
MODEL = "captioner"
# The golden captions are float32's (fixtures/README.md: in bf16 a few greedy decodes diverge).
# The shipped `cpu_dtype: auto` serves bfloat16 on a CPU with native bf16, so the archives these
# tests compare with the goldens pin float32; the shipped file itself travels unchanged in the
# full-size export test.
GOLDEN_CPU_DTYPE = "float32"


def image_bytes(name: str) -> bytes:
    return (SEED / "images" / name).read_bytes()


def image_b64(name: str) -> str:
    return base64.b64encode(image_bytes(name)).decode()


def content_type(name: str) -> str:
    return "image/png" if name.endswith(".png") else "image/jpeg"


@cache
def _expected() -> dict:
    return json.loads((SEED / "expected_captions.json").read_text())


def golden(name: str, kind: str = "greedy", styles=("concise", "narrative", "descriptive")) -> dict:
    """The response the API must give for a greedy request (num_captions 1)."""
    return {STYLE_KEYS[s]: [_expected()[name][kind][s]] for s in styles}


def seed_model_config(folder: Path, handler_settings: dict | None = None, **top_level) -> Path:
    """`folder`/model-config.yaml: the shipped one with `cpu_dtype` pinned to the goldens' dtype,
    plus the `handler:` settings and top-level keys given (e.g. ``responseTimeout=5``)."""
    import yaml

    config = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    config["handler"].update(cpu_dtype=GOLDEN_CPU_DTYPE, **(handler_settings or {}))
    config.update(top_level)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model-config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
