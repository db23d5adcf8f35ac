"""Tests of model/image.py: golden parity with the original transform, and hostile or odd images.

Every test image except the shared fixtures is generated here, in memory.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageFile

from model.image import (
    DEFAULT_MAX_PIXELS,
    MAX_JPEG_SCANS,
    ImageError,
    center_crop,
    decode_image,
    image_to_uint8_tensor,
    jpeg_scan_count,
    limit_aspect_ratio,
    load_pixel_values,
    normalize,
    resize_shorter_side,
    resized_size,
    to_pixel_values,
    to_uint8_pixels,
)

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures"
PREPROCESS_DIR = FIXTURES / "preprocess"
SEED_TINY_DIR = FIXTURES / "seed-tiny"
TOLERANCE = 0.02  # about one uint8 step (0.017) in normalised units
# Against the original transform's goldens: the same numbers (max difference 0 with PyTorch's
# AVX-512, AVX2 and default CPU kernels); the slack allows only float rounding.
GOLDEN_TOLERANCE = 1e-6

RED, BLUE = (220, 20, 20), (20, 20, 220)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def noisy_rgb(width: int = 64, height: int = 48) -> Image.Image:
    return Image.frombytes("RGB", (width, height), bytes((i * 97 + i // 7) % 256 for i in range(width * height * 3)))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_only(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def png_bomb(side: int, rows_per_segment: int = 1000) -> bytes:
    """A valid all-black 1-bit PNG of side x side pixels in ~100 KB for side 30000.

    The zlib stream repeats one fully flushed deflate segment instead of compressing the
    whole 112 MB of scanlines, so building it takes milliseconds.
    """
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte + packed bits
    segment_compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = segment_compressor.compress(row * rows_per_segment) + segment_compressor.flush(zlib.Z_FULL_FLUSH)
    full_segments, rest = divmod(side, rows_per_segment)
    tail_compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = tail_compressor.compress(row * rest) + tail_compressor.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(side):
        adler = zlib.adler32(row, adler)
    stream = b"\x78\xda" + segment * full_segments + tail + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")


@pytest.fixture
def forbid_pixel_decoding(monkeypatch):
    def refuse(self):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def close_to(pixel, colour, slack=40) -> bool:
    return all(abs(a - b) <= slack for a, b in zip(pixel, colour))


# --- golden parity --------------------------------------------------------------------


def preprocess_golden() -> dict:
    return torch.load(PREPROCESS_DIR / "preprocess_golden.pt", weights_only=True)


def seed_tiny_images() -> dict:
    return torch.load(SEED_TINY_DIR / "golden.pt", weights_only=True)["images"]


@pytest.mark.parametrize("name", sorted(p.name for p in (PREPROCESS_DIR / "images").iterdir()))
def test_preprocess_matches_original_transform_at_384(name):
    expected = preprocess_golden()[name]["pixel_values"]
    actual = load_pixel_values(PREPROCESS_DIR / "images" / name, 384)
    assert actual.shape == expected.shape == (3, 384, 384)
    assert actual.dtype == torch.float32
    max_diff = (actual - expected).abs().max().item()
    assert max_diff <= GOLDEN_TOLERANCE, f"{name}: max abs difference {max_diff:.6f} > {GOLDEN_TOLERANCE}"


@pytest.mark.parametrize("name", sorted(p.name for p in (SEED_TINY_DIR / "images").iterdir()))
def test_preprocess_matches_seed_tiny_golden_at_64(name):
    expected = seed_tiny_images()[name]["pixel_values"]
    actual = load_pixel_values(SEED_TINY_DIR / "images" / name, 64)
    assert actual.shape == expected.shape == (3, 64, 64)
    max_diff = (actual - expected).abs().max().item()
    assert max_diff <= GOLDEN_TOLERANCE, f"{name}: max abs difference {max_diff:.6f} > {GOLDEN_TOLERANCE}"


@pytest.mark.parametrize("name", sorted(p.name for p in (PREPROCESS_DIR / "images").iterdir()))
def test_plain_images_decode_like_pillow_convert_rgb(name):
    path = PREPROCESS_DIR / "images" / name
    expected = Image.open(path).convert("RGB")
    actual = decode_image(path.read_bytes())
    assert actual.mode == "RGB" and actual.size == expected.size
    assert actual.tobytes() == expected.tobytes()


def test_uint8_pixels_normalised_later_in_a_batch_are_the_same_numbers():
    """The GPU handler path: uint8 images stacked, then normalised together (on the device)."""
    images = [decode_image(p.read_bytes()) for p in sorted((PREPROCESS_DIR / "images").iterdir())[:4]]
    uint8 = torch.stack([to_uint8_pixels(image, 384) for image in images])
    assert uint8.dtype == torch.uint8 and uint8.shape == (len(images), 3, 384, 384) and uint8.is_contiguous()
    assert torch.equal(normalize(uint8), torch.stack([to_pixel_values(image, 384) for image in images]))


def test_load_pixel_values_accepts_bytes_and_paths():
    path = SEED_TINY_DIR / "images" / "coffee.png"
    assert torch.equal(load_pixel_values(path, 64), load_pixel_values(path.read_bytes(), 64))
    assert torch.equal(load_pixel_values(str(path), 64), load_pixel_values(bytearray(path.read_bytes()), 64))


# --- the transform's pieces ------------------------------------------------------------


@pytest.mark.parametrize(
    "height, width, expected",
    [(400, 600, (384, 576)), (640, 427, (575, 384)), (200, 300, (384, 576)), (384, 384, (384, 384)), (20, 10000, (384, 192000))],
)
def test_resized_size_follows_torchvision_rule(height, width, expected):
    assert resized_size(height, width, 384) == expected


def test_center_crop_rounds_offsets_like_torchvision():
    pixels = torch.arange(5 * 8, dtype=torch.uint8).view(1, 5, 8).expand(3, 5, 8)
    cropped = center_crop(pixels, 2)
    # top = round(1.5) = 2 (banker's rounding), left = round(3.0) = 3
    assert torch.equal(cropped[0], pixels[0, 2:4, 3:5])


def test_resize_keeps_an_image_already_at_size():
    pixels = image_to_uint8_tensor(noisy_rgb(384, 400))
    assert resize_shorter_side(pixels, 384) is pixels


def test_normalize_uses_imagenet_statistics():
    white = torch.full((3, 1, 1), 255, dtype=torch.uint8)
    expected = torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225])
    assert torch.allclose(normalize(white).flatten(), expected)


# --- odd sizes ---------------------------------------------------------------------------


def test_one_pixel_image_becomes_a_uniform_tensor():
    image = decode_image(encode(Image.new("RGB", (1, 1), RED)))
    values = to_pixel_values(image, 384)
    assert values.shape == (3, 384, 384)
    expected = normalize(torch.tensor(RED, dtype=torch.uint8).view(3, 1, 1)).flatten()
    assert torch.allclose(values.amax(dim=(1, 2)), expected, atol=TOLERANCE)
    assert torch.allclose(values.amin(dim=(1, 2)), expected, atol=TOLERANCE)


@pytest.mark.parametrize("size", [(10000, 20), (20, 10000), (5000, 1)])
def test_extreme_strips_are_cropped_quickly(size):
    image = decode_image(encode(Image.new("RGB", size, BLUE)))
    started = time.monotonic()
    values = to_pixel_values(image, 384)
    assert values.shape == (3, 384, 384)
    assert time.monotonic() - started < 5
    expected = normalize(torch.tensor(BLUE, dtype=torch.uint8).view(3, 1, 1)).flatten()
    assert torch.allclose(values.mean(dim=(1, 2)), expected, atol=TOLERANCE)


def test_aspect_crop_keeps_the_centre_at_ten_to_one():
    strip = Image.new("RGB", (10000, 20))
    strip.paste(RED, (4900, 0, 5100, 20))  # exactly the centre 10:1 region
    for image in (strip, strip.transpose(Image.Transpose.ROTATE_90)):
        cropped = limit_aspect_ratio(image)
        assert sorted(cropped.size) == [20, 200]
        assert cropped.getcolors() == [(200 * 20, RED)]
    photo = Image.new("RGB", (200, 20))  # 10:1 already: the same object back
    assert limit_aspect_ratio(photo) is photo


def test_aspect_crop_does_not_change_the_centre_of_a_moderate_strip():
    width, height = 1000, 10  # 100:1, so the source is cropped to 100x10 first
    image = Image.new("RGB", (width, height))
    image.putdata([((x * 255) // (width - 1), (y * 25) % 256, (x * 7) % 256) for y in range(height) for x in range(width)])
    unbounded = normalize(center_crop(resize_shorter_side(image_to_uint8_tensor(image), 64), 64))
    max_diff = (to_pixel_values(image, 64) - unbounded).abs().max().item()
    assert max_diff <= TOLERANCE, f"max abs difference {max_diff:.6f}"


# --- orientation, frames, modes --------------------------------------------------------


def test_exif_orientation_is_applied():
    landscape = Image.new("RGB", (64, 32), RED)
    landscape.paste(BLUE, (32, 0, 64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    image = decode_image(encode(landscape, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (32, 64)
    assert close_to(image.getpixel((16, 8)), RED)  # the left edge is now on top
    assert close_to(image.getpixel((16, 56)), BLUE)


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert close_to(decode_image(data).getpixel((8, 8)), RED, slack=10)


def test_first_page_of_a_multi_page_tiff():
    pages = [Image.new("RGB", (16, 16), BLUE), Image.new("RGB", (16, 16), RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data).getpixel((8, 8)) == BLUE


def sixteen_bit_ramp(mode: str) -> Image.Image:
    levels = [257 * v for v in (0, 1, 128, 255)]
    order = ">" if mode == "I;16B" else "<"
    return Image.frombytes(mode, (4, 1), struct.pack(f"{order}4H", *levels))


@pytest.mark.parametrize("mode, fmt", [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF")])
def test_sixteen_bit_images_are_scaled_not_clipped(mode, fmt):
    image = decode_image(encode(sixteen_bit_ramp(mode), fmt))
    assert image.mode == "RGB"
    assert [image.getpixel((x, 0)) for x in range(4)] == [(v, v, v) for v in (0, 1, 128, 255)]


@pytest.mark.parametrize(
    "values, expected",
    [((0, 100, 255, 7), (0, 100, 255, 7)), ((0, 257, 65535, 32896), (0, 1, 255, 128)), ((-10, 0, 10, 1000000), (0, 0, 0, 255)),
     ((-5,) * 4, (0,) * 4), ((100000,) * 4, (255,) * 4)],
)
def test_32_bit_integer_images_are_scaled_by_their_range(values, expected):
    image = Image.frombytes("I", (4, 1), struct.pack("=4i", *values))
    decoded = decode_image(encode(image, "TIFF"))
    assert [decoded.getpixel((x, 0))[0] for x in range(4)] == list(expected)


@pytest.mark.parametrize(
    "values, expected",
    [((0.0, 0.5, 1.0, 0.25), (0, 128, 255, 64)), ((0.0, 2.0, 255.0, 128.0), (0, 2, 255, 128)), ((float("nan"), 0.0, 1.0, 1.0), (0, 0, 255, 255)),
     ((-1.0,) * 4, (0,) * 4), ((70000.0,) * 4, (255,) * 4)],
)
def test_float_images_are_scaled_by_their_range(values, expected):
    image = Image.frombytes("F", (4, 1), struct.pack("=4f", *values))
    decoded = decode_image(encode(image, "TIFF"))
    assert [decoded.getpixel((x, 0))[0] for x in range(4)] == list(expected)


def palette_image(with_transparency: bool) -> Image.Image:
    image = noisy_rgb(32, 24).quantize(16)
    if with_transparency:
        image.info["transparency"] = 3
    return image


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: noisy_rgb().convert("CMYK"), "JPEG"),
        (lambda: noisy_rgb().convert("CMYK"), "TIFF"),
        (lambda: noisy_rgb().convert("LA"), "PNG"),
        (lambda: noisy_rgb().convert("RGBA"), "PNG"),
        (lambda: noisy_rgb().convert("L"), "PNG"),
        (lambda: noisy_rgb().convert("1"), "PNG"),
        (lambda: noisy_rgb().convert("YCbCr"), "JPEG"),
        (lambda: palette_image(False), "PNG"),
        (lambda: palette_image(True), "PNG"),
        (lambda: palette_image(True), "GIF"),
    ],
    ids=["cmyk-jpeg", "cmyk-tiff", "la", "rgba", "l", "1-bit", "ycbcr-jpeg", "p", "p-transparent", "gif-transparent"],
)
def test_other_modes_decode_like_pillow_convert_rgb(make, fmt):
    data = encode(make(), fmt)
    expected = Image.open(io.BytesIO(data)).convert("RGB")
    actual = decode_image(data)
    assert actual.mode == "RGB" and actual.size == expected.size
    assert actual.tobytes() == expected.tobytes()


def test_rgba_keeps_colour_under_transparent_pixels_like_the_original():
    image = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    assert decode_image(encode(image)).getpixel((0, 0)) == (10, 200, 30)


# --- refusals ------------------------------------------------------------------------------


def test_decompression_bomb_is_refused_before_decoding(forbid_pixel_decoding):
    data = png_bomb(30000)
    assert len(data) < 200_000
    started = time.monotonic()
    with pytest.raises(ImageError, match=r"900000000 pixels; the limit is 40000000"):
        decode_image(data)
    assert time.monotonic() - started < 2


def test_image_over_the_configured_limit_is_refused_with_its_size(forbid_pixel_decoding):
    with pytest.raises(ImageError, match=r"image is 8000x8000 = 64000000 pixels; the limit is 1000000"):
        decode_image(png_bomb(8000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match=r"image is 8000x8000 = 64000000 pixels; the limit is 40000000"):
        decode_image(png_header_only(8000, 8000))


def test_pillow_bomb_threshold_still_applies_with_a_higher_limit(forbid_pixel_decoding):
    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert pillow_limit is not None and 10000 * 10000 > pillow_limit
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageError, match=rf"10000x10000 = 100000000 pixels; the limit is {pillow_limit}$"):
            decode_image(png_header_only(10000, 10000), max_pixels=10**9)


def test_pillow_bomb_warning_turned_into_an_error_is_still_an_image_error(forbid_pixel_decoding):
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="100000000 pixels; the limit is 40000000"):
            decode_image(png_header_only(10000, 10000))


def progressive_jpeg(image: Image.Image, repeats_of_last_scan: int = 0, **options) -> bytes:
    """A progressive JPEG whose last scan is repeated (each repeat a valid pass the decoder runs)."""
    data = encode(image, "JPEG", progressive=True, quality=90, **options)
    last_scan, end = data.rindex(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:end] + data[last_scan:end] * repeats_of_last_scan + data[end:]


@pytest.mark.parametrize("mode, options, scans", [("RGB", {}, 10), ("L", {}, 6), ("RGB", {"restart_marker_blocks": 1}, 10)])
def test_jpeg_scans_are_counted_from_the_markers(mode, options, scans):
    """libjpeg's progressive script (10 scans in colour, 6 in grey); restart markers and stuffed
    0xFF bytes inside a scan are not markers; a baseline JPEG has one scan."""
    noise = Image.effect_noise((96, 64), 80).convert(mode)
    assert jpeg_scan_count(progressive_jpeg(noise, **options), MAX_JPEG_SCANS) == scans
    assert jpeg_scan_count(encode(noise, "JPEG", quality=95), MAX_JPEG_SCANS) == 1
    assert jpeg_scan_count(progressive_jpeg(noise, 500), 20) == 21  # counting stops past the limit


def test_a_jpeg_scan_bomb_is_refused_before_decoding(forbid_pixel_decoding):
    """Pillow decodes any number of scans, each a pass over the whole image: repeats of a
    progressive JPEG's last scan cost a few bytes each and seconds of decoding per thousand."""
    image = Image.effect_noise((96, 64), 80).convert("RGB")
    with pytest.raises(ImageError, match=f"JPEG has more than {MAX_JPEG_SCANS} scans"):
        decode_image(progressive_jpeg(image, MAX_JPEG_SCANS))


def test_a_progressive_jpeg_within_the_scan_limit_decodes():
    image = Image.effect_noise((96, 64), 80).convert("RGB")
    assert decode_image(progressive_jpeg(image)).tobytes() == Image.open(io.BytesIO(progressive_jpeg(image))).tobytes()
    assert decode_image(progressive_jpeg(image, MAX_JPEG_SCANS - 10)).size == (96, 64)  # 100 scans: allowed


def test_small_bomb_within_a_raised_limit_decodes():
    image = decode_image(png_bomb(2500), max_pixels=10_000_000)
    assert image.size == (2500, 2500) and image.getextrema() == ((0, 0), (0, 0), (0, 0))


def test_default_limit():
    assert DEFAULT_MAX_PIXELS == 40_000_000


def test_empty_body():
    with pytest.raises(ImageError, match="empty image body"):
        decode_image(b"")


@pytest.mark.parametrize(
    "data",
    [
        bytes(range(256)) * 4,
        b"hello, world",
        b'{"image": "abc"}',
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        b"\x89PNG\r\n\x1a\n",
    ],
    ids=["random", "text", "json", "eps", "png-signature-only"],
)
def test_not_an_image(data):
    with pytest.raises(ImageError, match=rf"not a recognised image \({len(data)} bytes\)"):
        decode_image(data)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF"])
def test_truncated_images(fmt):
    data = encode(noisy_rgb(128, 96), fmt)
    with pytest.raises(ImageError, match="truncated or corrupt image|not a recognised image"):
        decode_image(data[: len(data) // 2])


def test_truncated_jpeg_message():
    data = encode(noisy_rgb(128, 96), "JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt image: .*truncated"):
        decode_image(data[: len(data) // 2])


def test_corrupt_png_checksum():
    data = bytearray(encode(noisy_rgb(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF
    with pytest.raises(ImageError, match="truncated or corrupt image"):
        decode_image(bytes(data))


@pytest.mark.parametrize("width, height", [(0, 10), (10, 0)])
def test_zero_sized_image(width, height):
    with pytest.raises(ImageError):
        decode_image(png_header_only(width, height))


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_out_of_memory_is_not_reported_as_a_bad_image(monkeypatch):
    def out_of_memory(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", out_of_memory)
    with pytest.raises(MemoryError):
        decode_image(encode(noisy_rgb()))


def smooth_photo(width: int, height: int) -> Image.Image:
    """A photo-like image (gradients, mild texture): what a draft decode is meant for."""
    ramp = torch.linspace(0, 1, width)[None, :, None] * torch.linspace(0, 1, height)[:, None, None]
    texture = torch.sin(torch.arange(width)[None, :, None] / 9.0) * torch.cos(torch.arange(height)[:, None, None] / 7.0)
    pixels = ramp * torch.tensor([200.0, 120.0, 60.0]) + texture * 30 + 20
    return Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy())


def test_a_large_jpeg_decoded_at_a_draft_scale_gives_nearly_the_same_pixels():
    """`draft_to`: libjpeg decodes at the largest reduction that keeps both sides >= draft_to
    (1600x1200 -> 800x600 for 384: 400x300 would be too small), and the resized pixels stay
    within a few levels of the full decode's."""
    data = encode(smooth_photo(1600, 1200), "JPEG", quality=90)
    drafted = decode_image(data, draft_to=384)
    assert drafted.size == (800, 600) and drafted.mode == "RGB"
    full, reduced = to_uint8_pixels(decode_image(data), 384), to_uint8_pixels(drafted, 384)
    difference = (full.int() - reduced.int()).abs().float()
    assert full.shape == reduced.shape == (3, 384, 384)
    assert 0 < difference.mean() < 1.5 and difference.max() <= 12
    assert decode_image(data, draft_to=100).size == (200, 150)  # 1/8, still >= 100 on both sides


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_draft_leaves_images_that_are_not_large_jpegs_alone(fmt):
    small = encode(smooth_photo(640, 480), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    assert torch.equal(image_to_uint8_tensor(decode_image(small, draft_to=384)),
                       image_to_uint8_tensor(decode_image(small)))  # a 1/2 scale would fall below 384
    large_png = encode(smooth_photo(1600, 1200), "PNG")
    assert decode_image(large_png, draft_to=384).size == (1600, 1200)  # only JPEG decoders scale


def test_the_pixel_limit_is_checked_before_any_draft(forbid_pixel_decoding):
    data = encode(smooth_photo(1600, 800), "JPEG", quality=90)
    with pytest.raises(ImageError, match="pixels"):  # the header's size is checked before any draft
        decode_image(data, max_pixels=1_000_000, draft_to=384)


def test_drafted_images_keep_their_exif_orientation():
    landscape = smooth_photo(1600, 800)
    landscape.paste(BLUE, (800, 0, 1600, 800))  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the right half goes to the bottom
    image = decode_image(encode(landscape, "JPEG", exif=exif.tobytes(), quality=95), draft_to=384)
    assert image.size == (400, 800)
    assert close_to(image.getpixel((200, 700)), BLUE)


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.99])
def test_a_truncated_large_jpeg_with_draft_is_an_image_error(cut):
    data = encode(smooth_photo(1600, 1200), "JPEG", quality=90)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode_image(data[: int(len(data) * cut)], draft_to=384)
