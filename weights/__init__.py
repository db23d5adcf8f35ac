"""The seed model's checkpoint: where it comes from, how to check it, how to fake it.

``weights/manifest.json`` is the single source of truth for the official ``weights.pt``:
its size and sha256 (``original_file``), its dtype, its parameter count and every state
dict key with its shape. Everything here reads those facts from the manifest; nothing
hard-codes them a second time.

- :mod:`weights.fetch` downloads the official file (resumable, verified, atomic).
- :mod:`weights.random_init` writes a full-size random-init checkpoint in the same format
  for smoke tests (it captions nonsense).
- ``python -m weights {fetch,verify,random}`` is the command line (see ``weights/README.md``).
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
MANIFEST_PATH = WEIGHTS_DIR / "manifest.json"

#: Git LFS media URL of the original project's ``models/weights.pt``.
DEFAULT_URL = "https://media.githubusercontent.com/media/17xr/ImageCaptionGenerator/main/models/weights.pt"
#: Environment variable that overrides :data:`DEFAULT_URL`.
URL_ENV = "CAPTION_WEIGHTS_URL"
#: Where ``fetch`` puts the official checkpoint unless told otherwise (relative to the
#: current directory, the repository root for ``make``; git ignores ``weights/*.pt``).
DEFAULT_OUTPUT = Path("weights") / "weights.pt"
#: Default name of the random-init checkpoint: never to be mistaken for the real one.
RANDOM_INIT_NAME = "random-init-weights.pt"
DEFAULT_RANDOM_OUTPUT = Path("weights") / RANDOM_INIT_NAME


@lru_cache(maxsize=None)
def load_manifest(path: str | os.PathLike[str] = MANIFEST_PATH) -> dict:
    """The parsed manifest (cached; treat it as read-only)."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def official_file() -> dict:
    """``{"name", "size_bytes", "sha256"}`` of the official checkpoint."""
    return load_manifest()["original_file"]


def default_url() -> str:
    """The download URL: ``$CAPTION_WEIGHTS_URL`` if set, else :data:`DEFAULT_URL`."""
    return os.environ.get(URL_ENV) or DEFAULT_URL


def manifest_mismatches(shapes: dict[str, tuple[int, ...]], manifest: dict | None = None) -> list[str]:
    """Differences between ``{key: shape}`` and the manifest's key list, as readable lines.

    An empty list means the same keys with the same shapes. This is a format check only;
    the model package's loader (``model.checkpoint``) does the full structural validation.
    """
    expected = {k: tuple(v) for k, v in (manifest or load_manifest())["keys"].items()}
    problems = [f"missing key {k} {list(s)}" for k, s in expected.items() if k not in shapes]
    problems += [f"unexpected key {k} {list(s)}" for k, s in shapes.items() if k not in expected]
    problems += [
        f"shape of {k}: {list(shapes[k])}, expected {list(s)}"
        for k, s in expected.items()
        if k in shapes and tuple(shapes[k]) != s
    ]
    return problems
