"""The decode caches: the eager shared-prefix attention equals plain attention over per-row
copies; the static cache attends over the shortest span that holds its position."""

import pytest
import torch
import torch.nn.functional as F

from model import kv_cache
from model.kv_cache import (GroupKV, ImageMajorCache, KVCache, PrefixKV, SharedPrefixCache, image_slots,
                            shared_prefix_attention)

pytestmark = pytest.mark.unit

HEADS, HEAD_DIM, PREFIX = 3, 8, 5


def per_row_attention(q, prefix_k, prefix_v, own_k, own_v, row_image):
    """The obvious way: copy each row's image prefix in front of its own keys/values."""
    keys = torch.cat((prefix_k[row_image], own_k), dim=2)
    values = torch.cat((prefix_v[row_image], own_v), dim=2)
    return F.scaled_dot_product_attention(q, keys, values)


def test_image_slots_groups_rows_by_image_with_padding():
    slots, row_slot = image_slots([1, 0, 1, 1, 3], images=4)
    assert slots.tolist() == [[1, 5, 5], [0, 2, 3], [5, 5, 5], [4, 5, 5]]  # 5 = empty slot
    assert slots.flatten()[row_slot].tolist() == [0, 1, 2, 3, 4]
    assert image_slots([0, 0, 1, 1, 2, 2], images=3) == (None, None)  # image-major, equal counts: a reshape
    assert image_slots([0, 0, 1, 1], images=3)[0] is not None  # image 2 has no rows


@pytest.mark.parametrize("row_image", [[0, 0, 0, 1, 1, 1], [0, 1, 2], [2, 0, 2, 2, 1], [1], [0, 2, 2]])
def test_shared_prefix_attention_equals_per_row_copies(row_image):
    torch.manual_seed(0)
    rows, images, own = len(row_image), 3, 4
    q = torch.randn(rows, HEADS, 1, HEAD_DIM, dtype=torch.float64)
    prefix_k, prefix_v = (torch.randn(images, HEADS, PREFIX, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    own_k, own_v = (torch.randn(rows, HEADS, own, HEAD_DIM, dtype=torch.float64) for _ in range(2))
    slots, row_slot = image_slots(row_image, images)
    shared = shared_prefix_attention(q, prefix_k, prefix_v, own_k, own_v, slots, row_slot)
    expected = per_row_attention(q, prefix_k, prefix_v, own_k, own_v, torch.tensor(row_image))
    assert shared.shape == (rows, HEADS, 1, HEAD_DIM)
    torch.testing.assert_close(shared, expected, rtol=1e-12, atol=1e-12)


def test_cache_writes_at_its_position_and_compaction_drops_images_without_rows():
    torch.manual_seed(1)
    prefix = PrefixKV()
    prefix.keys = [torch.randn(3, HEADS, PREFIX, HEAD_DIM)]
    prefix.values = [torch.randn(3, HEADS, PREFIX, HEAD_DIM)]
    groups = GroupKV(prefix, torch.tensor([0, 1, 2]))
    groups.keys, groups.values = [torch.randn(3, HEADS, 2, HEAD_DIM)], [torch.randn(3, HEADS, 2, HEAD_DIM)]
    row_image, row_group = [0, 0, 1, 2], torch.tensor([0, 0, 1, 2])
    cache = SharedPrefixCache(prefix, groups, row_image, row_group, own_len=4)
    cache.advance(PREFIX + 2)  # the first generated token's position
    q, k, v = (torch.randn(4, HEADS, 1, HEAD_DIM) for _ in range(3))
    context = cache.attend(0, q, k, v)
    own_k = torch.cat((groups.keys[0][row_group], k), dim=2)
    own_v = torch.cat((groups.values[0][row_group], v), dim=2)
    expected = per_row_attention(q, prefix.keys[0], prefix.values[0], own_k, own_v, torch.tensor(row_image))
    torch.testing.assert_close(context, expected)
    torch.testing.assert_close(cache.keys[0][:, :, 2:3], k)

    cache.select_rows(torch.tensor([3, 0]))  # image 1 has no row left
    assert cache.prefix_keys[0].shape[0] == 2 and cache.row_image == [1, 0]
    cache.advance(PREFIX + 3)
    q2, k2, v2 = (torch.randn(2, HEADS, 1, HEAD_DIM) for _ in range(3))
    context = cache.attend(0, q2, k2, v2)
    kept = torch.tensor([3, 0])
    own_k = torch.cat((own_k[kept], k2), dim=2)
    own_v = torch.cat((own_v[kept], v2), dim=2)
    expected = per_row_attention(q2, prefix.keys[0], prefix.values[0], own_k, own_v, torch.tensor([2, 0]))
    torch.testing.assert_close(context, expected)


def test_cache_grows_its_own_buffers_and_masks_the_unwritten_positions_with_the_same_values(monkeypatch):
    """The own buffers hold the written positions rounded up to `OWN_GROWTH` (at most own_len),
    grow when a step needs more, and are read whole with a mask over the unwritten positions."""
    monkeypatch.setattr(kv_cache, "OWN_GROWTH", 3)
    torch.manual_seed(2)
    own_len, row_image, row_group = 10, [0, 0, 1], torch.tensor([0, 0, 1])
    prefix = PrefixKV()
    prefix.keys, prefix.values = ([torch.randn(2, HEADS, PREFIX, HEAD_DIM, dtype=torch.float64)] for _ in range(2))
    groups = GroupKV(prefix, torch.tensor([0, 1]))
    groups.keys, groups.values = ([torch.randn(2, HEADS, 2, HEAD_DIM, dtype=torch.float64)] for _ in range(2))
    cache = SharedPrefixCache(prefix, groups, row_image, row_group, own_len=own_len)
    assert cache.capacity == 3
    own_k, own_v = groups.keys[0][row_group], groups.values[0][row_group]
    capacities, masked = [], []
    for position in range(PREFIX + 2, PREFIX + own_len):
        cache.advance(position)
        q, k, v = (torch.randn(3, HEADS, 1, HEAD_DIM, dtype=torch.float64) for _ in range(3))
        context = cache.attend(0, q, k, v)
        own_k, own_v = torch.cat((own_k, k), dim=2), torch.cat((own_v, v), dim=2)
        expected = per_row_attention(q, prefix.keys[0], prefix.values[0], own_k, own_v, torch.tensor(row_image))
        torch.testing.assert_close(context, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(cache.keys[0][:, :, : own_k.shape[2]], own_k, rtol=0, atol=0)
        assert cache.keys[0].is_contiguous() and cache.values[0].is_contiguous()
        capacities.append(cache.capacity)
        masked.append(bool(torch.isinf(cache._own_mask).any()))  # some positions unwritten
    assert capacities == [3, 6, 6, 6, 10, 10, 10, 10]  # 3 to 10 written: 9 would leave 1, so 10
    assert masked == [False, True, True, False, True, True, True, False]


@pytest.mark.parametrize("row_image", [[0], [0, 0, 0], [0, 1], [0, 0, 1], [1, 0, 0, 1]])
def test_single_graph_cache_pads_images_and_slots_with_the_same_values(row_image):
    """`single_graph` (a compiled step): at least two images and two slots per image, rows always
    grouped by gather; the attention is the same."""
    torch.manual_seed(3)
    images = max(row_image) + 1
    prefix = PrefixKV()
    prefix.keys, prefix.values = ([torch.randn(images, HEADS, PREFIX, HEAD_DIM, dtype=torch.float64)] for _ in range(2))
    groups = GroupKV(prefix, torch.arange(images))
    groups.keys, groups.values = ([torch.randn(images, HEADS, 2, HEAD_DIM, dtype=torch.float64)] for _ in range(2))
    row_group = torch.tensor(row_image)
    plain = SharedPrefixCache(prefix, groups, row_image, row_group, own_len=6)
    padded = SharedPrefixCache(prefix, groups, row_image, row_group, own_len=6, single_graph=True)
    assert len(padded.prefix_keys[0]) == max(images, 2) and padded.slots.shape[1] >= 2
    for position in (PREFIX + 2, PREFIX + 3):
        q, k, v = (torch.randn(len(row_image), HEADS, 1, HEAD_DIM, dtype=torch.float64) for _ in range(3))
        contexts = []
        for cache in (plain, padded):
            cache.advance(position)
            contexts.append(cache.attend(0, q, k, v))
        torch.testing.assert_close(contexts[1], contexts[0], rtol=1e-12, atol=1e-12)


def test_own_capacity_rounds_up_to_the_growth_step_and_never_grows_by_a_handful():
    assert kv_cache.OWN_GROWTH == 32
    assert [kv_cache.own_capacity(filled, 129) for filled in (2, 32, 33, 64, 65, 96, 97, 129)] == [
        32, 32, 64, 64, 96, 96, 129, 129]
    assert kv_cache.own_capacity(3, 17) == 17  # a short caption: one buffer for all of it


def test_static_cache_attends_over_the_shortest_span_holding_its_position():
    cache = KVCache(1, 2, HEADS, 12, HEAD_DIM, torch.float32, "cpu", spans=(6, 9, 12, 20))
    assert cache.spans == (6, 9, 12)  # the buffer's length is the last span
    torch.manual_seed(0)
    for layer_buffers in (cache.keys, cache.values):
        layer_buffers[0].normal_()
    for position, span in ((4, 6), (5, 6), (6, 9), (8, 9), (9, 12), (11, 12)):
        cache.advance(position)
        q, k, v = (torch.randn(2, HEADS, 1, HEAD_DIM) for _ in range(3))
        keys, values = cache.update(0, k, v)
        assert cache.span == span and keys.shape[2] == span and cache.decode_mask().shape == (1, 1, 1, span)
        assert torch.equal(cache.keys[0][:, :, position], k[:, :, 0])  # written in the whole buffer
        context = cache.attend(0, q, k, v, cache.decode_mask())
        visible = torch.arange(12) <= position  # the full buffer, masked: the same context
        expected = F.scaled_dot_product_attention(q, cache.keys[0], cache.values[0], attn_mask=visible[None])
        torch.testing.assert_close(context, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_mask_is_additive_once_per_step_and_equals_the_boolean_one(dtype):
    """decode_mask is the float mask SDPA would make of the boolean one, in the cache's dtype,
    so the layers share it instead of each converting a boolean mask (two kernels per layer)."""
    cache = KVCache(1, 2, HEADS, 11, HEAD_DIM, dtype, "cpu")  # a span that is not a multiple of 8
    cache.advance(5)
    mask = cache.decode_mask()
    assert mask.dtype == dtype and mask.shape == (1, 1, 1, 11) and mask.stride()[:-1] == (16, 16, 16)
    assert mask[..., :6].eq(0).all() and mask[..., 6:].eq(float("-inf")).all()
    torch.manual_seed(1)
    q, keys, values = torch.randn(2, HEADS, 1, HEAD_DIM, dtype=dtype), *(torch.randn(2, HEADS, 11, HEAD_DIM, dtype=dtype)
                                                                          for _ in range(2))
    boolean = (torch.arange(11) <= 5)[None]
    assert torch.equal(F.scaled_dot_product_attention(q, keys, values, attn_mask=mask),
                       F.scaled_dot_product_attention(q, keys, values, attn_mask=boolean))


def image_major_cache_and_inputs(per_image=2, images=2, own_len=6):
    torch.manual_seed(2)
    prefix = PrefixKV([torch.randn(3, HEADS, PREFIX, HEAD_DIM)], [torch.randn(3, HEADS, PREFIX, HEAD_DIM)])
    groups = GroupKV(prefix, torch.tensor([0, 1, 2]), [torch.randn(3, HEADS, 2, HEAD_DIM)],
                     [torch.randn(3, HEADS, 2, HEAD_DIM)])
    cache = ImageMajorCache(1, images, per_image, HEADS, PREFIX, own_len, HEAD_DIM, torch.float32, "cpu",
                            spans=(PREFIX + 4,))
    return prefix, groups, cache


def test_image_major_cache_equals_a_per_row_static_cache_at_every_position_and_span():
    """Rows of images 2 and 0 (two slots each): the prefix stored once per image, attention the
    same as `KVCache` with per-row copies, across both spans."""
    prefix, groups, cache = image_major_cache_and_inputs()
    row_image, row_group = torch.tensor([2, 2, 0, 0]), torch.tensor([2, 2, 0, 0])
    per_row = KVCache(1, 4, HEADS, PREFIX + 6, HEAD_DIM, torch.float32, "cpu", spans=(PREFIX + 4,))
    per_row.fill(prefix, groups, row_image, row_group)
    cache.fill(prefix, groups, row_image, row_group)
    assert cache.spans == per_row.spans == (PREFIX + 4, PREFIX + 6)
    torch.testing.assert_close(cache.prefix_keys[0], prefix.keys[0][[2, 0]])
    for position in range(PREFIX + 2, PREFIX + 6):
        q, k, v = (torch.randn(4, HEADS, 1, HEAD_DIM) for _ in range(3))
        per_row.advance(position)
        cache.advance(position)
        assert cache.span == per_row.span
        own_mask = cache.decode_mask()  # additive, like the per-row cache's: 0 up to position, -inf after
        own_visible = position - PREFIX + 1
        assert own_mask.shape == (1, cache.span - PREFIX) and own_mask.dtype == torch.float32
        assert own_mask[:, :own_visible].eq(0).all() and own_mask[:, own_visible:].eq(float("-inf")).all()
        expected = per_row.attend(0, q, k, v, per_row.decode_mask())
        torch.testing.assert_close(cache.attend(0, q, k, v, cache.decode_mask()), expected)


def test_image_major_cache_moves_rows_with_their_images_prefixes():
    prefix, groups, cache = image_major_cache_and_inputs(per_image=3, images=2)
    cache.fill(prefix, groups, torch.tensor([1, 1, 1, 2, 2, 2]), torch.tensor([1, 1, 1, 2, 2, 2]))
    for buffer in cache.keys:
        buffer.normal_()
    smaller = ImageMajorCache(1, 2, 2, HEADS, PREFIX, 6, HEAD_DIM, torch.float32, "cpu")
    smaller.load_rows(cache, torch.tensor([4, 5, 1, 1]))  # image slot 1's rows 4, 5; image slot 0's row 1 (+ a copy)
    torch.testing.assert_close(smaller.prefix_keys[0], prefix.keys[0][[2, 1]])
    torch.testing.assert_close(smaller.keys[0], cache.keys[0][[4, 5, 1, 1]])
