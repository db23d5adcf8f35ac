"""The static layouts: each one's placement, compaction, warm-up shapes and cache type."""

import pytest
import torch

from model.config import PRESETS
from model.kv_cache import ImageMajorCache, KVCache
from model.layouts import LAYOUTS, STATIC_LAYOUTS, ImageMajor, RowMajor

pytestmark = pytest.mark.unit

TINY = PRESETS["seed-tiny"]


def test_layouts_by_name():
    assert STATIC_LAYOUTS == ("rows", "images")
    assert LAYOUTS["rows"] is RowMajor and LAYOUTS["images"] is ImageMajor
    assert not RowMajor.needs_symbolic_sizes and ImageMajor.needs_symbolic_sizes


def test_row_major_pads_to_a_row_bucket_and_compacts_to_a_smaller_one():
    placement = RowMajor.place([0] * 6 + [1] * 3)
    assert placement.rows == 12 and placement.key == 12 and placement.padding == [False] * 9 + [True] * 3
    cache = RowMajor.new_cache(placement.key, TINY, torch.float32, torch.device("cpu"), ())
    assert isinstance(cache, KVCache) and cache.rows == 12
    moved = RowMajor.compacted([1, 4, 10], cache)
    assert moved.source == [1, 4, 10] + [1] * 5 and moved.key == 8
    assert RowMajor.default_placement(24).source == list(range(24))
    assert RowMajor.warmup_rows(max_rows=20, max_images=99) == [8, 12, 16, 24]


def test_image_major_keeps_each_image_slots_when_compacting():
    placement = ImageMajor.place([0] * 6 + [1] * 6 + [2] * 6)
    assert placement.key == (3, 6)
    cache = ImageMajor.new_cache(placement.key, TINY, torch.float32, torch.device("cpu"), ())
    assert isinstance(cache, ImageMajorCache) and cache.rows == 18 and cache.per_image == 6
    moved = ImageMajor.compacted([0, 13, 14], cache)  # rows of images 0 and 2
    assert moved.key == (2, 6)
    assert moved.source[:6] == [0] + [0] * 5 and moved.source[6:] == [13, 14] + [13] * 4
    assert moved.padding == [False] + [True] * 5 + [False] * 2 + [True] * 4
    assert ImageMajor.default_placement(18).key == (3, 6)
    assert ImageMajor.warmup_rows(max_rows=999, max_images=4) == [12, 18, 24]
