"""Opt-in int8 decoder weights on CPU: every decoder Linear is int8, the products stay close to
float32's in the model's own dtype, the greedy captions stay close to the golden ones (float32 and
bfloat16), and misuse is refused."""

import pytest
import torch
from torch import nn

from handler.settings import HandlerSettings, SettingsError
from model.engine import CaptionEngine
from model.quantize import Int8Linear, quantize_decoder
from model.styles import make_plan
from tests.conftest import BF16_MIN_IDENTICAL, SEED_TINY

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def int8_engine():
    return CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", quantize="int8")


def test_decoder_linears_are_int8_and_the_encoder_is_not(int8_engine):
    decoder = list(int8_engine.model.text_transformer.modules())
    assert not any(type(m) is nn.Linear for m in decoder)
    assert sum(isinstance(m, Int8Linear) for m in decoder) == 4 * int8_engine.config.depth + 1  # fused blocks + output
    assert any(type(m) is nn.Linear for m in int8_engine.model.vision_encoder.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_products_stay_within_two_percent_of_the_range(dtype, reduce_range):
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=True)
    x = torch.randn(6, 1, 96)
    exact = linear(x)
    int8 = Int8Linear(linear.to(dtype), reduce_range)(x.to(dtype))
    assert int8.dtype == dtype and int8.shape == exact.shape
    error = (int8.float() - exact).abs().max() / exact.abs().max()
    assert 0 < error < (0.03 if reduce_range else 0.02), error  # int8, not a copy of the float product


@pytest.mark.parametrize("reduce_range, levels", [(False, 127), (True, 63)])
def test_int8_products_are_the_quantized_rows_times_the_quantized_weight(reduce_range, levels):
    """Each row mapped onto [-1, 1] by its midpoint and half-range is rounded to `levels` steps per
    unit (8 bits: 255 values; 7 bits, CPUs without VNNI: 127), then multiplied by the int8 weight:
    the same as that arithmetic in float64."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=True)
    x = torch.randn(6, 96) * 3 + 1
    got = Int8Linear(linear, reduce_range)(x).double()
    weight = linear.weight.double()
    scale = weight.abs().amax(dim=1, keepdim=True) / 127
    weight = (weight / scale).round() * scale  # int8 per output channel
    low, high = x.double().aminmax(dim=1, keepdim=True)
    mid, half = (high + low) / 2, (high - low) / 2
    unit = ((x.double() - mid) / half * levels).round() / levels
    expected = half * unit @ weight.T + mid * weight.sum(dim=1) + linear.bias.double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


def golden_sequences_reproduced(engine, golden, golden_pixels, kind: str, options: dict) -> tuple[int, int]:
    """How many of the golden `kind` sequences (one caption per image and style) the engine writes."""
    names, pixels = golden_pixels
    rows, ids = engine.generate(pixels, [make_plan(dict(options, num_captions=1))] * len(names))
    exact = sum([101] + row_ids + [102] == golden["images"][names[r.image]][kind][r.style]["ids"]
                for r, row_ids in zip(rows, ids))
    return exact, len(rows)


@pytest.mark.parametrize("kind, options, at_least", [
    ("greedy", {"temperature": 0}, 7),
    ("greedy_plain", {"temperature": 0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}, 8),
])
def test_greedy_sequences_stay_close_to_float32(int8_engine, golden, golden_pixels, kind, options, at_least):
    exact, total = golden_sequences_reproduced(int8_engine, golden, golden_pixels, kind, options)
    assert exact >= at_least, f"only {exact}/{total} golden {kind} sequences reproduced with int8"


def test_seven_bit_activations_keep_the_greedy_sequences(golden, golden_pixels, monkeypatch):
    """CPUs without VNNI (AVX2) get 7-bit activations (`reduce_activation_range`); forced here."""
    import model.quantize

    monkeypatch.setattr(model.quantize, "reduce_activation_range", lambda: True)
    engine = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", quantize="int8")
    assert {m.reduce_range for m in engine.model.modules() if isinstance(m, Int8Linear)} == {True}
    exact, total = golden_sequences_reproduced(engine, golden, golden_pixels, "greedy", {"temperature": 0})
    assert exact >= 7, f"only {exact}/{total} golden greedy sequences reproduced with 7-bit activations"


@pytest.mark.parametrize("options", [{"temperature": 0}, {"seed": 3}], ids=["greedy", "sampled"])
def test_a_request_gets_the_same_captions_alone_or_in_a_batch(int8_engine, golden_pixels, options):
    """Activations are quantized per row: one scale for the whole batch changed 2 of these 18
    greedy captions when the images were batched."""
    names, pixels = golden_pixels
    plans = [make_plan(options)] * len(names)
    alone = [ids for i in range(len(names)) for ids in int8_engine.generate(pixels[i:i + 1], plans[:1])[1]]
    assert int8_engine.generate(pixels, plans)[1] == alone


def test_a_row_of_products_is_the_same_whatever_its_batch():
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(64, 96), reduce_range=False)
    rows = torch.randn(9, 1, 64) * torch.logspace(-2, 2, 9)[:, None, None]  # ranges far apart
    batched = layer(rows)
    assert all(torch.equal(layer(rows[i:i + 1])[0], batched[i]) for i in range(len(rows)))
    constant = layer(torch.full((1, 64), 0.5))  # no range at all: mid * W 1 + b
    torch.testing.assert_close(constant, layer.weight_sums[None] * 0.5 + layer.bias)


def test_bfloat16_model_keeps_its_dtype_and_close_greedy_captions(golden, golden_pixels):
    engine = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json",
                                      dtype=torch.bfloat16, quantize="int8")
    assert engine.model.token_embeddings.weight.dtype == torch.bfloat16
    exact, total = golden_sequences_reproduced(engine, golden, golden_pixels, "greedy", {"temperature": 0})
    assert exact >= BF16_MIN_IDENTICAL, f"only {exact}/{total} golden greedy sequences reproduced with bf16 + int8"


def test_refuses_unknown_scheme_and_models_off_the_cpu():
    engine = CaptionEngine.from_files(SEED_TINY / "weights.pt", config=SEED_TINY / "config.json", prepack=False)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_decoder(engine.model, "int4")
    with pytest.raises(ValueError, match="floating-point model on the CPU"):
        quantize_decoder(engine.model.to("meta"), "int8")


def test_handler_setting(monkeypatch):
    assert HandlerSettings.from_dict({"cpu_quantize": "int8"}).cpu_quantize == "int8"
    # the rest of the model keeps cpu_dtype: auto picks bfloat16 on a CPU with native bf16, int8 or not
    from model import precision

    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    cpu = torch.device("cpu")
    assert HandlerSettings.from_dict({"cpu_quantize": "int8"}).dtype_for(cpu) == torch.bfloat16
    assert HandlerSettings.from_dict({"cpu_quantize": "int8", "cpu_dtype": "float32"}).dtype_for(cpu) == torch.float32
    with pytest.raises(SettingsError, match="cpu_quantize"):
        HandlerSettings.from_dict({"cpu_quantize": "int4"})
