"""CUDA paths: parity on the GPU, the compiled static-shape decode (CUDA graphs), bfloat16.

Selected only with `-m gpu` (bench/gpu_check.sh); without a CUDA device they fail loudly.
The same code paths run on CPU in tests/integration/test_engine.py (static shapes, compaction).
"""

import pytest
import torch

from model.config import STYLE_TOKEN_IDS
from model.engine import CaptionEngine
from model.reference import sequence_logits
from model.styles import STYLES, make_plan
from tests.conftest import BF16_MIN_IDENTICAL, SEED_TINY, identical_greedy_captions

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_engine():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", device="cuda")


def test_teacher_forced_logits_on_cuda(cuda_engine, golden):
    for image in golden["images"].values():
        forced = image["teacher_forced"]
        styles = torch.tensor([STYLE_TOKEN_IDS[s] for s in forced["styles"]], device="cuda")
        pixels = image["pixel_values"][None].expand(len(styles), -1, -1, -1).cuda()
        with torch.inference_mode():
            logits = sequence_logits(cuda_engine.model, pixels, styles, forced["input_ids"].cuda()).cpu()
        assert (logits.logsumexp(-1) - forced["logsumexp"]).abs().max() <= 1e-3
        assert torch.equal(logits.topk(5).indices, forced["top20_indices"][..., :5])


@pytest.mark.parametrize("compiled", [False, True])
def test_greedy_golden_on_cuda(cuda_engine, golden, golden_pixels, compiled):
    names, pixels = golden_pixels
    engine = cuda_engine
    if compiled:
        engine = CaptionEngine(cuda_engine.model, cuda_engine.vocab, compile_encoder=True, compile_decode=True,
                               compile_prefill=True)
    rows, ids = engine.generate(pixels.cuda(), [make_plan({"temperature": 0, "num_captions": 1})] * len(names))
    assert len(rows) == len(ids) == len(names) * len(STYLES)
    for row, row_ids in zip(rows, ids):
        assert [101] + row_ids + [102] == golden["images"][names[row.image]]["greedy"][row.style]["ids"]


def test_compiled_sampling_equals_eager_on_cuda(cuda_engine, golden_pixels):
    _, pixels = golden_pixels
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 40), (2, 5), (3, 17))]
    eager = cuda_engine.generate(pixels.cuda(), plans)[1]
    compiled = CaptionEngine(cuda_engine.model, cuda_engine.vocab, compile_decode=True)
    assert compiled.generate(pixels.cuda(), plans)[1] == eager
    buckets = compiled.last_stats["row_buckets"]  # finished rows move into smaller buckets' graphs
    assert buckets[0] == 24 and len(buckets) > 1 and buckets == sorted(set(buckets), reverse=True)
    assert compiled.generate(pixels[:1].cuda(), plans[:1])[1] == eager[: 3 * 2]  # another row bucket


def test_bfloat16_on_cuda(golden_pixels, expected_captions):
    names, pixels = golden_pixels
    engine = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", device="cuda",
                                      dtype=torch.bfloat16, compile_decode=True)
    results = engine.caption(pixels.cuda(), [make_plan({"temperature": 0, "num_captions": 1})] * len(names))
    assert all(set(r) == {s.capitalize() for s in STYLES} for r in results)
    identical = identical_greedy_captions(names, results, expected_captions)
    print(f"bfloat16 greedy on CUDA: {identical}/{len(names) * len(STYLES)} captions identical to the float32 goldens")
    assert identical >= BF16_MIN_IDENTICAL


def test_compiled_spans_recorded_at_warmup_on_cuda(golden_pixels):
    """Random weights run captions to the tiny model's 40 tokens, across both attention spans:
    warm-up recorded both graphs, and the tokens are those of eager decoding."""
    from torch._dynamo.utils import counters

    from model.captioner import CaptionModel
    from model.config import PRESETS
    from model.tokenizer import VOCAB_PATH, Vocabulary

    _, pixels = golden_pixels
    torch.manual_seed(0)
    model, vocab = CaptionModel(PRESETS["seed-tiny"]).eval().cuda(), Vocabulary(VOCAB_PATH)
    compiled = CaptionEngine(model, vocab, compile_decode=True)
    compiled.warmup(batch_sizes=(1,), max_new_tokens=2)
    graphs = counters["stats"]["unique_graphs"]
    plans = [make_plan({"seed": 1, "max_new_tokens": 40})]
    ids = compiled.generate(pixels[:1].cuda(), plans)[1]
    assert counters["stats"]["unique_graphs"] == graphs and max(len(row) for row in ids) > 20
    assert ids == CaptionEngine(model, vocab).generate(pixels[:1].cuda(), plans)[1]
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_dynamic_rows_compile_once_per_span_on_cuda(cuda_engine, golden_pixels):
    """`dynamic_rows` on CUDA: four row buckets, two compilations (one per span), each bucket's
    own CUDA graph, and the tokens of eager decoding through compaction."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    compiled = CaptionEngine(cuda_engine.model, cuda_engine.vocab, compile_decode=True, dynamic_rows=True,
                             sync_every=3)
    before = counters["stats"]["unique_graphs"]
    compiled.warmup(batch_sizes=(1, 4), max_new_tokens=2)
    assert counters["stats"]["unique_graphs"] - before == 2
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 30), (2, 3), (3, 6))]
    assert compiled.generate(pixels.cuda(), plans)[1] == cuda_engine.generate(pixels.cuda(), plans)[1]
    assert counters["stats"]["unique_graphs"] - before == 2
    assert counters["inductor"]["cudagraph_skips"] == 0


def test_sizes_beyond_the_compiled_ones_step_uncompiled_between_graph_replays_on_cuda(cuda_engine, golden_pixels):
    """A batch needing the whole vocabulary (top_k 0) or a long n-gram runs its static steps
    uncompiled, between other batches' CUDA-graph replays: no new graph, eager's tokens, and
    the compiled batches after it still replay correctly."""
    from torch._dynamo.utils import counters

    _, pixels = golden_pixels
    compiled = CaptionEngine(cuda_engine.model, cuda_engine.vocab, compile_decode=True, dynamic_rows=True)
    compiled.warmup(batch_sizes=(1, 3), max_new_tokens=2)
    graphs = counters["stats"]["unique_graphs"]
    default = [make_plan({"seed": s, "max_new_tokens": 8}) for s in (1, 2, 3)]
    for options in ({}, {"top_k": 0}, {"no_repeat_ngram_size": 6}, {}):
        plans = [make_plan({"seed": 4, "max_new_tokens": 8, **options})] * 3
        assert compiled.generate(pixels.cuda(), plans)[1] == cuda_engine.generate(pixels.cuda(), plans)[1]
    assert compiled.generate(pixels.cuda(), default)[1] == cuda_engine.generate(pixels.cuda(), default)[1]
    assert counters["stats"]["unique_graphs"] == graphs


def test_image_major_layout_on_cuda(cuda_engine, golden, golden_pixels):
    """`static_layout="images"` compiled on CUDA: the greedy golden ids, eager's sampled tokens
    through compaction and a mixed batch, one compilation per span, no CUDA-graph skips."""
    from torch._dynamo.utils import counters

    names, pixels = golden_pixels
    compiled = CaptionEngine(cuda_engine.model, cuda_engine.vocab, compile_decode=True, compile_prefill=True,
                             dynamic_rows=True, static_layout="images", sync_every=3)
    before = counters["stats"]["unique_graphs"]
    compiled.warmup(batch_sizes=(1, 3), max_new_tokens=2)
    rows, ids = compiled.generate(pixels.cuda(), [make_plan({"temperature": 0, "num_captions": 1})] * len(names))
    for row, row_ids in zip(rows, ids):
        assert [101] + row_ids + [102] == golden["images"][names[row.image]]["greedy"][row.style]["ids"]
    plans = [make_plan({"seed": s, "max_new_tokens": m}) for s, m in ((1, 30), (2, 3), (3, 6))]
    assert compiled.generate(pixels.cuda(), plans)[1] == cuda_engine.generate(pixels.cuda(), plans)[1]
    assert len(compiled.last_stats["row_buckets"]) > 1
    mixed = [make_plan({"seed": 4, "num_captions": 3, "max_new_tokens": 5}), make_plan({"seed": 5, "max_new_tokens": 5})]
    assert compiled.generate(pixels[:2].cuda(), mixed)[1] == cuda_engine.generate(pixels[:2].cuda(), mixed)[1]
    step_graphs = counters["stats"]["unique_graphs"] - before
    assert step_graphs <= 4  # two spans of the step, and the two prefill passes
    assert counters["inductor"]["cudagraph_skips"] == 0
