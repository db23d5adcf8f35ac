"""Turn one TorchServe request row into the image bytes and the raw caption options.

What TorchServe 0.12.0 puts in a row (one dict per request of the batch):

* The frontend (``InferenceRequestHandler.parseRequest``) sends a raw body as one
  parameter named ``"body"``; a multipart or url-encoded form as one parameter per field
  (file uploads keep their part's content type, plain fields have none); and the URL's
  query parameters as one parameter each -- but only on ``/models/{m}/invoke``,
  ``/invocations`` and the legacy ``/{m}/predict``: ``/predictions/{m}`` passes no query
  decoder, so ``?styles=...`` never reaches the handler there.
* The backend (``ts/protocol/otf_message_handler.py: _retrieve_input_data``) decodes a
  parameter whose content type is exactly ``application/json`` with ``json.loads`` (on
  failure it logs a warning and forwards the raw bytes: the batch is not failed), decodes
  ``text/*`` to ``str``, and leaves everything else as ``bytearray`` (query parameters and
  plain form fields included). ``ts/service.py: retrieve_data_for_inference`` then builds
  ``{name: value}``; a repeated name keeps its last value. Headers go to the context, not
  the row.
* ``/invocations?model_name=m`` also puts ``model_name`` in the row: routing, not an option.

Accepted request forms: the raw image as the body; a multipart form whose ``data`` or
``file`` field holds the image; a JSON object ``{"image": "<base64 or data: URL>", ...}``.
Option values are validated later by ``model.styles.make_plan``; here text values from the
URL or a form are only turned into numbers where they look like numbers.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

IMAGE_FIELDS = ("body", "data", "file")  # raw body; multipart field names (``file``: the original API's)
JSON_IMAGE_KEY = "image"
ROUTING_KEYS = frozenset({"model_name"})

NO_IMAGE_HINT = (
    "send the image as the request body (curl -T img.jpg, or --data-binary @img.jpg with "
    "-H 'Content-Type: application/octet-stream': curl's default url-encoded type mangles it), "
    "as multipart field 'data' or 'file', or as JSON {\"image\": \"<base64>\"}"
)

INTEGER_TEXT = re.compile(r"[+-]?[0-9]+")
DATA_URL = re.compile(r"data:([^,]*),", re.IGNORECASE)


class RequestError(ValueError):
    """The request is malformed (HTTP ``status``, 400 unless stated)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass
class ParsedRequest:
    image: bytes
    options: dict
    # The image arrived as text: a JSON string body, or a text/* part TorchServe decoded.
    sent_as_text: bool = False


TEXT_HINT = ("it arrived as text (a JSON string or a text/* body): send the image file's bytes, "
             "or JSON {\"image\": \"<base64>\"}")


def parse_request(row: dict) -> ParsedRequest:
    """Extract the image bytes and the options dict from one TorchServe row."""
    if not isinstance(row, dict):
        raise RequestError(f"malformed request ({type(row).__name__})")
    fields = {key: value for key, value in row.items() if key not in ROUTING_KEYS}
    image_field = find_image_field(fields)
    payload = fields.pop(image_field)
    url_and_form_options = {key: option_from_text(key, value) for key, value in fields.items()}
    image, body_options = image_and_options(payload, image_field)
    return ParsedRequest(image=image, options=merge_options(url_and_form_options, body_options),
                         sent_as_text=is_text(payload))


def is_text(payload) -> bool:
    """A payload TorchServe decoded as text (a text/* part, a JSON string body), not JSON."""
    return isinstance(payload, str) and not looks_like_json(payload[:64].encode("utf-8", "surrogatepass"))


def find_image_field(fields: dict) -> str:
    present = [name for name in IMAGE_FIELDS if name in fields]
    if not present:
        received = f" (received fields: {describe_keys(fields)})" if fields else ""
        raise RequestError(f"no image in the request{received}; {NO_IMAGE_HINT}")
    if len(present) > 1:
        raise RequestError(f"send one image per request; got fields {', '.join(present)}")
    return present[0]


def describe_keys(fields: dict, limit: int = 8, width: int = 40) -> str:
    names = [repr(str(key)[:width]) for key in list(fields)[:limit]]
    more = f" and {len(fields) - limit} more" if len(fields) > limit else ""
    return ", ".join(names) + more


def image_and_options(payload, field: str) -> tuple[bytes, dict]:
    """The image and any options carried by the image field itself (a JSON body)."""
    if isinstance(payload, dict):
        return image_from_json_object(payload)
    if isinstance(payload, str):
        # a text/* part TorchServe decoded, or a JSON string (which may hold lone surrogates)
        payload = payload.encode("utf-8", "surrogatepass")
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = bytes(payload)
        if not payload:
            raise RequestError(f"empty request {'body' if field == 'body' else f'field {field!r}'}")
        if looks_like_json(payload):
            return image_and_options(parse_json(payload), field)
        return payload, {}
    raise RequestError(
        f"a JSON body must be an object like {{\"image\": \"<base64>\"}}, got {json_type_name(payload)}"
    )


def looks_like_json(data: bytes) -> bool:
    """JSON TorchServe did not decode (malformed, or sent without its content type).

    No image format starts with ``{`` or ``[``.
    """
    start = data[:64].lstrip(b" \t\r\n")
    if start.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        start = start[3:].lstrip(b" \t\r\n")
    return start[:1] in (b"{", b"[")


def parse_json(data: bytes):
    try:
        return json.loads(data.decode("utf-8-sig"))
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        raise RequestError(f"malformed JSON body: {error}") from error


def json_type_name(value) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def image_from_json_object(body: dict) -> tuple[bytes, dict]:
    if JSON_IMAGE_KEY not in body:
        raise RequestError(f"the JSON body needs an {JSON_IMAGE_KEY!r} field holding the base64-encoded image")
    encoded = body[JSON_IMAGE_KEY]
    if not isinstance(encoded, str):
        raise RequestError(f"{JSON_IMAGE_KEY!r} must be a base64 string, got {json_type_name(encoded)}")
    options = {key: value for key, value in body.items() if key != JSON_IMAGE_KEY}
    return decode_base64_image(encoded), options


def decode_base64_image(text: str) -> bytes:
    """Standard or URL-safe base64, padding optional, line breaks allowed, ``data:`` URL prefix allowed."""
    text = text.strip()
    data_url = DATA_URL.match(text)
    if data_url:
        if not data_url.group(1).lower().endswith(";base64"):
            raise RequestError(f"the {JSON_IMAGE_KEY!r} data URL must be base64-encoded (data:image/...;base64,...)")
        text = text[data_url.end() :]
    compact = "".join(text.split()) if has_whitespace(text) else text  # line breaks/spaces; 20x faster than re.sub
    if not compact:
        raise RequestError(f"{JSON_IMAGE_KEY!r} is empty")
    if "-" in compact or "_" in compact:
        compact = compact.translate(str.maketrans("-_", "+/"))
    compact += "=" * (-len(compact) % 4)
    try:
        image = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(f"{JSON_IMAGE_KEY!r} is not valid base64: {error}") from error
    if not image:
        raise RequestError(f"{JSON_IMAGE_KEY!r} is empty")
    return image


# What str.split() splits ASCII text on. Looking for each (a fast scan) and splitting only when
# one is there saves about 0.1 ms per 100 kB image, spent holding the GIL.
ASCII_WHITESPACE = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def has_whitespace(text: str) -> bool:
    if not text.isascii():
        return True  # possibly Unicode whitespace: let split() decide
    return any(char in text for char in ASCII_WHITESPACE)


def option_from_text(name: str, value):
    """A URL or form value (bytes or str) -> str, int or float; other types pass through.

    ``styles`` stays a string (``make_plan`` splits it on commas); an empty value means
    "not given" (None).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as error:
            raise RequestError(f"option {name[:40]!r} is not valid UTF-8 text") from error
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text:
        return None
    if name == "styles":
        return text
    return number_from_text(text)


def number_from_text(text: str):
    try:
        return int(text) if INTEGER_TEXT.fullmatch(text) else float(text)
    except ValueError:  # not a number, or more digits than int() accepts
        return text  # make_plan reports the option as "must be a number"


def merge_options(url_and_form: dict, body: dict) -> dict:
    both = sorted(set(url_and_form) & set(body))
    if both:
        raise RequestError(f"option(s) given both in the URL or form and in the JSON body: {', '.join(both)}")
    return {**url_and_form, **body}


def error_body(message: str) -> str:
    """The JSON document of every 4xx response: ``{"error": message}``."""
    return json.dumps({"error": message}, ensure_ascii=False)
