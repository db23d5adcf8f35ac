"""Key/value storage for the three phases of generation.

- `PrefixKV`: prefill of the image prefix, once per image; keeps each layer's keys/values.
- `GroupKV`: prefill of `[style] [CLS]` for each (image, style) group, attending to its
  image's prefix (gathered by index) plus its own positions.
- `KVCache`: the static decode cache, one row per caption, preallocated for the whole
  generation and written in place at an explicit position. Rows are filled from the prefix
  and group keys/values, so a row's cache never grows with `torch.cat`.

Each has `update(layer, k, v) -> (keys, values)`, which `SelfAttention` calls.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixKV:
    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys.append(k)
        self.values.append(v)
        return k, v


class GroupKV:
    def __init__(self, prefix: PrefixKV, image_index: torch.Tensor):
        self.prefix, self.image_index = prefix, image_index
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        self.keys.append(k)
        self.values.append(v)
        prefix_k = self.prefix.keys[layer].index_select(0, self.image_index)
        prefix_v = self.prefix.values[layer].index_select(0, self.image_index)
        return torch.cat((prefix_k, k), dim=2), torch.cat((prefix_v, v), dim=2)


class KVCache(nn.Module):
    """Per layer, (rows, heads, max_len, head_dim) keys and values, written at `position`.

    One buffer per layer and kind (as gpt-fast does): an in-place write into a whole graph
    input is what torch.compile turns into a write in place; a write into a slice of one big
    buffer made it copy the whole cache every step.
    With `static_shapes` every step attends over the whole buffer under a mask (one graph
    for CUDA graphs); otherwise over the filled part only, which is cheaper on CPU.
    """

    def __init__(self, layers, rows, heads, max_len, head_dim, dtype, device, static_shapes=False):
        super().__init__()
        shape = (rows, heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.register_buffer("position", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.static_shapes = static_shapes
        self.filled = 0  # host-side length after the current step (dynamic-shape mode)
        if static_shapes:  # fixed addresses: CUDA graphs then read them in place, with no copies
            for buffer in (*self.keys, *self.values, self.position):
                torch._dynamo.mark_static_address(buffer)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def fill(self, prefix: PrefixKV, groups: GroupKV, row_image: torch.Tensor, row_group: torch.Tensor):
        """Copy each row's image prefix and its group's `[style] [CLS]` keys/values."""
        prefix_len = prefix.keys[0].shape[2]
        end = prefix_len + groups.keys[0].shape[2]
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            keys[:, :, :prefix_len] = prefix.keys[layer].index_select(0, row_image)
            values[:, :, :prefix_len] = prefix.values[layer].index_select(0, row_image)
            keys[:, :, prefix_len:end] = groups.keys[layer].index_select(0, row_group)
            values[:, :, prefix_len:end] = groups.values[layer].index_select(0, row_group)
        self.filled = end

    def advance(self, position: int) -> None:
        """Set the position the next decode step writes at."""
        self.position.fill_(position)
        self.filled = position + 1

    def decode_mask(self) -> torch.Tensor | None:
        if not self.static_shapes:
            return None
        return (torch.arange(self.max_len, device=self.position.device) <= self.position)[None]  # (1, max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        keys, values = self.keys[layer], self.values[layer]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        if self.static_shapes:
            return keys, values
        return keys[:, :, : self.filled], values[:, :, : self.filled]

    def load_rows(self, other: "KVCache", rows: torch.Tensor) -> None:
        """Copy `other`'s `rows` into this cache's own buffers (in place: addresses stay fixed)."""
        for mine, theirs in zip((*self.keys, *self.values), (*other.keys, *other.values)):
            mine.copy_(theirs.index_select(0, rows))
        self.filled = other.filled

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (compaction after rows finished)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
