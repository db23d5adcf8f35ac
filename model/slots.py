"""Where each caption row sits in a static (CUDA-graph) decode cache, and where it moves when
finished rows are dropped (compaction).

A `Placement` lists, for every slot of a cache, the row it holds (an index into the rows being
placed) and whether it is padding: a copy of a real row that is finished from the start and
whose tokens are discarded. Static caches come in a few sizes (buckets), so a batch is padded
up to one and a CUDA graph recorded per bucket serves every batch that fits.

- Row-major (`KVCache`): the rows in order, then padding up to a row bucket.
- Image-major (`ImageMajorCache`): image i's rows in slots i * per_image ... (i + 1) *
  per_image - 1, padded per image up to a per-image bucket and with whole padding images up to
  an image bucket, so that grouping rows by image is a reshape and each image's prefix is
  stored and read once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    source: list[int]  # per slot: the placed row it holds (padding: a copy of a real row)
    padding: list[bool]  # per slot: finished from the start, its tokens discarded
    per_image: int = 0  # image-major: slots per image (0: row-major)

    @property
    def rows(self) -> int:
        return len(self.source)

    @property
    def key(self) -> int | tuple[int, int]:
        """The cache bucket: a row count, or (images, slots per image)."""
        return (self.rows // self.per_image, self.per_image) if self.per_image else self.rows

    def through(self, rows: list[int]) -> "Placement":
        """This placement with each source looked up in `rows` (placing a subset of some rows)."""
        return Placement([rows[s] for s in self.source], self.padding, self.per_image)


def in_order(rows) -> Placement:
    """`rows`, one per slot, no padding (eager decoding, or an exact static size)."""
    return Placement(list(rows), [False] * len(rows))


def bucket(count: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds `count`, or `count` itself beyond the largest."""
    return next((b for b in buckets if b >= count), count)


def row_major(count: int, buckets: tuple[int, ...]) -> Placement:
    """`count` rows in order, padded with copies of row 0 up to a row bucket."""
    size = bucket(count, buckets)
    return Placement(list(range(count)) + [0] * (size - count), [False] * count + [True] * (size - count))


def image_major(row_image: list[int], image_buckets: tuple[int, ...], per_image_buckets: tuple[int, ...]) -> Placement:
    """Rows grouped by image (`row_image`: any image ids, images ordered by first row): each
    image's rows padded with copies of its first row up to the per-image bucket of the largest
    group, then whole copies of the first image up to an image bucket."""
    members: dict[int, list[int]] = {}
    for row, image in enumerate(row_image):
        members.setdefault(image, []).append(row)
    groups = list(members.values())
    per_image = bucket(max(len(g) for g in groups), per_image_buckets)

    def slots_of(group: list[int]) -> list[int]:  # the group, then copies of its first row
        return group + [group[0]] * (per_image - len(group))

    source, padding = [], []
    for group in groups:
        source += slots_of(group)
        padding += [False] * len(group) + [True] * (per_image - len(group))
    missing = bucket(len(groups), image_buckets) - len(groups)
    source += slots_of(groups[0]) * missing
    padding += [True] * (per_image * missing)
    return Placement(source, padding, per_image)
