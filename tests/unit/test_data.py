"""The shipped caption dataset parses and matches data/README.md (and the shared copy)."""

import csv
import hashlib

import pytest

from tests.conftest import REPO, SHARED

pytestmark = pytest.mark.unit
ROWS = {"valid": 5000, "test": 2000}


@pytest.mark.parametrize("style", ["concise", "narrative", "descriptive"])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_caption_files(style, split):
    path = REPO / "data" / style / f"coco_{split}.csv"
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == ROWS[split]
    assert all(set(r) == {"image_id", "caption"} for r in rows)
    assert all(len(r["image_id"]) == 12 and r["image_id"].isdigit() for r in rows)
    assert all(r["caption"].strip() for r in rows)
    assert len({r["image_id"] for r in rows}) == len(rows)
    shared = SHARED / "data" / style / f"coco_{split}.csv"
    if shared.exists():  # the copy is byte-identical to the material it came from
        assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(shared.read_bytes()).digest()
