"""The corpus of hostile, broken and unusual requests sent to the real server by
``test_reliability.py`` (and mixed into the soak test). Everything is generated here at run
time from the three seed-tiny images; nothing large is committed.

Each ``Case`` is one HTTP request (keyword arguments for ``requests``) and what the API must
answer: ``200`` (a caption; with ``golden`` naming the image whose greedy captions it must
equal, or ``same_as`` holding the image it must be captioned like), ``400`` with ``needle`` in
the JSON error message, or ``(200, 400)`` where either is acceptable (then a 400 still needs
its message). Every valid-image case asks for greedy captions so that its result is exact.

The decoding of untrusted bytes is fuzzed without the server in tests/unit/test_fuzz_parsing.py;
this corpus is the hand-picked set that proves the whole path (frontend, worker protocol,
handler, batch) over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import random
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tests.e2e.seed import image_bytes

GREEDY = {"temperature": 0, "num_captions": 1}
OCTET = {"Content-Type": "application/octet-stream"}
MAX_PIXELS = 40_000_000  # handler/model-config.yaml handler.max_pixels (checked by the tests)
TINY_MAX_NEW_TOKENS = 40  # the seed-tiny config's max_text_tokens caps max_new_tokens


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], dict] = field(repr=False)  # -> keyword arguments of requests.post
    expect: int | tuple[int, ...] = 400
    needle: str = ""  # must appear in the JSON error message of a 4xx
    golden: str | None = None  # seed image whose greedy golden captions the 200 must equal
    same_as: Callable[[], bytes] | None = field(default=None, repr=False)  # image captioned alike
    note: str = ""

    @property
    def statuses(self) -> tuple[int, ...]:
        return self.expect if isinstance(self.expect, tuple) else (self.expect,)

    def request(self) -> dict:
        """The request's keyword arguments (built once, then reused)."""
        if self.name not in _BUILT:
            _BUILT[self.name] = self.build()
        return _BUILT[self.name]


_BUILT: dict[str, dict] = {}


# ---------------------------------------------------------------------------------- images
def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@cache
def rgb(name: str) -> Image.Image:
    with Image.open(io.BytesIO(image_bytes(name))) as image:
        return image.convert("RGB")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def as_json(data: bytes, **options) -> dict:
    return {"json": {"image": b64(data), **GREEDY, **options}}


def frames(*names: str) -> list[Image.Image]:
    size = rgb(names[0]).size
    return [rgb(name).resize(size) for name in names]


@cache
def animated_gif() -> tuple[bytes, bytes]:
    """A 3-frame GIF, and its first frame (as the GIF quantised it) as a lossless PNG."""
    data = encode(frames("chelsea.png", "coffee.png", "rocket.jpg")[0], "GIF", save_all=True,
                  append_images=frames("chelsea.png", "coffee.png", "rocket.jpg")[1:], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as image:
        assert image.n_frames == 3
        first = encode(image.convert("RGB"), "PNG")
    return data, first


def png_48_bit(image: Image.Image) -> bytes:
    """An RGB PNG with 16 bits per channel (each 8-bit value v stored as v * 257): Pillow reads
    it back as 8-bit RGB, identical to the source."""
    width, height = image.size
    wide = np.asarray(image, dtype=np.uint8).astype(">u2") * 257  # (H, W, 3) big-endian 16-bit
    rows = np.concatenate([np.zeros((height, 1), np.uint8), wide.reshape(height, -1).view(np.uint8)], axis=1)
    rows = rows.tobytes()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 6))
            + png_chunk(b"IEND", b""))


def jpeg_with_claimed_size(data: bytes, width: int, height: int) -> bytes:
    """A real JPEG whose start-of-frame header claims another size (a JPEG 'bomb' header)."""
    out = bytearray(data)
    at = 2
    while at < len(out):
        assert out[at] == 0xFF, "not a JPEG marker"
        marker, length = out[at + 1], struct.unpack(">H", out[at + 2:at + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            out[at + 5:at + 9] = struct.pack(">HH", height, width)
            return bytes(out)
        at += 2 + length
    raise AssertionError("no SOF marker")


def progressive_jpeg(repeats_of_last_scan: int = 0) -> bytes:
    """rocket.jpg re-encoded progressive (10 scans), its last scan repeated: each repeat is a
    valid refinement pass over the whole image that the decoder runs (a 'scan bomb')."""
    data = encode(rgb("rocket.jpg"), "JPEG", progressive=True, quality=90)
    last_scan, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * repeats_of_last_scan + data[end:]


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(side: int) -> bytes:
    """tests/unit/test_image.py's real 1-bit side x side PNG (imported when needed: it pulls in torch)."""
    from tests.unit.test_image import png_bomb as build

    return build(side)


def png_header_only(width: int, height: int) -> bytes:
    from tests.unit.test_image import png_header_only as build

    return build(width, height)


def png_bomb_rect(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of width x height (tiny: rows of zeros compress ~1000:1)."""
    row = b"\0" * (1 + (width + 7) // 8)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(row * height, 9))
            + png_chunk(b"IEND", b""))


def random_bytes(size: int, seed: int = 5) -> bytes:
    data = random.Random(seed).randbytes(size)
    return b"\x00" + data[1:]  # never '{' or '[' first: that would be read as JSON


def deep_json(depth: int = 100_000) -> bytes:
    return b'{"image": ' + b"[" * depth + b"]" * depth + b"}"


# ---------------------------------------------------------------------------------- corpus
def chelsea_png() -> bytes:
    return image_bytes("chelsea.png")


def rocket_jpg() -> bytes:
    return image_bytes("rocket.jpg")


def grey() -> Image.Image:
    return rgb("chelsea.png").convert("L")


def grey16() -> Image.Image:
    """The grey image on the full 16-bit range (v * 257): the handler maps it back to v exactly."""
    image = Image.fromarray(np.asarray(grey(), dtype=np.uint16) * 257)
    assert image.mode.startswith("I;16"), image.mode
    return image


def with_random_alpha() -> Image.Image:
    image = rgb("chelsea.png").copy()
    width, height = image.size
    image.putalpha(Image.frombytes("L", image.size, random.Random(1).randbytes(width * height)))
    return image


def multi_frame(fmt: str) -> bytes:
    first, *rest = frames("chelsea.png", "coffee.png")
    return encode(first, fmt, save_all=True, append_images=rest)


def raw(data: bytes, content_type: str = "application/octet-stream") -> dict:
    return {"data": data, "headers": {"Content-Type": content_type}}


def upload(field_name: str, filename: str, data: bytes, content_type: str, **form) -> dict:
    return {"files": {field_name: (filename, data, content_type)}, "data": {k: str(v) for k, v in form.items()}}


def with_options(**options):
    """A builder: the chelsea PNG as JSON with greedy options and these overrides (encoded here,
    not by requests, whose encoder refuses NaN and Infinity; Python's json module reads them)."""
    return lambda: raw(json.dumps(as_json(chelsea_png(), **options)["json"]).encode(), "application/json")


def option_case(name: str, needle: str, **options) -> Case:
    return Case(name, with_options(**options), 400, needle)


@cache
def corpus() -> tuple[Case, ...]:
    """Every case; cheap to call (requests are built on first use)."""
    limit = f"the limit is {MAX_PIXELS}"
    cases = [
        # --- bodies that are not images
        Case("empty body", lambda: raw(b""), 400, "empty"),
        Case("random bytes (4 KB)", lambda: raw(random_bytes(4096)), 400, "not a recognised image"),
        Case("plain text", lambda: raw(b"this is a caption, not an image\n", "text/plain"), 400,
             "not a recognised image (32 bytes); it arrived as text"),
        Case("JSON string body (base64 without the object)", lambda: raw(b'"' + b64(b"hello world").encode() + b'"',
                                                                      "application/json"), 400, "it arrived as text"),
        Case("ELF executable header", lambda: raw(b"\x7fELF" + bytes(60)), 400, "not a recognised image"),
        Case("truncated JPEG (first half)", lambda: raw(rocket_jpg()[: len(rocket_jpg()) // 2]), 400,
             "truncated or corrupt"),
        Case("truncated PNG (first half)", lambda: raw(chelsea_png()[: len(chelsea_png()) // 2]), 400,
             "truncated or corrupt"),
        Case("PNG signature and header only", lambda: raw(chelsea_png()[:33]), 400, "not a recognised image"),
        # --- valid images with a wrong name or content type: the content decides
        Case("PNG as a raw body declared image/jpeg", lambda: raw(chelsea_png(), "image/jpeg"), 200,
             note="raw body: default options (2 sampled captions per style)"),
        Case("PNG uploaded as chelsea.jpg, image/jpeg",
             lambda: upload("data", "chelsea.jpg", chelsea_png(), "image/jpeg", **GREEDY), 200, golden="chelsea.png"),
        Case("PNG uploaded declared text/plain",
             lambda: upload("file", "x.txt", chelsea_png(), "text/plain", **GREEDY), 200, golden="chelsea.png"),
        Case("PNG uploaded declared application/json",
             lambda: upload("data", "x.json", chelsea_png(), "application/json", **GREEDY), 200, golden="chelsea.png"),
        Case("JSON body sent as application/octet-stream",
             lambda: raw(json.dumps(as_json(chelsea_png())["json"]).encode()), 200, golden="chelsea.png"),
        Case("JPEG as a base64 data: URL",
             lambda: {"json": {**GREEDY, "image": "data:image/jpeg;base64," + b64(rocket_jpg())}}, 200,
             golden="rocket.jpg"),
        # --- unusual but valid images: they must caption
        Case("animated GIF (3 frames)", lambda: as_json(animated_gif()[0]), 200,
             same_as=lambda: animated_gif()[1], note="captioned like its first frame"),
        Case("animated PNG (2 frames)", lambda: as_json(multi_frame("PNG")), 200, golden="chelsea.png",
             note="first frame"),
        Case("multi-page TIFF (2 pages)", lambda: as_json(multi_frame("TIFF")), 200, golden="chelsea.png",
             note="first page"),
        Case("48-bit RGB PNG (16 bits per channel)", lambda: as_json(png_48_bit(rgb("chelsea.png"))), 200,
             golden="chelsea.png"),
        Case("I;16 PNG (16-bit grey)", lambda: as_json(encode(grey16(), "PNG")), 200,
             same_as=lambda: encode(grey(), "PNG"), note="captioned like its 8-bit version"),
        Case("I;16 TIFF (16-bit grey)", lambda: as_json(encode(grey16(), "TIFF")), 200,
             same_as=lambda: encode(grey(), "PNG")),
        Case("CMYK JPEG", lambda: as_json(encode(rgb("chelsea.png").convert("CMYK"), "JPEG", quality=95)), 200),
        Case("CMYK TIFF", lambda: as_json(encode(rgb("chelsea.png").convert("CMYK"), "TIFF")), 200),
        Case("LA PNG (grey + alpha)", lambda: as_json(encode(grey().convert("LA"), "PNG")), 200,
             same_as=lambda: encode(grey(), "PNG"), note="alpha dropped"),
        Case("RGBA PNG (random alpha)", lambda: as_json(encode(with_random_alpha(), "PNG")), 200,
             golden="chelsea.png", note="alpha dropped"),
        Case("P PNG (palette)", lambda: as_json(encode(rgb("chelsea.png").convert("P"), "PNG")), 200),
        Case("1-bit PNG", lambda: as_json(encode(grey().convert("1"), "PNG")), 200),
        Case("float TIFF of one value outside 0..1 (no range to stretch)",
             lambda: as_json(encode(Image.new("F", (64, 48), 70000.0), "TIFF")), 200,
             same_as=lambda: encode(Image.new("L", (64, 48), 255), "PNG"), note="saturated to white"),
        Case("1x1 image", lambda: as_json(encode(Image.new("RGB", (1, 1), (200, 30, 30)), "PNG")), 200),
        Case("10000x20 strip", lambda: as_json(encode(rgb("chelsea.png").resize((10000, 20)), "PNG")), 200),
        Case("20x10000 strip", lambda: as_json(encode(rgb("chelsea.png").resize((20, 10000)), "JPEG")), 200),
        Case("progressive JPEG (10 scans)", lambda: as_json(progressive_jpeg()), 200),
        # --- decompression bombs: refused from the header, before any pixel is decoded
        Case("PNG bomb 30000x30000 (real 1-bit PNG)", lambda: as_json(png_bomb(30000)), 400,
             "900000000 pixels; " + limit),
        Case("PNG header claiming 30000x30000", lambda: as_json(png_header_only(30000, 30000)), 400,
             "900000000 pixels; " + limit),
        Case("PNG 8000x6000 = 48 MP (over max_pixels, under Pillow's limit)",
             lambda: as_json(png_bomb_rect(8000, 6000)), 400, "48000000 pixels; " + limit),
        Case("progressive JPEG with its last scan repeated 200 times (a scan bomb)",
             lambda: as_json(progressive_jpeg(200)), 400, "more than 100 scans"),
        Case("JPEG header claiming 65000x65000", lambda: as_json(jpeg_with_claimed_size(rocket_jpg(), 65000, 65000)),
             400, "decompression bomb"),
        # --- broken JSON and base64
        Case("malformed JSON", lambda: raw(b'{"image": "abc', "application/json"), 400, "malformed JSON"),
        Case("JSON array", lambda: {"json": [b64(chelsea_png())]}, 400, "must be an object"),
        Case("JSON null", lambda: raw(b"null", "application/json"), 400, "got null"),
        Case("JSON 100000 levels deep", lambda: raw(deep_json(), "application/json"), 400, "malformed JSON"),
        Case("JSON integer of 5000 digits",
             lambda: raw(b'{"image": "x", "seed": ' + b"9" * 5000 + b"}", "application/json"), 400, "malformed JSON"),
        Case("JSON without 'image'", lambda: {"json": {"styles": ["concise"]}}, 400, "'image'"),
        Case("'image' is a number", lambda: {"json": {"image": 12345}}, 400, "base64 string"),
        Case("bad base64", lambda: {"json": {"image": "%%%not-base64%%%"}}, 400, "not valid base64"),
        Case("base64 of text", lambda: {"json": {"image": b64(b"hello world"), **GREEDY}}, 400,
             "not a recognised image"),
        Case("data: URL without ;base64", lambda: {"json": {"image": "data:image/png," + b64(chelsea_png())}}, 400,
             "must be base64-encoded"),
        Case("two image fields (multipart data + file)",
             lambda: {"files": {"data": ("a.png", chelsea_png(), "image/png"),
                                "file": ("b.png", chelsea_png(), "image/png")}}, 400, "one image per request"),
        Case("multipart without an image field", lambda: {"files": {"styles": (None, "concise")}}, 400, "no image"),
        Case("multipart option that is not UTF-8",
             lambda: {"files": {"data": ("a.png", chelsea_png(), "image/png"), "styles": (None, b"\xff\xfe")}}, 400,
             "not valid UTF-8"),
        Case("duplicate styles in a form field",
             lambda: upload("data", "a.png", chelsea_png(), "image/png", styles="narrative,narrative"), 400,
             "listed twice"),
        Case("bad option in a form field",
             lambda: upload("data", "a.png", chelsea_png(), "image/png", num_captions="lots"), 400,
             "'num_captions' must be a number"),
        # --- unknown fields, wrong types, out-of-range options, duplicate styles (JSON)
        option_case("unknown field", "unknown option(s): 'flavour'", flavour="salty"),
        option_case("num_captions a string", "'num_captions' must be a number", num_captions="two"),
        option_case("num_captions a boolean", "'num_captions' must be a number", num_captions=True),
        option_case("num_captions 0", "'num_captions' must be between 1 and 8", num_captions=0),
        option_case("num_captions 9 (limit 8)", "'num_captions' must be between 1 and 8", num_captions=9),
        option_case("num_captions 2.5", "must be an integer", num_captions=2.5),
        option_case("temperature -1", "'temperature' must be between", temperature=-1),
        option_case("temperature NaN", "'temperature' must be finite", temperature=float("nan")),
        option_case("temperature Infinity", "'temperature' must be finite", temperature=float("inf")),
        option_case("temperature a list", "'temperature' must be a number", temperature=[1]),
        option_case("top_p 1.5", "'top_p' must be between", top_p=1.5),
        option_case("top_k 2.5", "'top_k' must be an integer", top_k=2.5),
        option_case("repetition_penalty 11", "'repetition_penalty' must be between", repetition_penalty=11),
        option_case("repetition_penalty 0 (it divides scores)", "'repetition_penalty' must be between 0.01",
                    repetition_penalty=0),
        option_case("no_repeat_ngram_size 9", "'no_repeat_ngram_size' must be between", no_repeat_ngram_size=9),
        option_case("max_new_tokens 0", "'max_new_tokens' must be between 1", max_new_tokens=0),
        option_case(f"max_new_tokens {TINY_MAX_NEW_TOKENS + 1} (model cap {TINY_MAX_NEW_TOKENS})",
                    f"'max_new_tokens' must be between 1 and {TINY_MAX_NEW_TOKENS}",
                    max_new_tokens=TINY_MAX_NEW_TOKENS + 1),
        option_case("max_new_tokens 10**6", "'max_new_tokens' must be between", max_new_tokens=10**6),
        option_case("seed -1", "'seed' must be between 0", seed=-1),
        option_case("seed 2**64", "'seed' must be between 0", seed=2**64),
        option_case("seed 10**400", "'seed' must be between 0", seed=10**400),
        option_case("styles a number", "'styles' must be a non-empty list", styles=5),
        option_case("styles empty", "'styles' must be a non-empty list", styles=[]),
        option_case("styles [1]", "'styles' entries must be strings", styles=[1]),
        option_case("unknown style", "unknown style 'poetic'", styles=["poetic"]),
        option_case("duplicate styles", "style 'concise' is listed twice", styles=["concise", "concise"]),
        option_case("duplicate styles, other case", "style 'concise' is listed twice", styles=["Concise", "concise "]),
    ]
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return tuple(cases)


# Requests whose error message would exceed max_response_size (1 MiB) if it echoed the client's
# text: sent by their own test in test_reliability.py, last in the module, because that failure
# restarts the worker and would spoil the corpus's batches.
ECHO_BYTES = 1_500_000
ECHO_CASES = (
    Case("unknown style of 1.5 MB", lambda: {"json": {"image": b64(image_bytes("coffee.png")), **GREEDY,
                                                      "styles": ["x" * ECHO_BYTES]}}, 400, "unknown style"),
    Case("unknown option name of 1.5 MB", lambda: {"json": {"image": b64(image_bytes("coffee.png")), **GREEDY,
                                                            "y" * ECHO_BYTES: 1}}, 400, "unknown option"),
)


def by_name(name: str) -> Case:
    return next(case for case in corpus() if case.name == name)


def valid_request(name: str = "chelsea.png") -> dict:
    """A greedy JSON request whose answer is the golden captions of ``name``."""
    return as_json(image_bytes(name))


# ---------------------------------------------------------------------------------- archive
ONE_THREAD_ARCHIVE = "captioner-1t"


def one_thread_archive(model_store: Path, name: str = ONE_THREAD_ARCHIVE, handler_settings: dict | None = None,
                       **top_level) -> str:
    """``<name>.mar`` in the model store: the seed-tiny archive with ``handler.threads: 1`` (the
    test host is small and shared; the session archive uses every core), any other ``handler:``
    settings given, and any top-level model-config.yaml keys given (e.g. ``responseTimeout=5``);
    float32 like the session archive (`seed_model_config`). Built once per store."""
    target = Path(model_store) / f"{name}.mar"
    if not target.is_file():
        from export import build_archive
        from tests.e2e.seed import SEED, seed_model_config

        with tempfile.TemporaryDirectory() as folder:
            model_config = seed_model_config(Path(folder), dict(threads=1, **(handler_settings or {})), **top_level)
            build_archive(SEED / "weights.pt", SEED / "config.json", model_name=name,
                          output=model_store, model_config=model_config, progress=lambda _line: None)
    return target.name
