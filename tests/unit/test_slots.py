"""Placing caption rows into static cache slots: row-major and image-major, for a batch and for compaction."""

import pytest

from model.slots import Placement, bucket, image_major, row_major

pytestmark = pytest.mark.unit


def test_bucket_is_the_smallest_that_holds_the_count_or_the_count_itself():
    assert [bucket(n, (2, 4, 8)) for n in (1, 2, 3, 8, 9)] == [2, 2, 4, 8, 9]


def test_row_major_pads_with_copies_of_row_zero():
    placement = row_major(5, (4, 8, 16))
    assert placement.source == [0, 1, 2, 3, 4, 0, 0, 0]
    assert placement.padding == [False] * 5 + [True] * 3
    assert placement.key == 8 and placement.rows == 8


def test_image_major_groups_rows_by_image_and_pads_each_image_and_the_image_count():
    # image 0: rows 0-1, image 1: rows 2-4, image 2: row 5 -> 3 slots per image, 4 images
    placement = image_major([0, 0, 1, 1, 1, 2], image_buckets=(2, 4), per_image_buckets=(2, 3, 4))
    assert placement.key == (4, 3) and placement.rows == 12
    assert placement.source == [0, 1, 0, 2, 3, 4, 5, 5, 5, 0, 1, 0]
    assert placement.padding == [False, False, True, False, False, False, False, True, True, True, True, True]


def test_image_major_keeps_images_in_order_of_their_first_row_whatever_their_ids():
    """Compaction places the live rows of a cache: their image ids are old image slots (3 and 7)."""
    placement = image_major([3, 3, 7], image_buckets=(2,), per_image_buckets=(2,))
    assert placement.source == [0, 1, 2, 2] and placement.padding == [False, False, False, True]


def test_through_maps_sources_into_the_rows_placed():
    live = [4, 5, 9]  # the unfinished rows of a cache
    moved = row_major(len(live), (4,)).through(live)
    assert moved == Placement([4, 5, 9, 4], [False, False, False, True])
    moved = image_major([2, 2, 4], (2,), (2,)).through(live)
    assert moved.source == [4, 5, 9, 9] and moved.key == (2, 2)
