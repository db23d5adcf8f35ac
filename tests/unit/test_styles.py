"""Style defaults and validation of request options."""

import pytest

from model.styles import STYLE_DEFAULTS, Limits, OptionError, make_plan

pytestmark = pytest.mark.unit


def test_defaults_are_the_seeds():
    table = {s: (d.num_captions, *vars(d.sampling).values()) for s, d in STYLE_DEFAULTS.items()}
    assert table == {
        "concise": (2, 0.20, 3, 0.75, 1.4, 2),
        "narrative": (2, 0.75, 30, 0.90, 1.15, 3),
        "descriptive": (2, 0.45, 15, 0.85, 1.2, 3),
    }


def test_overrides_apply_to_every_selected_style():
    plan = make_plan({"styles": ["Descriptive", "concise"], "temperature": 0, "num_captions": 3, "seed": 5})
    assert plan.styles == ("concise", "descriptive")
    assert plan.num_captions == {"concise": 3, "descriptive": 3}
    assert {p.temperature for p in plan.sampling.values()} == {0.0}
    assert plan.sampling["concise"].top_k == 3 and plan.sampling["descriptive"].top_k == 15
    assert plan.seed == 5 and plan.max_new_tokens == 128 and plan.num_rows == 6


def test_styles_as_comma_string():
    assert make_plan({"styles": "narrative, concise"}).styles == ("concise", "narrative")


@pytest.mark.parametrize(
    "options, message",
    [
        ({"styles": ["poetic"]}, "unknown style 'poetic'"),
        ({"styles": ["x" * 100000]}, "unknown style 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx...'"),
        ({"styles": ["concise", "Concise"]}, "listed twice"),
        ({"styles": []}, "non-empty list"),
        ({"styles": [3]}, "must be strings"),
        ({"num_captions": 0}, "'num_captions' must be between 1 and 8"),
        ({"num_captions": 9}, "'num_captions' must be between 1 and 8"),
        ({"num_captions": 1.5}, "must be an integer"),
        ({"max_new_tokens": 129}, "'max_new_tokens' must be between 1 and 128"),
        ({"temperature": -1}, "'temperature' must be between"),
        ({"temperature": "hot"}, "'temperature' must be a number"),
        ({"temperature": float("nan")}, "must be finite"),
        ({"top_p": 1.5}, "'top_p' must be between 0.0 and 1.0"),
        ({"top_k": True}, "must be a number"),
        ({"seed": -1}, "'seed' must be between"),
        ({"seed": 2**63}, "'seed' must be between 0 and 9223372036854775807"),  # beyond int64 tensors
        ({"repetition_penalty": 0}, "'repetition_penalty' must be between 0.01 and 10.0, got 0"),
        ({"repetition_penalty": 1e-300}, "'repetition_penalty' must be between 0.01 and 10.0"),
        ({"repetition_penalty": 10.5}, "'repetition_penalty' must be between 0.01 and 10.0"),
        ({"colour": "red"}, "unknown option(s): 'colour'"),
        # logits / 1e-40 overflow float32 (empty or random captions); 1e-300 is 0 in float32
        ({"temperature": 1e-40}, "'temperature' must be 0 (greedy) or at least 1e-06, got 1e-40"),
        ({"top_p": 1e-300}, "'top_p' must be 0 (no top-p) or at least 1e-06, got 1e-300"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(OptionError) as error:
        make_plan(options)
    assert message in str(error.value)


def test_zero_and_the_smallest_positive_temperature_and_top_p_are_accepted():
    for value in (0, 0.0, 1e-6):
        sampling = make_plan({"temperature": value, "top_p": value}).sampling["concise"]
        assert (sampling.temperature, sampling.top_p) == (value, value)


def test_smallest_positive_repetition_penalty_is_accepted():
    assert make_plan({"repetition_penalty": 0.01}).sampling["concise"].repetition_penalty == 0.01


def test_limits_are_configurable():
    with pytest.raises(OptionError, match="between 1 and 2"):
        make_plan({"num_captions": 3}, Limits(max_num_captions=2))


def test_more_captions_per_style_than_noise_keys_is_refused():
    from model.engine import ROW_KEY_STRIDE, plan_rows

    plan = make_plan({"num_captions": ROW_KEY_STRIDE + 1}, Limits(max_num_captions=ROW_KEY_STRIDE + 1))
    with pytest.raises(ValueError, match=f"at most {ROW_KEY_STRIDE} captions per style"):
        plan_rows([plan], 40)
    rows, _, settings = plan_rows([make_plan({"num_captions": ROW_KEY_STRIDE}, Limits(max_num_captions=64))], 40)
    keys = [s["row_key"] for s in settings]
    assert len(rows) == 3 * ROW_KEY_STRIDE and len(set(keys)) == len(keys)
