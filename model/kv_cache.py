"""Key/value storage for the three phases of generation.

- `PrefixKV`: prefill of the image prefix, once per image; keeps each layer's keys/values.
- `GroupKV`: prefill of `[style] [CLS]` for each (image, style) group, attending to its
  image's prefix (gathered by index) plus its own positions.
- `KVCache`: the static decode cache (CUDA graphs), one row per caption, preallocated for the
  whole generation and written in place at an explicit position. Rows are filled with a copy
  of their image's prefix and their group's keys/values; a step attends over a span of it.
- `ImageMajorCache`: the other static decode cache (`static_layout="images"`): each image's
  prefix stored once, its rows in consecutive slots (`model/slots.py`) keeping only `[style]
  [CLS]` and their own tokens; a step reads each prefix once for all the image's rows.
- `SharedPrefixCache`: the eager decode cache. Rows keep only `[style] [CLS]` and their own
  tokens; the rows of an image share its prefix, read once per image per step.

Each has `attend(layer, q, k, v, mask) -> context`, which `SelfAttention` calls: store the
call's keys/values, then attend over everything the queries may see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


# SDPA's fused CUDA kernels want an attention mask's strides (all but the last) to be multiples of
# 8 elements; inductor copies a mask that is not into an aligned buffer before every call.
MASK_ROW_ALIGNMENT = 8
# The eager decode cache's own buffers grow by this many positions at a time.
OWN_GROWTH = 32
# For a compiled eager step (`SharedPrefixCache(single_graph=True)`) every image and slot count is
# at least this: torch.compile specialises sizes of 1 into graphs of their own.
SINGLE_GRAPH_MIN_SIZE = 2


class StoreThenAttend:
    """`attend` for stores with `update(layer, k, v) -> (keys, values)`: store, then attend."""

    def attend(self, layer: int, q, k, v, mask=None) -> torch.Tensor:
        keys, values = self.update(layer, k, v)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


class PrefixKV(StoreThenAttend):
    def __init__(self, keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None):
        self.keys: list[torch.Tensor] = list(keys or [])
        self.values: list[torch.Tensor] = list(values or [])

    def select(self, count: int) -> "PrefixKV":
        """The first `count` images' keys/values."""
        return PrefixKV([k[:count] for k in self.keys], [v[:count] for v in self.values])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        # Contiguous: the same strides whether or not a compiled prefill padded the batch.
        self.keys.append(k.contiguous())
        self.values.append(v.contiguous())
        return k, v


class GroupKV(StoreThenAttend):
    def __init__(self, prefix: PrefixKV, image_index: torch.Tensor, keys=None, values=None):
        self.prefix, self.image_index = prefix, image_index
        self.keys: list[torch.Tensor] = list(keys or [])
        self.values: list[torch.Tensor] = list(values or [])

    def select(self, count: int) -> "GroupKV":
        """The first `count` groups' keys/values."""
        return GroupKV(self.prefix, self.image_index[:count], [k[:count] for k in self.keys],
                       [v[:count] for v in self.values])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys.append(k)
        self.values.append(v)
        prefix_k = self.prefix.keys[layer].index_select(0, self.image_index)
        prefix_v = self.prefix.values[layer].index_select(0, self.image_index)
        return torch.cat((prefix_k, k), dim=2), torch.cat((prefix_v, v), dim=2)


class FixedAddressCache(nn.Module):
    """What the static decode caches share: buffers at fixed addresses (CUDA graphs read and
    write them in place), the explicit `position` the next step writes at, and the spans."""

    def __init__(self, device, max_len: int, spans: tuple[int, ...], shortest: int = 0):
        super().__init__()
        self.register_buffer("position", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        torch._dynamo.mark_static_address(self.position)
        self.spans = tuple(sorted({*(s for s in spans if shortest < s < max_len), max_len}))
        self.span = max_len

    @staticmethod
    def zeros(layers: int, shape: tuple[int, ...], dtype, device) -> list[torch.Tensor]:
        """One zeroed fixed-address buffer per layer."""
        buffers = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        for buffer in buffers:
            torch._dynamo.mark_static_address(buffer)
        return buffers

    def advance(self, position: int) -> None:
        """Set the position the next decode step writes at, and the span it attends over."""
        self.position.fill_(position)
        self.span = next(span for span in self.spans if span > position)


def additive_mask(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the float mask `scaled_dot_product_attention` adds to the
    scores: 0 where visible, -inf elsewhere (what it makes of a boolean mask itself)."""
    return torch.zeros(visible.shape, dtype=dtype, device=visible.device).masked_fill(~visible, float("-inf"))


def own_capacity(filled: int, own_len: int) -> int:
    """Own positions the eager cache holds for `filled` written ones: rounded up to `OWN_GROWTH`,
    or `own_len` once less than `OWN_GROWTH` would be left (no growth by a handful of positions)."""
    rounded = -(-filled // OWN_GROWTH) * OWN_GROWTH
    return own_len if own_len - rounded < OWN_GROWTH else rounded


def copy_rows(mine: list[torch.Tensor], theirs: list[torch.Tensor], rows: torch.Tensor) -> None:
    """`theirs`' `rows` (dim 0) into `mine`, in place: addresses stay fixed."""
    for into, source in zip(mine, theirs):
        into.copy_(source.index_select(0, rows))


class KVCache(StoreThenAttend, FixedAddressCache):
    """Per layer, (rows, heads, max_len, head_dim) keys and values, written at `position`.

    One buffer per layer and kind (as gpt-fast does): an in-place write into a whole graph
    input is what torch.compile turns into a write in place; a write into a slice of one big
    buffer made it copy the whole cache every step. Each step attends over the buffer's first
    `span` positions under a mask, `span` the shortest of `spans` past `position`: one graph
    serves every position of a span (one graph per span), early steps skip the unwritten tail,
    and the buffers keep fixed addresses, so CUDA graphs read them in place.
    """

    def __init__(self, layers, rows, heads, max_len, head_dim, dtype, device, spans: tuple[int, ...] = ()):
        super().__init__(device, max_len, spans)
        shape = (rows, heads, max_len, head_dim)
        self.keys = self.zeros(layers, shape, dtype, device)
        self.values = self.zeros(layers, shape, dtype, device)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def buffers_by_rows(self) -> list[torch.Tensor]:
        """Every buffer whose dim 0 is the row count (symbolic with dynamic rows)."""
        return [*self.keys, *self.values]

    def fill(self, prefix: PrefixKV, groups: GroupKV, row_image: torch.Tensor, row_group: torch.Tensor):
        """Copy each row's image prefix and its group's `[style] [CLS]` keys/values."""
        prefix_len = prefix.keys[0].shape[2]
        end = prefix_len + groups.keys[0].shape[2]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[:, :, :prefix_len] = prefix.keys[layer].index_select(0, row_image)
            values[:, :, :prefix_len] = prefix.values[layer].index_select(0, row_image)
            keys[:, :, prefix_len:end] = groups.keys[layer].index_select(0, row_group)
            values[:, :, prefix_len:end] = groups.values[layer].index_select(0, row_group)

    def decode_mask(self) -> torch.Tensor:
        """(1, 1, 1, span) additive mask in the cache's dtype: 0 up to `position`, -inf past it.

        Made once per step for all layers. A boolean mask is converted by each layer's attention
        call, which compiled to two extra kernels per layer (H100 profile, run 4); and a mask
        whose row stride is not a multiple of 8 elements is copied by inductor before each fused
        CUDA attention kernel. So the mask is a view into a row padded to that alignment.
        """
        padded = -(-self.span // MASK_ROW_ALIGNMENT) * MASK_ROW_ALIGNMENT
        visible = torch.arange(padded, device=self.position.device) <= self.position
        return additive_mask(visible, self.keys[0].dtype)[None, None, None, : self.span]  # (padded,) -> (1, 1, 1, span)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        return keys[:, :, : self.span], values[:, :, : self.span]

    def load_rows(self, other: "KVCache", rows: torch.Tensor) -> None:
        """Copy `other`'s `rows` into this cache's own buffers."""
        copy_rows(self.buffers_by_rows(), other.buffers_by_rows(), rows)


def image_slots(row_image: list[int], images: int,
                min_per_image: int | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Group rows by image: slots (images, per_image) holding row indices (`len(row_image)`
    marks an empty slot) and row_slot (rows,), each row's flat index into slots.

    (None, None) when the rows already are image-major with the same count per image (the
    usual batch): the grouping is then a reshape, with no gather. With `min_per_image`: always
    slots, at least that many per image.
    """
    rows = len(row_image)
    uniform = images and rows % images == 0 and row_image == [row // (rows // images) for row in range(rows)]
    if uniform and min_per_image is None:
        return None, None
    members: list[list[int]] = [[] for _ in range(images)]
    for row, image in enumerate(row_image):
        members[image].append(row)
    per_image = max(min_per_image or 1, max(len(m) for m in members))
    slots = torch.full((images, per_image), rows, dtype=torch.long)
    row_slot = torch.empty(rows, dtype=torch.long)
    for image, members_of_image in enumerate(members):
        for slot, row in enumerate(members_of_image):
            slots[image, slot] = row
            row_slot[row] = image * per_image + slot
    return slots, row_slot


def at_least(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`tensor` padded along dim 0 to `count` with copies of its first entry."""
    missing = count - len(tensor)
    return tensor if missing <= 0 else torch.cat((tensor, tensor[:1].expand(missing, *tensor.shape[1:])))


def _to_images(x: torch.Tensor, slots: torch.Tensor | None, images: int) -> torch.Tensor:
    """(R, H, n) per row -> (I, H, S, n) per image (empty slots zero)."""
    if slots is None:
        return x.unflatten(0, (images, -1)).transpose(1, 2)  # (I, S, H, n) -> (I, H, S, n)
    return F.pad(x, (0, 0, 0, 0, 0, 1))[slots].transpose(1, 2)  # row R (zeros) fills empty slots


def _to_rows(x: torch.Tensor, row_slot: torch.Tensor | None) -> torch.Tensor:
    """(I, H, S, n) per image -> (R, H, n) per row."""
    x = x.transpose(1, 2).flatten(0, 1)  # (I * S, H, n)
    return x if row_slot is None else x[row_slot]


def shared_prefix_attention(q, prefix_k, prefix_v, own_k, own_v, slots, row_slot, own_mask=None) -> torch.Tensor:
    """One decode query per row over its image's prefix and its own positions, one softmax.

    q (R, H, 1, hd); prefix_k/v (I, H, P, hd); own_k/v (R, H, T, hd); slots (I, S), row_slot
    (R,) from `image_slots`; own_mask (T,) or (1, T) additive (`additive_mask`: 0 for the own
    positions a row may see, -inf for the others; None: all)
    -> context (R, H, 1, hd). The prefix products run per image on the (S rows x P positions)
    block, so each prefix is read once, not once per row.
    """
    images, prefix_len = prefix_k.shape[0], prefix_k.shape[2]
    q = q * q.shape[-1] ** -0.5
    prefix_scores = _to_rows(_to_images(q[:, :, 0], slots, images) @ prefix_k.transpose(-1, -2), row_slot)  # (R, H, P)
    own_scores = (q @ own_k.transpose(-1, -2))[:, :, 0]  # (R, H, T)
    if own_mask is not None:
        own_scores = own_scores + own_mask
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)  # bf16 scores are summed in float32
    probs = torch.cat((prefix_scores, own_scores), dim=-1).to(softmax_dtype).softmax(dim=-1).to(q.dtype)
    prefix_probs, own_probs = probs[..., :prefix_len], probs[..., prefix_len:]
    prefix_context = _to_rows(_to_images(prefix_probs, slots, images) @ prefix_v, row_slot)  # (R, H, hd)
    return own_probs[:, :, None] @ own_v + prefix_context[:, :, None]


class ImageMajorCache(FixedAddressCache):
    """Static decode cache, image-major: per layer (images, H, P, hd) prefix keys/values, one
    copy per image, and (images * per_image, H, 2 + max_text_tokens, hd) own keys/values per row
    for `[style] [CLS]` and its tokens, written at `position`. Row r belongs to image r //
    per_image, so `shared_prefix_attention` groups rows by reshape. Fixed addresses and spans as
    in `KVCache` (a span counts the prefix too); the own positions past `position` are masked.
    """

    def __init__(self, layers, images, per_image, heads, prefix_len, own_len, head_dim, dtype, device,
                 spans: tuple[int, ...] = ()):
        super().__init__(device, prefix_len + own_len, spans, shortest=prefix_len)
        prefix_shape, own_shape = (images, heads, prefix_len, head_dim), (images * per_image, heads, own_len, head_dim)
        self.prefix_keys = self.zeros(layers, prefix_shape, dtype, device)
        self.prefix_values = self.zeros(layers, prefix_shape, dtype, device)
        self.keys = self.zeros(layers, own_shape, dtype, device)
        self.values = self.zeros(layers, own_shape, dtype, device)
        self.prefix_len, self.per_image = prefix_len, per_image

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    def buffers_by_rows(self) -> list[torch.Tensor]:
        """Every buffer whose dim 0 is a row or image count (symbolic with dynamic rows)."""
        return [*self.prefix_keys, *self.prefix_values, *self.keys, *self.values]

    def fill(self, prefix: PrefixKV, groups: GroupKV, row_image: torch.Tensor, row_group: torch.Tensor):
        """Copy each image slot's prefix (the image of its first row) and each row's `[style] [CLS]`."""
        image_of_slot = row_image[:: self.per_image]
        filled = groups.keys[0].shape[2]
        for layer in range(len(self.keys)):
            self.prefix_keys[layer].copy_(prefix.keys[layer].index_select(0, image_of_slot))
            self.prefix_values[layer].copy_(prefix.values[layer].index_select(0, image_of_slot))
            self.keys[layer][:, :, :filled] = groups.keys[layer].index_select(0, row_group)
            self.values[layer][:, :, :filled] = groups.values[layer].index_select(0, row_group)

    def decode_mask(self) -> torch.Tensor:
        """(1, own span) additive mask in the cache's dtype, as `KVCache.decode_mask`, over the own
        positions only (the prefix is always visible)."""
        own = torch.arange(self.span - self.prefix_len, device=self.position.device)
        return additive_mask(own <= self.position - self.prefix_len, self.keys[0].dtype)[None]

    def attend(self, layer: int, q, k, v, mask=None) -> torch.Tensor:
        keys, values, own_span = self.keys[layer], self.values[layer], self.span - self.prefix_len
        own_position = self.position - self.prefix_len
        keys.index_copy_(2, own_position, k)
        values.index_copy_(2, own_position, v)
        return shared_prefix_attention(q, self.prefix_keys[layer], self.prefix_values[layer], keys[:, :, :own_span],
                                       values[:, :, :own_span], None, None, own_mask=mask)

    def load_rows(self, other: "ImageMajorCache", rows: torch.Tensor) -> None:
        """Copy `other`'s `rows` (image-major, `per_image` per image) in place, with their images' prefixes."""
        images = rows[:: self.per_image] // other.per_image
        copy_rows([*self.prefix_keys, *self.prefix_values], [*other.prefix_keys, *other.prefix_values], images)
        copy_rows([*self.keys, *self.values], [*other.keys, *other.values], rows)


class SharedPrefixCache:
    """Eager decode cache: per row (rows, heads, capacity, hd) for `[style] [CLS]` and generated
    tokens, written at `position`; each image's prefix keys/values stay in the prefill's
    (images, heads, P, hd) tensors and are shared by that image's rows (no per-row copy).

    The own buffers hold the positions written so far rounded up to `OWN_GROWTH` (at most
    `own_len`) and grow, by a copy, when a step needs more. Attention reads them whole, with an
    additive mask over the positions not yet written: a slice of a longer buffer is not
    contiguous, and bfloat16 products copy such an input first. One layer, 48 rows, bf16:
    0.8 / 1.0 / 1.4 ms at 10 / 40 / 100 written positions, against 1.1 / 1.6 / 2.4 ms sliced and
    about 1.5 ms over all 129 (`docs/benchmarks.md`). Same values: a masked position adds
    exp(-inf) = 0.

    `single_graph` (for a compiled step): rows are always grouped by gather, over at least
    `SINGLE_GRAPH_MIN_SIZE` images (padded with copies of the first, which no row reads) and
    slots per image, so one graph with symbolic sizes serves every batch and compaction. Same
    values: an empty slot's scores are never used.
    """

    def __init__(self, prefix: PrefixKV, groups: GroupKV, row_image: list[int], row_group: torch.Tensor,
                 own_len: int, single_graph: bool = False):
        self.single_graph = single_graph
        self.prefix_keys, self.prefix_values = list(prefix.keys), list(prefix.values)
        self.prefix_len, self.own_len = prefix.keys[0].shape[2], own_len
        device = row_group.device
        self.filled = groups.keys[0].shape[2]  # own positions valid after the current step
        self.keys = [k.index_select(0, row_group) for k in groups.keys]
        self.values = [v.index_select(0, row_group) for v in groups.values]
        self._grow(own_capacity(self.filled, own_len))
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self._own_index = torch.arange(own_len, device=device)
        self._own_mask: torch.Tensor | None = None  # (capacity,), set by `advance`
        self._set_rows(row_image)

    def _set_rows(self, row_image: list[int]) -> None:
        min_size = None
        if self.single_graph:
            min_size = SINGLE_GRAPH_MIN_SIZE
            self.prefix_keys = [at_least(k, min_size) for k in self.prefix_keys]
            self.prefix_values = [at_least(v, min_size) for v in self.prefix_values]
        slots, row_slot = image_slots(row_image, len(self.prefix_keys[0]), min_size)
        device = self.position.device
        self.row_image = row_image
        self.slots, self.row_slot = (None, None) if slots is None else (slots.to(device), row_slot.to(device))

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def advance(self, position: int) -> None:
        """Set the (absolute) position the next decode step writes at."""
        self.position.fill_(position)
        self.filled = position - self.prefix_len + 1
        if self.filled > self.capacity:
            self._grow(own_capacity(self.filled, self.own_len))
        written = self._own_index[: self.capacity] < self.filled
        self._own_mask = additive_mask(written, self.keys[0].dtype)  # (capacity,)

    def _grow(self, capacity: int) -> None:
        """Own buffers zero-padded to `capacity` positions, one layer at a time (one extra buffer at most)."""
        for buffers in (self.keys, self.values):
            for layer, buffer in enumerate(buffers):
                buffers[layer] = F.pad(buffer, (0, 0, 0, capacity - buffer.shape[2]))

    def decode_mask(self) -> None:
        return None

    def attend(self, layer: int, q, k, v, mask=None) -> torch.Tensor:
        keys, values = self.keys[layer], self.values[layer]
        keys.narrow(2, self.filled - 1, 1).copy_(k)
        values.narrow(2, self.filled - 1, 1).copy_(v)
        return shared_prefix_attention(q, self.prefix_keys[layer], self.prefix_values[layer], keys, values,
                                       self.slots, self.row_slot, self._own_mask)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (compaction); images left without rows are dropped from the prefix."""
        kept = [self.row_image[r] for r in rows.tolist()]
        images = sorted(set(kept))
        if len(images) < len(self.prefix_keys[0]):
            index = torch.tensor(images, device=self.position.device)
            self.prefix_keys = [k.index_select(0, index) for k in self.prefix_keys]
            self.prefix_values = [v.index_select(0, index) for v in self.prefix_values]
            renumber = {image: new for new, image in enumerate(images)}
            kept = [renumber[image] for image in kept]
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self._set_rows(kept)
