"""Bounded fuzzing of the request path: parse_request -> make_plan -> decode_image -> to_pixel_values.

Whatever a client sends, only the three client errors (RequestError, OptionError,
ImageError: HTTP 400) may come out; anything else would fail a whole TorchServe batch.
Inputs: random rows in every form the handler can receive, and valid small images with
bytes flipped, cut, inserted or duplicated. A few hundred examples per test, seconds in all
(``FUZZ_EXAMPLES=5000`` for a longer hunt).
"""

from __future__ import annotations

import base64
import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from handler.request_parsing import RequestError, parse_request
from model.image import ImageError, decode_image, to_pixel_values
from model.styles import OptionError, make_plan

pytestmark = [
    pytest.mark.unit,
    # Pillow warns about the corrupt metadata these inputs are made of; that is expected.
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]

CLIENT_ERRORS = (RequestError, OptionError, ImageError)
FUZZ_MAX_PIXELS = 2_000_000  # a mutated header may claim a large image; keep each example cheap
FUZZ_SIZE = 32

OPTION_NAMES = (
    "styles", "num_captions", "temperature", "top_k", "top_p",
    "repetition_penalty", "no_repeat_ngram_size", "max_new_tokens", "seed",
)
IMAGE_FIELDS = ("body", "data", "file")

FUZZ_SETTINGS = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "250")),  # raise it for a longer hunt
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def seed_images() -> list[bytes]:
    rgb = Image.frombytes("RGB", (12, 9), bytes((i * 37) % 256 for i in range(12 * 9 * 3)))
    exif = Image.Exif()
    exif[0x0112] = 8
    return [
        encoded(rgb, "PNG"),
        encoded(rgb, "JPEG", quality=80),
        encoded(rgb, "JPEG", exif=exif.tobytes()),
        encoded(rgb.convert("P"), "GIF"),
        encoded(rgb.convert("RGBA"), "WEBP"),
        encoded(rgb.convert("CMYK"), "TIFF"),
        encoded(rgb.convert("L").convert("I;16"), "PNG"),
        encoded(rgb, "BMP"),
    ]


SEED_IMAGES = seed_images()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_IMAGES)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "duplicate", "zero"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:
            data[at : at + draw(st.integers(1, 32))] = b""
    return bytes(data)


image_bytes = st.one_of(mutated_images(), st.sampled_from(SEED_IMAGES), st.binary(max_size=256))

# Integers well beyond int64 and float range (test_make_plan_huge_integer: 10**400).
json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**1400), 2**1400), st.floats(), st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=10,
)
number_texts = st.from_regex(r"\A\s?[+-]?[0-9]{0,12}(\.[0-9]{0,6})?([eE][+-]?[0-9]{1,3})?\s?\Z")
style_texts = st.lists(st.sampled_from(["concise", "Narrative", "descriptive", "poem", "", " "]), max_size=4).map(",".join)
text_values = st.one_of(number_texts, style_texts, st.text(max_size=16), st.sampled_from(["nan", "inf", "-0", "1e999"]))
raw_text_values = st.one_of(text_values.map(lambda t: t.encode("utf-8")), text_values, st.binary(max_size=16)).map(
    lambda v: bytearray(v) if isinstance(v, bytes) else v
)
option_names = st.one_of(st.sampled_from(OPTION_NAMES), st.sampled_from(["model_name", "image", "colour"]), st.text(max_size=8))
form_options = st.dictionaries(option_names, raw_text_values, max_size=5)
json_options = st.dictionaries(st.one_of(st.sampled_from(OPTION_NAMES), st.text(max_size=8)), json_values, max_size=5)


@st.composite
def base64_images(draw) -> str:
    text = base64.b64encode(draw(image_bytes)).decode("ascii")
    text = draw(st.sampled_from(["", "data:image/png;base64,", "data:,", "data:image/png,"])) + text
    if draw(st.booleans()):
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=4)) + text[at:]
    return text


@st.composite
def json_bodies(draw):
    body = draw(json_options)
    if draw(st.integers(0, 9)) > 0:
        body["image"] = draw(st.one_of(base64_images(), json_values)) if draw(st.integers(0, 9)) == 0 else draw(base64_images())
    form = draw(st.sampled_from(["parsed", "bytes", "text", "broken"]))
    if form == "parsed":
        return body
    text = json.dumps(body)
    if form == "broken":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=3)) + text[at + draw(st.integers(0, 3)) :]
    return text if form == "text" else bytearray(text.encode("utf-8"))


@st.composite
def rows(draw) -> dict:
    row = draw(form_options)
    kind = draw(st.sampled_from(["raw", "multipart", "json", "odd"]))
    if kind == "raw":
        row["body"] = bytearray(draw(image_bytes))
    elif kind == "multipart":
        row[draw(st.sampled_from(IMAGE_FIELDS))] = bytearray(draw(image_bytes))
        if draw(st.integers(0, 9)) == 0:
            row[draw(st.sampled_from(IMAGE_FIELDS))] = bytearray(draw(image_bytes))
    elif kind == "json":
        row["body"] = draw(json_bodies())
    else:
        row[draw(st.sampled_from(IMAGE_FIELDS))] = draw(json_values)
    return row


def caption_request(row: dict) -> None:
    """The handler's per-request path up to the model; raises only what it raises."""
    request = parse_request(row)
    make_plan(request.options)
    to_pixel_values(decode_image(request.image, max_pixels=FUZZ_MAX_PIXELS), FUZZ_SIZE)


def only_client_errors(call, *args) -> None:
    try:
        call(*args)
    except CLIENT_ERRORS:
        pass


@FUZZ_SETTINGS
@given(rows())
def test_any_row_gives_a_result_or_a_client_error(row):
    only_client_errors(caption_request, row)


@FUZZ_SETTINGS
@given(image_bytes)
def test_any_bytes_decode_or_give_an_image_error(data):
    try:
        image = decode_image(data, max_pixels=FUZZ_MAX_PIXELS)
    except ImageError as error:
        assert str(error)
        return
    assert image.mode == "RGB"
    assert to_pixel_values(image, FUZZ_SIZE).shape == (3, FUZZ_SIZE, FUZZ_SIZE)


@FUZZ_SETTINGS
@given(st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=6), st.dictionaries(option_names, raw_text_values, max_size=6)))
def test_any_options_give_a_plan_or_a_client_error(options):
    only_client_errors(lambda: make_plan(parse_request({"body": b"x", **options}).options))


def test_make_plan_huge_integer():
    """10**400 is no float; every numeric option refuses it as a client error."""
    for name in ("seed", "num_captions", "max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                 "no_repeat_ngram_size"):
        with pytest.raises(OptionError, match=f"'{name}' must be"):
            make_plan(parse_request({"body": b"x", name: "9" * 400}).options)
