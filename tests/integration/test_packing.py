"""The CPU engine decodes through oneDNN-packed Linears by default (float32; bfloat16 where oneDNN
multiplies it); same tokens as plain."""

import pytest
import torch
from torch import nn

from model.engine import CaptionEngine
from model.packing import PackedLinear, prepack_available, prepack_decoder
from model.styles import make_plan
from tests.conftest import SEED_TINY

pytestmark = pytest.mark.integration


def linear_kinds(engine):
    return {type(m).__name__ for m in engine.model.text_transformer.modules() if isinstance(m, (nn.Linear, PackedLinear))}


def test_packing_is_the_cpu_default(tiny_engine, plain_tiny_engine):
    assert linear_kinds(tiny_engine) == {"PackedLinear"}
    assert linear_kinds(plain_tiny_engine) == {"Linear"}
    assert {type(m) for m in tiny_engine.model.vision_encoder.modules()} >= {nn.Linear}  # encoder left alone
    half = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", dtype=torch.float16)
    assert linear_kinds(half) == {"Linear"}
    with pytest.raises(ValueError, match="in float32 or in bfloat16 where oneDNN"):
        prepack_decoder(half.model)


def bf16_engine(prepack: bool | None) -> CaptionEngine:
    return CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json",
                                    dtype=torch.bfloat16, prepack=prepack)


def test_bfloat16_is_packed_where_onednn_multiplies_it_else_plain():
    engine = bf16_engine(None)
    if prepack_available(torch.device("cpu"), torch.bfloat16):
        assert linear_kinds(engine) == {"PackedLinear"}
    else:  # an AVX2 host: oneDNN refuses bfloat16 weights
        assert linear_kinds(engine) == {"Linear"}
        with pytest.raises(ValueError, match="where oneDNN supports it"):
            prepack_decoder(engine.model)


@pytest.mark.skipif(not prepack_available(torch.device("cpu"), torch.bfloat16),
                    reason="oneDNN has no bfloat16 products on this CPU (AVX2): nothing is packed in bf16 here")
def test_bfloat16_packed_logits_and_tokens_match_plain(golden_pixels):
    _, pixels = golden_pixels
    packed, plain = bf16_engine(None), bf16_engine(False)
    groups = [(0, "concise"), (1, "narrative"), (2, "descriptive")]
    with torch.inference_mode():
        packed_logits = packed.prefill_groups(packed.prefill_prefix(pixels.bfloat16()), groups)[1]
        plain_logits = plain.prefill_groups(plain.prefill_prefix(pixels.bfloat16()), groups)[1]
    assert plain_logits.abs().max() > 1
    # PyTorch's own bfloat16 products run through oneDNN too: the packed weights give the same
    # sums here (measured: equal logits); the bound leaves room for another blocking's order.
    torch.testing.assert_close(packed_logits, plain_logits, rtol=0, atol=1e-2)
    plans = [make_plan({"seed": s}) for s in (1, 2, 3)] + [make_plan({"temperature": 0})]
    images = torch.cat((pixels, pixels[:1])).bfloat16()
    assert packed.generate(images, plans)[1] == plain.generate(images, plans)[1]


def test_packed_logits_match_plain(tiny_engine, plain_tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    groups = [(0, "concise"), (1, "narrative"), (2, "descriptive")]
    with torch.inference_mode():
        packed = tiny_engine.prefill_groups(tiny_engine.prefill_prefix(pixels), groups)[1]
        plain = plain_tiny_engine.prefill_groups(plain_tiny_engine.prefill_prefix(pixels), groups)[1]
    assert packed.abs().max() > 1  # real logits, not zeros
    torch.testing.assert_close(packed, plain, rtol=0, atol=1e-4)


def test_packed_and_plain_sample_the_same_tokens(tiny_engine, plain_tiny_engine, golden_pixels):
    _, pixels = golden_pixels
    plans = [make_plan({"seed": s}) for s in (1, 2, 3)]
    assert tiny_engine.generate(pixels, plans)[1] == plain_tiny_engine.generate(pixels, plans)[1]


def test_compiling_a_packed_model_is_refused_with_a_clear_message(tiny_engine):
    with pytest.raises(ValueError, match="prepack=False"):
        CaptionEngine(tiny_engine.model, tiny_engine.vocab, compile_decode=True)
