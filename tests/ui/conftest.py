"""A stand-in for the caption service: an http.server on 127.0.0.1 (free port) that checks the
bearer key and answers like TorchServe + the handler, or with whatever a test scripts."""

from __future__ import annotations

import base64
import json
import socket
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.local_http import serving

KEY = "stub-inference-key"
TOKEN_FAILED = "Token Authorization failed. Token either incorrect, expired, or not provided correctly"
STUB_CAPTIONS = {
    "concise": "A stub cat sits still.",
    "narrative": "Once, a stub cat waited for the test to finish.",
    "descriptive": "A grey stub cat with round eyes on a plain background.",
}


@dataclass
class Reply:
    status: int
    body: bytes | str | dict
    content_type: str = "application/json"
    delay: float = 0.0


@dataclass
class Stub:
    url: str
    requests: list[dict] = field(default_factory=list)
    script: list[Reply] = field(default_factory=list)  # replies used in order, then the default

    def reply(self, status: int, body, content_type: str = "application/json", delay: float = 0.0) -> None:
        self.script.append(Reply(status, body, content_type, delay))


def default_reply(path: str, headers: dict, body: bytes) -> Reply:
    """What the real service would say to a well-formed client."""
    if headers.get("authorization") != f"Bearer {KEY}":  # TorchServe 0.12 says 400, not 401
        return Reply(400, {"code": 400, "type": "InvalidKeyException", "message": TOKEN_FAILED})
    if path == "/ping":
        return Reply(200, {"status": "Healthy"})
    if not path.startswith("/predictions/"):
        return Reply(404, {"code": 404, "type": "ResourceNotFoundException", "message": "Requested resource is not found"})
    if path != "/predictions/captioner":
        return Reply(404, {"code": 404, "type": "ModelNotFoundException",
                           "message": f"Model not found: {path.rsplit('/', 1)[1]}"})
    try:
        request = json.loads(body)
        image = base64.b64decode(request["image"], validate=True)
    except (ValueError, KeyError, TypeError):
        return Reply(400, {"error": "request body is not JSON with an 'image'"})
    if not image.startswith((b"\x89PNG", b"\xff\xd8")):
        return Reply(400, {"error": "cannot decode the image: not a PNG or JPEG"})
    styles = request.get("styles") or list(STUB_CAPTIONS)
    num = request.get("num_captions") or 2
    return Reply(200, {s.capitalize(): [STUB_CAPTIONS[s]] * num for s in styles})


class _Handler(BaseHTTPRequestHandler):
    stub: Stub

    def log_message(self, *args):  # keep test output clean
        pass

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in self.headers.items()}
        record = {"method": self.command, "path": self.path, "headers": headers, "body": body}
        try:
            record["json"] = json.loads(body) if body else None
        except ValueError:
            record["json"] = None
        self.stub.requests.append(record)
        reply = self.stub.script.pop(0) if self.stub.script else default_reply(self.path, headers, body)
        if reply.delay:
            time.sleep(reply.delay)
        payload = reply.body
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        if isinstance(payload, str):
            payload = payload.encode()
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
            pass

    do_GET = do_POST = _serve


@pytest.fixture
def stub():
    handler = type("StubHandler", (_Handler,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state = Stub(url=f"http://127.0.0.1:{server.server_address[1]}")
    handler.stub = state
    with serving(server):
        yield state


@pytest.fixture
def closed_port() -> int:
    """A local port with nothing listening (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
