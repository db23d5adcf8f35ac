"""The compiled eager decode step (`compile_step`, the CPU's compiled path): the oneDNN-packed
products reach the graph through the `caption::opaque_linear` operator, every size is symbolic,
warm-up compiles every graph a batch can need, and the tokens are eager decoding's."""

import pytest
import torch
from torch._dynamo.utils import counters

from model.engine import CaptionEngine
from model.packing import PackedLinear, opaque_linear
from model.styles import make_plan
from tests.conftest import SEED_TINY

pytestmark = pytest.mark.integration


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(scope="module")
def compiled_engine(tiny_engine):
    engine = CaptionEngine(tiny_engine.model, tiny_engine.vocab, compile_step=True, sync_every=3)
    before = compiled_graphs()
    engine.warmup(batch_sizes=(1,), max_new_tokens=2)
    engine.warmup_graphs = compiled_graphs() - before
    return engine


def test_the_packed_linear_operator_is_the_layer(tiny_engine):
    layer = next(m for m in tiny_engine.model.modules() if isinstance(m, PackedLinear))
    x = torch.randn(3, 1, layer.in_features)
    assert torch.equal(torch.ops.caption.opaque_linear(x, layer.key), layer(x))
    torch.library.opcheck(opaque_linear, (x, layer.key))  # its shape function agrees with it, traced too


def test_warmup_compiles_the_step_for_every_batch_form(compiled_engine):
    assert compiled_engine.warmup_graphs == 1, compiled_engine.warmup_graphs


BATCHES = {
    "one image": [make_plan({"seed": 1})],
    "three images": [make_plan({"seed": s}) for s in (1, 2, 3)],
    "one greedy row": [make_plan({"seed": 4, "styles": ["narrative"], "num_captions": 1, "temperature": 0})],
    "mixed rows per image": [make_plan({"seed": 5, "num_captions": 3}),
                             make_plan({"seed": 6, "styles": ["concise"], "num_captions": 1, "temperature": 0}),
                             make_plan({"seed": 7, "styles": ["descriptive", "concise"], "max_new_tokens": 9})],
    "greedy, compacting": [make_plan({"seed": 8, "temperature": 0, "num_captions": 2}),
                           make_plan({"seed": 9, "temperature": 0, "max_new_tokens": 4})],
}


@pytest.mark.parametrize("name", BATCHES)
def test_compiled_step_gives_eager_tokens_without_compiling_again(compiled_engine, tiny_engine, golden_pixels,
                                                                  name):
    _, pixels = golden_pixels
    plans = BATCHES[name]
    before = compiled_graphs()
    compiled = compiled_engine.generate(pixels[: len(plans)], plans)[1]
    assert compiled == tiny_engine.generate(pixels[: len(plans)], plans)[1]
    assert compiled_graphs() == before, "a batch after warm-up compiled a new graph"
    if name == "greedy, compacting":  # finished rows left the batch: the compiled step saw it shrink
        assert len(compiled_engine.last_stats["row_buckets"]) > 1


def test_compile_step_without_a_cpp_compiler_fails_at_once_saying_so(tiny_engine):
    import torch._inductor.config as inductor_config

    # the config's own patch: pytest's monkeypatch would delete the entry when undoing it
    configured, expected = inductor_config.cpp.cxx, r"needs a C\+\+ compiler .* found none of \['no-such-compiler\+\+'\]"
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler++")}), pytest.raises(RuntimeError, match=expected):
        CaptionEngine(tiny_engine.model, tiny_engine.vocab, compile_step=True)
    assert inductor_config.cpp.cxx == configured  # restored: later tests compile


def test_compile_step_refuses_what_it_cannot_compile(tiny_engine):
    with pytest.raises(ValueError, match="choose one"):
        CaptionEngine(tiny_engine.model, tiny_engine.vocab, compile_step=True, static_shapes=True)
    with pytest.raises(ValueError, match="not oneDNN-packed or int8 ones"):
        CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", quantize="int8",
                                 compile_prefill=True)


def test_compiled_step_keeps_the_int8_products_and_their_tokens(golden_pixels):
    """`cpu_quantize: int8` with `cpu_compile_decode`: the int8 Linears reach the graph through the
    same operator, and the compiled step gives the int8 eager step's tokens."""
    eager = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", quantize="int8")
    compiled = CaptionEngine(eager.model, eager.vocab, compile_step=True, sync_every=3)
    compiled.warmup(batch_sizes=(1,), max_new_tokens=2)
    _, pixels = golden_pixels
    for name in ("three images", "greedy, compacting"):
        plans = BATCHES[name]
        before = compiled_graphs()
        assert compiled.generate(pixels[: len(plans)], plans)[1] == eager.generate(pixels[: len(plans)], plans)[1]
        assert compiled_graphs() == before
