"""The CPU float32 engine decodes through oneDNN-packed Linears by default; same tokens as plain."""

import pytest
import torch
from torch import nn

from model.engine import CaptionEngine
from model.packing import PackedLinear, prepack_decoder
from model.styles import make_plan
from tests.conftest import SEED_TINY

pytestmark = pytest.mark.integration


def linear_kinds(engine):
    return {type(m).__name__ for m in engine.model.text_transformer.modules() if isinstance(m, (nn.Linear, PackedLinear))}


def test_packing_is_the_cpu_float32_default_and_only_there(tiny_engine, plain_tiny_engine):
    assert linear_kinds(tiny_engine) == {"PackedLinear"}
    assert linear_kinds(plain_tiny_engine) == {"Linear"}
    assert {type(m) for m in tiny_engine.model.vision_encoder.modules()} >= {nn.Linear}  # encoder left alone
    bf16 = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", dtype=torch.bfloat16)
    assert linear_kinds(bf16) == {"Linear"}
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        prepack_decoder(bf16.model)


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
