"""The two layouts of the static (CUDA-graph) decode cache, each in one place: where a batch's
rows sit, where the live rows move when finished ones are dropped, which cache holds them, and
which shapes warm-up records.

- `RowMajor` ("rows"): `KVCache`, every row with its own copy of its image's prefix, in row
  buckets.
- `ImageMajor` ("images"): `ImageMajorCache`, each image's prefix stored once and its rows in
  consecutive slots, in (image bucket, slots-per-image bucket) shapes. Too many shapes to
  compile one by one: compiled, it needs symbolic sizes.

The engine picks one by name (`LAYOUTS[static_layout]`) and asks it; placement itself is
`model/slots.py`.
"""

from __future__ import annotations

import torch

from .config import CaptionConfig
from .kv_cache import ImageMajorCache, KVCache
from .slots import Placement, bucket, image_major, in_order, row_major

# Row counts of the row-major caches: powers of two and 1.5x them, so that batches of whole
# default requests (six captions per image, 2**k images) fill a bucket exactly.
STATIC_ROW_BUCKETS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768)
DEFAULT_ROWS_PER_IMAGE = 6  # three styles x two captions
# Image-major caches: image counts and slots per image, the same scheme from 2 (a symbolic size
# of 1 would be specialised into a graph of its own). Slots reach 24: three styles x
# `Limits.max_num_captions`.
STATIC_IMAGE_BUCKETS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
STATIC_PER_IMAGE_BUCKETS = (2, 3, 4, 6, 8, 12, 16, 24)


def default_row_images(rows: int) -> list[int]:
    """The image of each of `rows` rows of default requests."""
    return [row // DEFAULT_ROWS_PER_IMAGE for row in range(rows)]


class RowMajor:
    name = "rows"
    needs_symbolic_sizes = False
    shapes = len(STATIC_ROW_BUCKETS)  # cache shapes, one CUDA graph per shape and span
    # The most one engine call places: a larger batch runs in parts (a cache of its own exact
    # size would be allocated, recorded and kept).
    max_rows = max_images = STATIC_ROW_BUCKETS[-1]

    @staticmethod
    def place(row_image: list[int]) -> Placement:
        """The rows in order, padded up to a row bucket."""
        return row_major(len(row_image), STATIC_ROW_BUCKETS)

    @staticmethod
    def compacted(active: list[int], cache: KVCache) -> Placement:
        """The `active` rows (indices into `cache`) in the smallest row bucket holding them."""
        return row_major(len(active), STATIC_ROW_BUCKETS).through(active)

    @staticmethod
    def default_placement(rows: int) -> Placement:
        """`rows` rows of default requests: exactly `rows` slots (a bucket's size for a bucket)."""
        return in_order(range(rows))

    @staticmethod
    def warmup_rows(max_rows: int, max_images: int) -> list[int]:
        """Every row bucket up to the one holding `max_rows`: all that compaction can reach."""
        largest = bucket(max_rows, STATIC_ROW_BUCKETS)
        return [b for b in STATIC_ROW_BUCKETS if b <= largest]

    @staticmethod
    def new_cache(key: int, cfg: CaptionConfig, dtype: torch.dtype, device: torch.device,
                  spans: tuple[int, ...]) -> KVCache:
        return KVCache(cfg.depth, key, cfg.num_heads, cfg.max_seq_len, cfg.head_dim, dtype, device, spans)


class ImageMajor:
    name = "images"
    needs_symbolic_sizes = True
    shapes = len(STATIC_IMAGE_BUCKETS) * len(STATIC_PER_IMAGE_BUCKETS)
    max_images = STATIC_IMAGE_BUCKETS[-1]
    max_rows = max_images * STATIC_PER_IMAGE_BUCKETS[-1]

    @staticmethod
    def place(row_image: list[int]) -> Placement:
        """Rows grouped by image, padded per image and in whole images up to the buckets."""
        return image_major(row_image, STATIC_IMAGE_BUCKETS, STATIC_PER_IMAGE_BUCKETS)

    @staticmethod
    def compacted(active: list[int], cache: ImageMajorCache) -> Placement:
        """The images with any active row, each keeping its slots (warm-up has then recorded
        every shape that batches of default requests reach; fewer slots would be new shapes)."""
        images = [row // cache.per_image for row in active]
        return image_major(images, STATIC_IMAGE_BUCKETS, (cache.per_image,)).through(active)

    @classmethod
    def default_placement(cls, rows: int) -> Placement:
        """`rows` rows of default requests: in the image bucket holding their images."""
        return cls.place(default_row_images(rows))

    @staticmethod
    def warmup_rows(max_rows: int, max_images: int) -> list[int]:
        """Default requests on every image bucket up to the one holding `max_images` (other shapes,
        from other requests or compaction, are no new compilation with symbolic sizes: they
        record their CUDA graph on first use)."""
        images = bucket(max_images, STATIC_IMAGE_BUCKETS)
        return [DEFAULT_ROWS_PER_IMAGE * b for b in STATIC_IMAGE_BUCKETS if b <= images]

    @staticmethod
    def new_cache(key: tuple[int, int], cfg: CaptionConfig, dtype: torch.dtype, device: torch.device,
                  spans: tuple[int, ...]) -> ImageMajorCache:
        images, per_image = key
        return ImageMajorCache(cfg.depth, images, per_image, cfg.num_heads, cfg.prefix_len,
                               cfg.max_seq_len - cfg.prefix_len, cfg.head_dim, dtype, device, spans)


LAYOUTS = {layout.name: layout for layout in (RowMajor, ImageMajor)}
STATIC_LAYOUTS = tuple(LAYOUTS)
