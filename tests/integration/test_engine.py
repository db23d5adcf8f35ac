"""The fast engine against the slow reference, batch-composition independence, and its code paths."""

import copy

import pytest
import torch

from model.engine import ROW_KEY_STRIDE, CaptionEngine
from model.reference import generate_caption
from model.styles import STYLES, make_plan

pytestmark = pytest.mark.integration

OPTION_SETS = [
    {"temperature": 0},
    {"seed": 3},
    {"seed": 11, "temperature": 1.0, "top_k": 0, "top_p": 0.95, "num_captions": 3},
    {"seed": 5, "styles": ["narrative"], "repetition_penalty": 1.0, "no_repeat_ngram_size": 4, "max_new_tokens": 12},
]


def reference_rows(engine, pixels, plan):
    out = []
    for style in plan.styles:
        for caption in range(plan.num_captions[style]):
            out.append(generate_caption(engine.model, pixels, style, plan.sampling[style],
                                        max_new_tokens=plan.max_new_tokens, seed=plan.seed or 0,
                                        row_key=STYLES.index(style) * ROW_KEY_STRIDE + caption))
    return out


@pytest.fixture(scope="module")
def float64_engine(plain_tiny_engine):
    """Cached and uncached attention round differently; in float64 no sampled token flips."""
    model = copy.deepcopy(plain_tiny_engine.model).to(torch.float64)
    return CaptionEngine(model, plain_tiny_engine.vocab)


# n-grams longer than the whole caption: the n-gram check looks back past the history's start
@pytest.mark.parametrize("options", OPTION_SETS + [{"seed": 2, "no_repeat_ngram_size": 8, "max_new_tokens": 3}])
def test_cached_engine_equals_reference(float64_engine, golden_pixels, options):
    _, pixels = golden_pixels
    plan = make_plan(options)
    _, ids = float64_engine.generate(pixels[:1], [plan])
    assert ids == reference_rows(float64_engine, pixels[0].double(), plan)


def test_mixed_batch_equals_each_request_alone(tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    plans = [make_plan(o) for o in OPTION_SETS[1:]] + [make_plan({"temperature": 0, "styles": ["concise"]})]
    images = torch.stack([pixels[i % len(pixels)] for i in range(len(plans))])
    _, together = tiny_engine.generate(images, plans)
    alone = []
    for i, plan in enumerate(plans):
        alone += tiny_engine.generate(images[i : i + 1], [plan])[1]
    assert together == alone


def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    options = {"seed": 1234, "temperature": 1.5, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
               "no_repeat_ngram_size": 0, "num_captions": 2}
    plan = make_plan(options)
    first = tiny_engine.caption(pixels[:1], [plan])[0]
    crowd = tiny_engine.caption(pixels[[1, 0, 2]], [make_plan({"seed": 9}), plan, make_plan({})])[1]
    assert first == crowd
    other_seed = tiny_engine.caption(pixels[:1], [make_plan({**options, "seed": 4321})])[0]
    assert other_seed != first  # the seed really drives the noise (only the seed differs)


def test_without_a_seed_each_request_draws_its_own_captions(tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    plan = make_plan({"temperature": 1.5, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
                      "no_repeat_ngram_size": 0, "num_captions": 2})
    first, second = (tiny_engine.generate(pixels[:1], [plan])[1] for _ in range(2))
    assert first != second  # a fresh random seed per request, not a fixed one


def test_compaction_and_static_shape_paths_agree(tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 40), (2, 5), (3, 17))]
    _, baseline = tiny_engine.generate(pixels, plans)
    compacting = CaptionEngine(tiny_engine.model, tiny_engine.vocab, sync_every=1)
    static = CaptionEngine(tiny_engine.model, tiny_engine.vocab, static_shapes=True, sync_every=3)
    assert compacting.generate(pixels, plans)[1] == baseline
    sizes = compacting.last_stats["row_buckets"]  # eager: a compaction only when it at least halves the batch
    assert sizes[0] == 18 and len(sizes) >= 2 and all(after <= before // 2 for before, after in zip(sizes, sizes[1:]))
    assert static.generate(pixels, plans)[1] == baseline
    buckets = static.last_stats["row_buckets"]  # finished rows leave: 18 rows in 24, then smaller ones
    assert buckets[0] == 24 and buckets[-1] <= 8 and buckets == sorted(set(buckets), reverse=True)
    assert all(len(ids) <= 5 for ids in baseline[6:12])
    # new tokens: each row's words, plus the [SEP] that ended it unless its own cap did first
    caps = [40] * 6 + [5] * 6 + [17] * 6
    assert any(len(ids) == 5 for ids in baseline[6:12])  # a row that its own cap ended
    assert tiny_engine.last_stats["new_tokens"] == sum(min(len(ids) + 1, cap) for ids, cap in zip(baseline, caps))


def test_caption_shape_and_stats(tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    results = tiny_engine.caption(pixels[:2], [make_plan({"styles": ["concise", "descriptive"], "num_captions": 3})] * 2)
    assert [sorted(r) for r in results] == [["Concise", "Descriptive"]] * 2
    assert all(len(v) == 3 and all(isinstance(c, str) and c for c in v) for r in results for v in r.values())
    stats = tiny_engine.last_stats
    assert stats["images"] == 2 and stats["rows"] == 12 and stats["new_tokens"] > 0
    assert {"encode_ms", "prefill_ms", "generate_ms"} <= stats.keys()


def test_bfloat16_engine_mostly_reproduces_the_float32_goldens(golden_pixels, expected_captions):
    from tests.conftest import BF16_MIN_IDENTICAL, SEED_TINY, identical_greedy_captions

    names, pixels = golden_pixels
    engine = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", dtype=torch.bfloat16)
    results = engine.caption(pixels, [make_plan({"temperature": 0, "num_captions": 1})] * len(names))
    identical = identical_greedy_captions(names, results, expected_captions)
    print(f"bfloat16 greedy: {identical}/{len(names) * len(STYLES)} captions identical to the float32 goldens")
    assert identical >= BF16_MIN_IDENTICAL


def test_bfloat16_mixed_batch_equals_each_request_alone(golden_pixels):
    """bfloat16 logits tie often, and `topk` orders tied tokens by how many it returns: greedy
    ties go to the lowest token id, a tied run at the top-p boundary is kept whole, and each row
    gathers its own candidate count (the third plan has no top-k), whatever the batch. Before,
    2 of these 25 captions changed with the batch."""
    from tests.conftest import SEED_TINY

    _, pixels = golden_pixels
    engine = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", dtype=torch.bfloat16)
    plans = [make_plan(o) for o in OPTION_SETS] + [make_plan({"temperature": 0, "styles": ["concise"]})]
    images = torch.stack([pixels[i % len(pixels)] for i in range(len(plans))])
    rows, together = engine.generate(images, plans)
    alone = []
    for i, plan in enumerate(plans):
        alone += engine.generate(images[i : i + 1], [plan])[1]
    greedy = [r for r, row in enumerate(rows) if plans[row.image].sampling[row.style].temperature == 0]
    assert len(together) == 25 and len(greedy) == 8  # greedy: six of the first plan, two of the last
    assert together == alone


def test_compiled_static_decode_on_cpu_equals_eager(plain_tiny_engine, golden_pixels):
    """The GPU configuration (torch.compile of the encoder and of the static-shape decode step,
    reused per-bucket caches) traced and run on CPU: same tokens as eager."""
    _, pixels = golden_pixels
    plans = [make_plan({"seed": s, "max_new_tokens": 10}) for s in (1, 2, 3)]
    eager = plain_tiny_engine.generate(pixels, plans)[1]
    compiled = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_encoder=True,
                             compile_decode=True)
    assert compiled.generate(pixels, plans)[1] == eager
    assert compiled.generate(pixels, plans)[1] == eager  # second call replays on the same cache
    assert set(compiled._static_caches) == {24}  # 18 rows -> the 24-row bucket


def test_compiled_static_decode_compacts_into_smaller_buckets(plain_tiny_engine, golden_pixels):
    """Finished rows leave the compiled static path too: each smaller bucket has its own cache,
    state and compiled step, and the tokens stay those of eager decoding."""
    _, pixels = golden_pixels
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 12), (2, 3), (3, 6))]
    eager = plain_tiny_engine.generate(pixels, plans)[1]
    compiled = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_decode=True, sync_every=3)
    assert compiled.generate(pixels, plans)[1] == eager
    assert compiled.last_stats["row_buckets"] == [24, 12, 8]  # 18 live rows, then 12, then 6
    assert set(compiled._static_caches) == {24, 12, 8}


def test_static_warmup_records_every_bucket_compaction_can_reach(tiny_engine, caplog):
    static = CaptionEngine(tiny_engine.model, tiny_engine.vocab, static_shapes=True)
    with caplog.at_level("INFO", logger="model.engine"):
        static.warmup(batch_sizes=(1, 4), max_new_tokens=2)
    assert set(static._static_caches) == {8, 12, 16, 24}  # every bucket up to 4 default requests (24 rows)
    progress = [r.getMessage() for r in caplog.records if "row bucket recorded" in r.getMessage()]
    assert [m.split(" (")[1].split(",")[0] for m in progress] == ["1 of 4", "2 of 4", "3 of 4", "4 of 4"]
    static.warmup(batch_sizes=(1,), max_new_tokens=2, max_rows=40)  # e.g. requests with more captions
    assert set(static._static_caches) == {8, 12, 16, 24, 32, 48}


def test_a_batch_beyond_the_largest_static_shape_runs_in_parts(tiny_engine, golden_pixels, monkeypatch):
    """Static shapes: more rows than the largest bucket would allocate (and keep) a cache of the
    exact size; the batch runs as runs of images that fit, with the rows, tokens and figures of
    one eager call."""
    from model.layouts import STATIC_ROW_BUCKETS, RowMajor

    _, pixels = golden_pixels
    monkeypatch.setattr(RowMajor, "max_rows", 12)  # instead of 768 rows
    plans = [make_plan({"seed": 1, "max_new_tokens": 6}), make_plan({"seed": 2, "max_new_tokens": 6}),
             make_plan({"seed": 3, "styles": ["concise"], "num_captions": 1, "max_new_tokens": 6})]
    static = CaptionEngine(tiny_engine.model, tiny_engine.vocab, static_shapes=True)
    assert static._parts(plans) == [slice(0, 2), slice(2, 3)]  # 12 rows, then 1
    expected_rows, expected_ids = tiny_engine.generate(pixels, plans)
    assert static.generate(pixels, plans) == (expected_rows, expected_ids)
    assert {key: static.last_stats[key] for key in ("images", "rows", "new_tokens")} == \
        {key: tiny_engine.last_stats[key] for key in ("images", "rows", "new_tokens")}
    assert static.last_stats["row_buckets"][0] == 12 and set(static._static_caches) <= set(STATIC_ROW_BUCKETS)


def test_a_batch_of_more_images_than_the_largest_image_major_shape_runs_in_parts(tiny_engine, golden_pixels,
                                                                                   monkeypatch):
    """The image-major layout caps images as well as rows (256 images of one caption each are far
    below its 6144 rows): each part holds at most `max_images` images."""
    from model.layouts import ImageMajor

    _, pixels = golden_pixels
    monkeypatch.setattr(ImageMajor, "max_images", 2)  # instead of 256
    plans = [make_plan({"seed": s, "styles": ["concise"], "num_captions": 1, "max_new_tokens": 4}) for s in range(3)]
    static = CaptionEngine(tiny_engine.model, tiny_engine.vocab, static_shapes=True, static_layout="images")
    assert static._parts(plans) == [slice(0, 2), slice(2, 3)]  # 2 rows, then 1: the row cap is far away
    assert static.generate(pixels, plans) == tiny_engine.generate(pixels, plans)


def test_compiled_encoder_runs_power_of_two_batches_only(plain_tiny_engine, golden_pixels):
    """After warm-up a partial batch (3 images) pads to the 4-image graph: no new compilation,
    and each image's tokens are those of the plain encoder."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    engine = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_encoder=True)
    torch._dynamo.reset()  # earlier tests' graphs would serve some batch sizes: count from none
    before = counters["stats"]["unique_graphs"]
    engine.warmup(batch_sizes=(1, 4), max_new_tokens=2)  # encoder batches 1, 2 and 4
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 3  # one static graph per batch size: the encoder is compiled
    with torch.inference_mode():
        tokens = engine.encode(pixels)
        expected = plain_tiny_engine.model.encode_images(pixels)
    assert counters["stats"]["unique_graphs"] == graphs
    assert tokens.shape == expected.shape
    torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_compiled_static_step_is_shared_by_batches_of_other_styles(plain_tiny_engine, golden_pixels):
    """A batch of concise-only requests (top_k 3, 2-grams) replays the graph recorded for the
    default mix (top_k up to 30, 3-grams), with the tokens of eager decoding."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    compiled = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_decode=True)
    compiled.generate(pixels, [make_plan({"seed": 1, "max_new_tokens": 4})] * 3)  # 18 rows: the 24-row bucket
    graphs = counters["stats"]["unique_graphs"]
    concise = [make_plan({"seed": s, "styles": ["concise"], "num_captions": 6, "max_new_tokens": 6}) for s in (1, 2, 3)]
    assert compiled.generate(pixels, concise)[1] == plain_tiny_engine.generate(pixels, concise)[1]
    assert counters["stats"]["unique_graphs"] == graphs
    # Sizes a client may ask for beyond those (the whole vocabulary, long n-grams): stepped
    # uncompiled, no graph compiled for them mid-traffic, the same tokens.
    for options in ({"top_k": 0}, {"top_k": 100}, {"no_repeat_ngram_size": 6}):
        plans = [make_plan({"seed": 5, "max_new_tokens": 5, **options})] * 3
        assert compiled.generate(pixels, plans)[1] == plain_tiny_engine.generate(pixels, plans)[1]
    assert counters["stats"]["unique_graphs"] == graphs


def test_compiled_warmup_records_every_attention_span_a_long_caption_crosses(golden_pixels):
    """Random weights rarely emit `[SEP]`, so captions run to the tiny model's 40 tokens and
    the step attends over each of the cache's two spans in turn: all recorded at warm-up
    (no new graph while generating), with the tokens of eager decoding."""
    from torch._dynamo.utils import counters

    from model.captioner import CaptionModel
    from model.config import PRESETS
    from model.tokenizer import VOCAB_PATH, Vocabulary

    _, pixels = golden_pixels
    torch.manual_seed(0)
    model, vocab = CaptionModel(PRESETS["seed-tiny"]).eval(), Vocabulary(VOCAB_PATH)
    compiled = CaptionEngine(model, vocab, compile_decode=True)
    compiled.warmup(batch_sizes=(1,), max_new_tokens=2)  # the 8-row bucket at both spans
    assert compiled._static_caches[8].spans == tuple(model.config.prefix_len + 2 + n for n in (20, 40))
    graphs = counters["stats"]["unique_graphs"]
    plans = [make_plan({"seed": 1, "max_new_tokens": 40})]
    ids = compiled.generate(pixels[:1], plans)[1]
    assert counters["stats"]["unique_graphs"] == graphs
    assert max(len(row) for row in ids) > 20  # into the last span
    assert ids == CaptionEngine(model, vocab).generate(pixels[:1], plans)[1]


def test_dynamic_rows_compile_once_per_span_for_every_row_bucket(plain_tiny_engine, golden_pixels):
    """`dynamic_rows`: warming up four row buckets at two spans compiles two graphs, not eight,
    and decoding (with compaction into smaller buckets) gives the tokens of eager decoding."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    compiled = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_decode=True,
                             dynamic_rows=True, sync_every=3)
    before = counters["stats"]["unique_graphs"]
    compiled.warmup(batch_sizes=(1, 4), max_new_tokens=2)  # buckets 8, 12, 16 and 24
    assert set(compiled._static_caches) == {8, 12, 16, 24}
    assert counters["stats"]["unique_graphs"] - before == 2
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 30), (2, 3), (3, 6))]
    assert compiled.generate(pixels, plans)[1] == plain_tiny_engine.generate(pixels, plans)[1]
    assert compiled.last_stats["row_buckets"] == [24, 12, 8]
    assert counters["stats"]["unique_graphs"] - before == 2


def test_compiled_prefill_compiles_once_for_every_batch_and_equals_eager(plain_tiny_engine, golden_pixels):
    """`compile_prefill`: image and group counts are symbolic sizes, so batches of 1, 2 and 3
    images with one or three styles share one graph per prefill pass (counts of 1 are padded),
    with the tokens of eager prefill."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    compiled = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_prefill=True)
    first = [make_plan({"seed": 1, "max_new_tokens": 6})] * 3
    torch._dynamo.reset()  # count from no graph (earlier tests' would serve)
    before = counters["stats"]["unique_graphs"]
    assert compiled.generate(pixels, first)[1] == plain_tiny_engine.generate(pixels, first)[1]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs - before == 2  # the two prefill passes, compiled
    for count, options in ((1, {"styles": ["concise"]}), (2, {}), (1, {}), (3, {"styles": ["narrative"]})):
        plans = [make_plan({"seed": 2, "max_new_tokens": 6, **options})] * count
        assert compiled.generate(pixels[:count], plans)[1] == plain_tiny_engine.generate(pixels[:count], plans)[1]
    assert counters["stats"]["unique_graphs"] == graphs


def test_image_major_static_path_equals_eager_for_mixed_requests_and_compaction(tiny_engine, golden_pixels):
    """`static_layout="images"` (each image's prefix stored once, its rows in consecutive slots):
    requests of different sizes and lengths give the eager tokens, and finished rows leave."""
    _, pixels = golden_pixels
    plans = [make_plan({"seed": 1, "max_new_tokens": 40}),
             make_plan({"seed": 2, "max_new_tokens": 5, "styles": ["concise"], "num_captions": 1}),
             make_plan({"seed": 3, "max_new_tokens": 17, "num_captions": 3})]
    static = CaptionEngine(tiny_engine.model, tiny_engine.vocab, static_shapes=True, static_layout="images",
                           sync_every=3)
    assert static.generate(pixels, plans)[1] == tiny_engine.generate(pixels, plans)[1]
    # 3 images x 12 slots (9 rows for image 3); image 2 (5 tokens) leaves, the others keep 12 slots each
    assert static.last_stats["row_buckets"] == [36, 24] and set(static._static_caches) == {(3, 12), (2, 12)}


def test_image_major_warmup_records_default_requests_on_every_image_bucket(tiny_engine, caplog):
    static = CaptionEngine(tiny_engine.model, tiny_engine.vocab, static_shapes=True, static_layout="images")
    with caplog.at_level("INFO", logger="model.engine"):
        static.warmup(batch_sizes=(1, 4), max_new_tokens=2)
    assert set(static._static_caches) == {(2, 6), (3, 6), (4, 6)}
    progress = [r.getMessage() for r in caplog.records if "row bucket recorded" in r.getMessage()]
    assert [m.split(" bucket")[0].split()[-1] for m in progress] == ["12-row", "18-row", "24-row"]


def test_compiled_image_major_decode_compiles_once_per_span_and_equals_eager(plain_tiny_engine, golden_pixels):
    """Compiled on CPU with symbolic image and slot counts: warm-up compiles one graph per span,
    and batches of other shapes (compaction included) add none, with the tokens of eager decoding."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    with pytest.raises(ValueError, match="dynamic_rows"):
        CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_decode=True, static_layout="images")
    compiled = CaptionEngine(plain_tiny_engine.model, plain_tiny_engine.vocab, compile_decode=True,
                             dynamic_rows=True, static_layout="images", sync_every=3)
    before = counters["stats"]["unique_graphs"]
    compiled.warmup(batch_sizes=(1, 3), max_new_tokens=2)  # (2, 6) and (3, 6) at both spans
    assert counters["stats"]["unique_graphs"] - before == 2
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 30), (2, 3), (3, 6))]
    assert compiled.generate(pixels, plans)[1] == plain_tiny_engine.generate(pixels, plans)[1]
    assert compiled.last_stats["row_buckets"] == [18, 12]  # 3 images x 6 slots; image 2 (3 tokens) leaves
    mixed = [make_plan({"seed": 4, "num_captions": 3, "max_new_tokens": 5}), make_plan({"seed": 5, "max_new_tokens": 5})]
    assert compiled.generate(pixels[:2], mixed)[1] == plain_tiny_engine.generate(pixels[:2], mixed)[1]
    assert counters["stats"]["unique_graphs"] - before == 2
