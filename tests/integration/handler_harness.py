"""Drive the caption handler through TorchServe's own Python worker code, without the server.

``ts.service.Service.predict`` is what a TorchServe worker calls for every batch: it builds the
``Context`` (request ids, per-request headers), calls the handler and encodes the reply for the
frontend. Running it here and decoding that reply checks what the frontend would really get:
each request's status, reason phrase, content type and body.

Rows are built as the worker's message decoder builds them (``ts.protocol.otf_message_handler``):
``{"requestId": bytes, "headers": [...], "parameters": [{"name", "contentType", "value"}]}``,
where a JSON body arrives already parsed and a ``text/*`` body as ``str``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
# ../shared beside the checkout; CAPTION_SHARED points elsewhere (as in tests/conftest.py).
SEED = Path(os.environ.get("CAPTION_SHARED", REPO.parent / "shared")) / "fixtures" / "seed-tiny"
IMAGES = {name: (SEED / "images" / name).read_bytes() for name in ("chelsea.png", "coffee.png", "rocket.jpg")}
MIME = {"png": "image/png", "jpg": "image/jpeg"}
EXPECTED = json.loads((SEED / "expected_captions.json").read_text())
STYLE_KEYS = {"concise": "Concise", "narrative": "Narrative", "descriptive": "Descriptive"}


def mime(name: str) -> str:
    return MIME[name.rsplit(".", 1)[1]]


def golden(image: str, kind: str = "greedy", styles=("concise", "narrative", "descriptive")) -> dict:
    return {STYLE_KEYS[s]: [EXPECTED[image][kind][s]] for s in styles}


def make_model_dir(path: Path, handler_overrides: dict | None = None, top_overrides: dict | None = None) -> Path:
    """A model directory like an extracted archive's (without MAR-INF: code from the checkout)."""
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(SEED / "weights.pt", path / "weights.pt")
    shutil.copy(SEED / "config.json", path / "caption_config.json")
    (path / "model" / "assets").mkdir(parents=True, exist_ok=True)  # where the archive has it
    shutil.copy(REPO / "model" / "assets" / "vocab.txt", path / "model" / "assets" / "vocab.txt")
    config = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    # float32: the golden captions are float32 figures (the shipped `auto` would pick bfloat16
    # on a CPU with native bf16 products).
    config["handler"].update({"warmup": False, "cpu_dtype": "float32"})
    config["handler"].update(handler_overrides or {})
    config.update(top_overrides or {})
    (path / "model-config.yaml").write_text(yaml.safe_dump(config))
    return path


MANIFEST = {"runtime": "python", "model": {"modelName": "captioner", "serializedFile": "weights.pt",
                                            "handler": "captioner_handler.py", "configFile": "model-config.yaml",
                                            "modelVersion": "1.0"}}


def make_service(model_dir: Path, gpu=None, batch_size: int = 8):
    """Service + initialized handler, wired as ts.model_loader does it."""
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.service import Service

    from handler.captioner_handler import CaptionHandler

    metrics = MetricsCacheYamlImpl(config_file_path=str(REPO / "metrics.yaml"))
    metrics.initialize_cache()
    metrics.model_name = "captioner"
    handler = CaptionHandler()
    service = Service("captioner", str(model_dir), MANIFEST, handler.handle, gpu, batch_size,
                      metrics_cache=metrics)
    service.set_cl_socket(None)
    handler.initialize(service.context)
    return service, handler


# ---------------------------------------------------------------------- request rows
def param(name: str, value, content_type: str = "") -> dict:
    return {"name": name, "contentType": content_type, "value": value}


def raw_row(image: bytes, content_type: str = "image/png", query: dict | None = None) -> list[dict]:
    """POST --data-binary; query parameters arrive as extra parameters with no content type."""
    return [param("body", image, content_type)] + [param(k, str(v).encode()) for k, v in (query or {}).items()]


def multipart_row(image: bytes, field: str = "data", content_type: str = "image/png", fields: dict | None = None):
    """multipart/form-data: one parameter per part (file parts keep their content type; plain
    text fields arrive as bytes with no content type)."""
    return [param(field, image, content_type)] + [param(k, str(v).encode()) for k, v in (fields or {}).items()]


def json_row(image: bytes | None, **options) -> list[dict]:
    body = dict(options)
    if image is not None:
        body["image"] = base64.b64encode(image).decode()
    return [param("body", body, "application/json")]


def batch(*rows: list[dict]) -> list[dict]:
    return [{"requestId": f"req-{i}".encode(), "headers": [], "parameters": params} for i, params in enumerate(rows)]


# ---------------------------------------------------------------------- the worker's reply
@dataclass
class Reply:
    status: int
    phrase: str
    content_type: str
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)


def decode_predict_response(message: bytes) -> tuple[int, str, list[Reply]]:
    """Inverse of ts.protocol.otf_message_handler.create_predict_response."""
    pos = 0

    def integer():
        nonlocal pos
        (value,) = struct.unpack_from("!i", message, pos)
        pos += 4
        return value

    def blob():
        nonlocal pos
        length = integer()
        data = message[pos:pos + length]
        pos += length
        return data

    code = integer()
    text = blob().decode()
    replies = []
    while True:
        length = integer()
        if length == -1:
            break
        pos += length  # request id
        content_type = blob().decode()
        status = integer()
        phrase = blob().decode()
        headers = {blob().decode(): blob().decode() for _ in range(integer())}
        replies.append(Reply(status, phrase, content_type, headers, blob()))
    return code, text, replies


def predict(service, rows: list[dict]) -> list[Reply]:
    code, text, replies = decode_predict_response(service.predict(rows))
    assert code == 200, (code, text, replies)
    assert len(replies) == len(rows)
    return replies


# ---------------------------------------------------------------------- decode-pool faults
def prepare_or_exit(row, preparation):
    """`handler.preparation.prepare_request`, except that a row with an ``exit`` field ends its
    process at once, as a crash in an image decoder would (run in a decode process)."""
    from handler.preparation import prepare_request

    if "exit" in row:
        os._exit(70)
    return prepare_request(row, preparation)


class UnrebuildableError(ValueError):
    """An exception that pickles but cannot be rebuilt from its args (its __init__ takes others)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"{detail} ({status})")
        self.status = status


def prepare_or_raise(row, _preparation):
    """A stand-in for `prepare_request` (run in a decode process) that returns the row, or raises
    what the row's ``raise`` field names: exceptions a process could not send back as objects."""
    kind = row.get("raise")
    if kind == "unrebuildable":
        raise UnrebuildableError(422, "odd")
    if kind == "unpicklable":
        error = ValueError("holds a lambda")
        error.callback = lambda: None
        raise error
    if kind == "runtime":
        raise RuntimeError("boom")
    if kind == "pillow":  # what Pillow raises for a cut file, had decode_image not wrapped it
        raise OSError("image file is truncated (3 bytes not processed)")
    return row
