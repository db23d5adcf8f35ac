"""Decode untrusted image bytes and turn an image into the model's normalised pixel tensor.

``decode_image`` refuses what a client should be told about (``ImageError``, HTTP 400):
empty or unrecognised data, decompression bombs (checked from the header, before any
pixel is decoded), truncated or corrupt files. ``to_pixel_values`` reproduces the
original serving transform, torchvision v2
``ToImage -> Resize(size, BICUBIC, antialias=True) -> CenterCrop(size) ->
ToDtype(float32, scale=True) -> Normalize(ImageNet mean/std)``, with Pillow and torch only.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

DEFAULT_MAX_PIXELS = 40_000_000

# Longest side / shortest side beyond which the long side is centre-cropped before
# resizing (see `limit_aspect_ratio`).
MAX_ASPECT_RATIO = 10

# Decodable formats. Anything else (EPS, which would run Ghostscript, PDF, fonts, ...)
# is reported as not an image. Filtered against the installed Pillow at call time.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")
JPEG_FORMATS = ("JPEG", "MPO")  # an MPO (camera multi-picture file) is JPEG images

# Scans a JPEG may have. A progressive JPEG has about 10 (libjpeg's default script); Pillow sets
# no bound, and each scan costs a pass over the whole image: a 40-megapixel file whose last scan
# was repeated took 24 ms more per repeat (61 bytes each), so 1.5 MB of repeats would hold a
# decode thread for about 10 minutes (`responseTimeout`). At this bound, under 3 s.
MAX_JPEG_SCANS = 100
# The first marker after a scan's entropy-coded data: 0xFF (and any fill 0xFFs) followed by a
# byte that is not a stuffed 0x00 or a restart marker (0xD0-0xD7).
_MARKER_AFTER_SCAN = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")
_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # no length field
_SOS, _EOI = 0xDA, 0xD9

SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_DEPTH_MODES = SIXTEEN_BIT_MODES | {"I", "F"}


class ImageError(ValueError):
    """The request's image cannot be used (HTTP 400); the message says why."""


# ---------------------------------------------------------------------------------------
# Decoding


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, draft_to: int | None = None) -> Image.Image:
    """Decode ``data`` into an RGB image, upright according to its EXIF orientation.

    The pixel count in the header is checked against ``max_pixels`` (and Pillow's
    ``Image.MAX_IMAGE_PIXELS``, whichever is lower) before anything is decoded.
    Animated images (GIF, WebP, APNG) and multi-page TIFFs give their first frame.
    Alpha is dropped (not composited), like ``Image.convert("RGB")``, so plain RGB, RGBA,
    L and P images decode exactly as ``Image.open(f).convert("RGB")``; 16-bit and float
    images are scaled to 8 bits (see `high_depth_to_grey`).

    ``draft_to``: a JPEG at least twice that size on both sides is decoded at 1/2, 1/4 or 1/8
    scale by libjpeg itself (Pillow's ``draft``), still at least ``draft_to`` on both sides, so
    that resizing to it still only shrinks: a 12 MP photo decodes several times faster, with
    pixels that differ slightly from a full decode resized (see `handler.jpeg_draft`).
    """
    if not data:
        raise ImageError("empty image body")
    image = open_lazily(data, max_pixels)
    check_pixel_count(image.size, max_pixels)
    if image.format in JPEG_FORMATS and jpeg_scan_count(data, MAX_JPEG_SCANS) > MAX_JPEG_SCANS:
        raise ImageError(f"JPEG has more than {MAX_JPEG_SCANS} scans (a progressive JPEG has about 10)")
    try:
        if draft_to and image.format in JPEG_FORMATS:
            image.draft(image.mode, (draft_to, draft_to))
        image.load()
    except MemoryError:
        raise
    except Exception as error:  # any decoder failure on client data is a client error
        raise ImageError(f"truncated or corrupt image: {error}") from error
    image = upright(image)
    return to_rgb(image)


def open_lazily(data: bytes, max_pixels: int) -> Image.Image:
    """Identify the format and read the header only; no pixel data is decoded here.

    Pillow raises DecompressionBombError itself beyond twice ``Image.MAX_IMAGE_PIXELS``;
    below that it only warns, and `pixel_limit` refuses what it warns about. (No
    ``warnings.catch_warnings`` here: it is not thread-safe and the handler decodes in threads.)
    """
    formats = [name for name in ACCEPTED_FORMATS if name in registered_formats()]
    try:
        return Image.open(io.BytesIO(data), formats=formats)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(bomb_message(str(error), pixel_limit(max_pixels))) from error
    except Image.UnidentifiedImageError as error:
        raise ImageError(f"not a recognised image ({len(data)} bytes)") from error
    except MemoryError:
        raise
    except Exception as error:  # a plugin choking on a malformed header
        raise ImageError(f"truncated or corrupt image: {error}") from error


def jpeg_scan_count(data: bytes, limit: int) -> int:
    """The scans (SOS segments) of the JPEG's first image, counted from its markers without
    decoding anything, up to `limit` + 1. Malformed structure stops the count: the decoder
    reports it."""
    position, scans = 2, 0  # after SOI
    while position + 4 <= len(data) and scans <= limit:
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker == _EOI:
            break
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        position += 2 + int.from_bytes(data[position + 2 : position + 4], "big")  # marker + length field + payload
        if marker == _SOS:
            scans += 1
            after_scan = _MARKER_AFTER_SCAN.search(data, position)
            if after_scan is None:
                break
            position = after_scan.end() - 2  # the 0xFF just before the marker byte
    return scans


def registered_formats() -> set[str]:
    Image.init()
    return set(Image.OPEN)


def bomb_message(pillow_message: str, max_pixels: int) -> str:
    found = re.search(r"\((\d+) pixels\)", pillow_message)
    pixels = found.group(1) if found else "too many"
    return f"image is {pixels} pixels; the limit is {max_pixels} (possible decompression bomb)"


def pixel_limit(max_pixels: int) -> int:
    """``max_pixels``, but never above Pillow's own decompression-bomb threshold."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    return max_pixels if pillow_limit is None else min(max_pixels, pillow_limit)


def check_pixel_count(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    limit = pixel_limit(max_pixels)
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limit:
        raise ImageError(f"image is {width}x{height} = {width * height} pixels; the limit is {limit}")


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a corrupt EXIF block is ignored rather than fatal."""
    try:
        return ImageOps.exif_transpose(image)
    except MemoryError:
        raise
    except Exception:
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in HIGH_DEPTH_MODES:
        return high_depth_to_grey(image).convert("RGB")
    try:
        return image.convert("RGB")
    except MemoryError:
        raise
    except Exception as error:
        raise ImageError(f"unsupported image mode {image.mode}: {error}") from error


def high_depth_to_grey(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float greyscale image onto 8 bits.

    ``convert("RGB")`` would clip such values at 255 (a 16-bit photo turns white), so:
    16-bit modes divide by 257 (65535 -> 255); ``I`` and ``F`` keep values already in
    0..255, divide 0..65535 by 257, and stretch any other range to 0..255; ``F`` images in
    0..1 are multiplied by 255. NaN and infinities become 0. One float64 copy of the pixels,
    worked on in place (a 40-megapixel image: 320 MB, not five such tensors).
    """
    values = grey_values(image)
    scale_to_byte_range_(values, sixteen_bit=image.mode in SIXTEEN_BIT_MODES, unit_float=image.mode == "F")
    grey = values.round_().clamp_(0, 255).to(torch.uint8)
    return Image.frombytes("L", image.size, grey.numpy().tobytes())


def grey_values(image: Image.Image) -> torch.Tensor:
    """The pixels as float64 (height * width,), NaN and infinities as 0."""
    pixels = np.asarray(image)  # uint16, int32 or float32, in the mode's byte order
    values = torch.from_numpy(pixels.astype(np.float64).reshape(-1))
    del pixels
    return torch.nan_to_num_(values, nan=0.0, posinf=0.0, neginf=0.0)


def scale_to_byte_range_(values: torch.Tensor, *, sixteen_bit: bool, unit_float: bool) -> torch.Tensor:
    """In place: `values` onto 0..255 (`high_depth_to_grey`'s rules)."""
    if sixteen_bit:
        return values.div_(257.0)
    low, high = values.min().item(), values.max().item()
    if unit_float and 0.0 <= low and high <= 1.0:
        return values.mul_(255.0)
    if 0.0 <= low and high <= 255.0:
        return values
    if 0.0 <= low and high <= 65535.0:
        return values.div_(257.0)
    if high == low:  # one value outside 0..65535: no range to stretch, saturate it
        return values.clamp_(0.0, 255.0)
    return values.sub_(low).mul_(255.0 / (high - low))


# ---------------------------------------------------------------------------------------
# Preprocessing


def to_pixel_values(image: Image.Image, size: int) -> torch.Tensor:
    """float32 (3, size, size): the original torchvision v2 serving transform."""
    return normalize(to_uint8_pixels(image, size))


def to_uint8_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """uint8 (3, size, size), contiguous: the transform up to `normalize`, which can then run
    on the model's device (a quarter of the bytes to batch and copy there)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    pixels = image_to_uint8_tensor(limit_aspect_ratio(rgb))
    pixels = resize_shorter_side(pixels, size)
    return center_crop(pixels, size).contiguous()


def limit_aspect_ratio(image: Image.Image, max_ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """Centre-crop the long side of a very elongated image to ``max_ratio`` x the short side.

    Resizing a 10000x20 strip to a shorter side of 384 would make a 192000x384 image of
    which the centre crop keeps only 384x384. Cropping the source first to the same
    centre region (with a margin of several crop widths) bounds the memory, and changes the
    result only by sub-pixel resampling alignment. Images up to ``max_ratio``:1 (any photo)
    are untouched, so they match torchvision exactly.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if long <= short * max_ratio:
        return image
    keep = short * max_ratio
    start = (long - keep) // 2
    box = (start, 0, start + keep, height) if width > height else (0, start, width, start + keep)
    return image.crop(box)


def image_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 view of an RGB image (channels-last memory, like torchvision's ToImage)."""
    width, height = image.size
    flat = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return flat.view(height, width, 3).permute(2, 0, 1)


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int) rule: shorter side -> size, longer side -> int(size * long / short)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shorter_side(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bicubic resize of a uint8 (3, H, W) tensor, as torchvision does it on CPU.

    torch's native uint8 antialiased bicubic kernel (Pillow's a = -0.5 kernel, for up- and
    down-scaling) is what torchvision v2 dispatches to for uint8 on CPU; resizing in float
    instead differs by several uint8 steps.
    """
    height, width = pixels.shape[-2:]
    new_height, new_width = resized_size(height, width, size)
    if (new_height, new_width) == (height, width):
        return pixels
    resized = F.interpolate(
        pixels.unsqueeze(0), size=(new_height, new_width), mode="bicubic", align_corners=False, antialias=True
    )
    return resized[0]


def center_crop(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's CenterCrop for an image at least ``size`` on both sides."""
    height, width = pixels.shape[-2:]
    top = int(round((height - size) / 2.0))
    left = int(round((width - size) / 2.0))
    return pixels[:, top : top + size, left : left + size]


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float32 in [0, 1] -> ImageNet mean/std, on the pixels' device
    (multiplying by 1/255 as torchvision does: bit-exact; each step is one correctly rounded
    float32 operation, so a GPU gives the same numbers)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    return ((pixels.to(torch.float32) * (1.0 / 255.0) - mean) / std).contiguous()


def load_pixel_values(
    path_or_bytes: str | Path | bytes | bytearray, size: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Read an image file (or bytes), decode it and preprocess it: the CLI's one call."""
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
    else:
        data = Path(path_or_bytes).read_bytes()
    return to_pixel_values(decode_image(data, max_pixels), size)
