"""Opt-in int8 decoder quantization on CPU: it runs, stays close to float32, and refuses misuse."""

import pytest
import torch
from torch import nn

from handler.settings import HandlerSettings, SettingsError
from model.engine import CaptionEngine
from model.quantize import quantize_decoder
from model.styles import make_plan
from tests.conftest import SEED_TINY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def int8_engine():
    return CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", quantize="int8")


def test_decoder_linears_are_quantized_and_the_encoder_is_not(int8_engine):
    decoder_linears = [m for m in int8_engine.model.text_transformer.modules() if type(m) is nn.Linear]
    assert decoder_linears == []
    assert any(type(m) is nn.Linear for m in int8_engine.model.vision_encoder.modules())


@pytest.mark.parametrize("kind, options, at_least", [
    ("greedy", {"temperature": 0}, 7),
    ("greedy_plain", {"temperature": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}, 8),
])
def test_greedy_sequences_stay_close_to_float32(int8_engine, golden, golden_pixels, kind, options, at_least):
    names, pixels = golden_pixels
    rows, ids = int8_engine.generate(pixels, [make_plan(dict(options, num_captions=1))] * len(names))
    exact = sum([101] + row_ids + [102] == golden["images"][names[r.image]][kind][r.style]["ids"]
                for r, row_ids in zip(rows, ids))
    assert exact >= at_least, f"only {exact}/{len(rows)} golden {kind} sequences reproduced with int8"


def test_refuses_unknown_scheme_and_non_float32_models(tiny_engine):
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_decoder(tiny_engine.model, "int4")
    bf16 = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        quantize_decoder(bf16.model, "int8")


def test_handler_setting(monkeypatch):
    assert HandlerSettings.from_dict({"cpu_quantize": "int8"}).cpu_quantize == "int8"
    # cpu_dtype auto on a CPU with native bf16 would pick bfloat16; int8 starts from float32.
    from model import precision

    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    cpu = torch.device("cpu")
    assert HandlerSettings.from_dict({"cpu_quantize": "int8"}).dtype_for(cpu) == torch.float32
    assert HandlerSettings.from_dict({}).dtype_for(cpu) == torch.bfloat16
    with pytest.raises(SettingsError, match="cpu_quantize"):
        HandlerSettings.from_dict({"cpu_quantize": "int4"})
