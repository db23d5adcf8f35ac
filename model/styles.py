"""Caption styles, their default sampling parameters, and validation of per-request options.

One table, shared by the CLI and the TorchServe handler. Option names are the public API's
(`num_captions`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
`no_repeat_ngram_size`, `max_new_tokens`, `seed`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from model.config import BASE_VOCAB_SIZE

STYLES = ("concise", "narrative", "descriptive")  # canonical order of the response keys


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    no_repeat_ngram_size: int


@dataclass(frozen=True)
class StyleDefaults:
    num_captions: int
    sampling: SamplingParams


STYLE_DEFAULTS = {
    "concise": StyleDefaults(2, SamplingParams(0.20, 3, 0.75, 1.4, 2)),
    "narrative": StyleDefaults(2, SamplingParams(0.75, 30, 0.90, 1.15, 3)),
    "descriptive": StyleDefaults(2, SamplingParams(0.45, 15, 0.85, 1.2, 3)),
}


@dataclass(frozen=True)
class Limits:
    """Upper bounds that keep one request from monopolising a worker."""

    max_num_captions: int = 8
    max_new_tokens: int = 128
    max_top_k: int = BASE_VOCAB_SIZE  # every word of the vocabulary
    max_ngram: int = 8
    max_temperature: float = 5.0
    max_repetition_penalty: float = 10.0


@dataclass(frozen=True)
class _Range:
    kind: type
    low: float
    high: float | str  # a str names a Limits field
    zero_means: str = ""  # for a float whose 0 is a switch: what it means; positive values start at MIN_POSITIVE


# The smallest positive temperature or top_p: below it, logits / temperature overflow float32
# (to inf: empty or random captions) or the value itself rounds to 0, which means something else.
MIN_POSITIVE = 1e-6


# The repetition penalty divides the scores of seen tokens: 0 (or a float32 underflow to 0)
# would turn them into inf or nan instead of penalising them.
MIN_REPETITION_PENALTY = 0.01

# Every sampling override.
_SAMPLING_RANGES = {
    "temperature": _Range(float, 0.0, "max_temperature", zero_means="greedy"),
    "top_k": _Range(int, 0, "max_top_k"),
    "top_p": _Range(float, 0.0, 1.0, zero_means="no top-p"),
    "repetition_penalty": _Range(float, MIN_REPETITION_PENALTY, "max_repetition_penalty"),
    "no_repeat_ngram_size": _Range(int, 0, "max_ngram"),
}


_SHOWN_NAME_CHARS = 40  # error messages quote at most this much of a client's value


def _quoted(value: str) -> str:
    return repr(value if len(value) <= _SHOWN_NAME_CHARS else value[:_SHOWN_NAME_CHARS] + "...")


class OptionError(ValueError):
    """A request option is missing, of the wrong type or out of range (HTTP 400)."""


@dataclass(frozen=True)
class CaptionPlan:
    """What to generate for one image: per style, how many captions with which parameters."""

    styles: tuple[str, ...]
    num_captions: dict[str, int]
    sampling: dict[str, SamplingParams]
    max_new_tokens: int
    seed: int | None

    @property
    def num_rows(self) -> int:
        return sum(self.num_captions[s] for s in self.styles)


def _number(name: str, value, kind: type, low: float, high: float):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise OptionError(f"'{name}' must be a number, got {type(value).__name__}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise OptionError(f"'{name}' must be an integer, got {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(f"'{name}' must be finite")
    if not low <= value <= high:
        raise OptionError(f"'{name}' must be between {low} and {high}, got {value}")
    return kind(value)


def parse_styles(value, *, default: tuple[str, ...] = STYLES) -> tuple[str, ...]:
    if value is None:
        return default
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not value:
        raise OptionError("'styles' must be a non-empty list of style names")
    styles = []
    for item in value:
        if not isinstance(item, str):
            raise OptionError(f"'styles' entries must be strings, got {type(item).__name__}")
        name = item.strip().lower()
        if name not in STYLE_DEFAULTS:
            raise OptionError(f"unknown style {_quoted(item)}; choose from {', '.join(STYLES)}")
        if name in styles:
            raise OptionError(f"style {_quoted(name)} is listed twice")
        styles.append(name)
    return tuple(s for s in STYLES if s in styles)


def make_plan(options: dict | None = None, limits: Limits = Limits()) -> CaptionPlan:
    """Validate request options and resolve them against the style defaults.

    Sampling overrides apply to every selected style. Unknown option names are errors.
    """
    options = dict(options or {})
    allowed = {"styles", "num_captions", "max_new_tokens", "seed", *_SAMPLING_RANGES}
    unknown = sorted(set(options) - allowed)
    if unknown:
        shown = ", ".join(_quoted(name) for name in unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise OptionError(f"unknown option(s): {shown}; allowed: {', '.join(sorted(allowed))}")
    styles = parse_styles(options.get("styles"))
    overrides = {}
    for name, bounds in _SAMPLING_RANGES.items():
        if options.get(name) is not None:
            high = getattr(limits, bounds.high) if isinstance(bounds.high, str) else bounds.high
            overrides[name] = _number(name, options[name], bounds.kind, bounds.low, high)
            if bounds.zero_means and 0 < overrides[name] < MIN_POSITIVE:
                raise OptionError(f"'{name}' must be 0 ({bounds.zero_means}) or at least {MIN_POSITIVE}, "
                                  f"got {options[name]}")
    num = options.get("num_captions")
    num = None if num is None else _number("num_captions", num, int, 1, limits.max_num_captions)
    max_new = options.get("max_new_tokens")
    max_new = limits.max_new_tokens if max_new is None else _number("max_new_tokens", max_new, int, 1, limits.max_new_tokens)
    seed = options.get("seed")
    if seed is not None:
        seed = _number("seed", seed, int, 0, 2**63 - 1)
    return CaptionPlan(
        styles=styles,
        num_captions={s: num or STYLE_DEFAULTS[s].num_captions for s in styles},
        sampling={s: dataclasses.replace(STYLE_DEFAULTS[s].sampling, **overrides) for s in styles},
        max_new_tokens=max_new,
        seed=seed,
    )


def response_key(style: str) -> str:
    """The original API's capitalised key: 'concise' -> 'Concise'."""
    return style.capitalize()
