"""`python -m weights fetch` / `verify` against a local HTTP server (no network needed).

The server runs in a thread on 127.0.0.1 and a free port and serves a few MB of generated
bytes with `Range` support; per test it can cut the first transfer after N bytes, ignore
`Range`, misstate a range's start or the file's total, stream without a length, or serve a Git
LFS pointer. Every request's `Range` header is recorded so that the tests can see a resume
happen.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.local_http import serving
from weights import __main__ as cli
from weights import manifest_mismatches
from weights.fetch import ChecksumMismatch, FetchError, NetworkUnavailable, check_file, fetch

pytestmark = pytest.mark.unit

PAYLOAD_BYTES = 3 * 1024 * 1024 + 12345
CUT_AFTER = 2 * 1024 * 1024 + 7  # the client keeps whole chunks: 2 MiB of it reach the .part


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(PAYLOAD_BYTES)


@pytest.fixture(scope="module")
def digest(payload) -> str:
    return hashlib.sha256(payload).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        srv = self.server
        rng = self.headers.get("Range")
        srv.ranges.append(rng)
        body = srv.body
        start = 0
        if rng and srv.honour_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            total = srv.total or len(body)
            self.send_header("Content-Range", f"bytes {start + srv.range_shift}-{len(body) - 1}/{total}")
        else:
            self.send_response(200)
        if srv.unsized_extra is not None:
            self._stream_without_length(body[start:], srv.unsized_extra)
            return
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("Accept-Ranges", "bytes" if srv.honour_range else "none")
        self.end_headers()
        chunk = body[start:]
        if srv.cut_first_after is not None and len(srv.ranges) == 1:
            # Promise the whole body, send part of it, drop the connection.
            self.wfile.write(chunk[: srv.cut_first_after])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(chunk)

    def _stream_without_length(self, chunk: bytes, extra: int) -> None:
        """No Content-Length (HTTP/1.0: the body ends when the connection closes): the bytes, then
        `extra` more, counting what reached the socket until the client hangs up."""
        self.end_headers()
        block = b"\0" * (1 << 16)
        try:
            self.wfile.write(chunk)
            self.server.sent += len(chunk)
            while self.server.sent < len(chunk) + extra:
                self.wfile.write(block)
                self.server.sent += len(block)
        except OSError:  # the client stopped reading and closed
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, body: bytes, honour_range: bool = True, cut_first_after: int | None = None,
                 range_shift: int = 0, total: int | None = None, unsized_extra: int | None = None):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.body, self.honour_range, self.cut_first_after = body, honour_range, cut_first_after
        # a 206's Content-Range start moved by `range_shift`, its total stated as `total`
        self.range_shift, self.total, self.unsized_extra = range_shift, total, unsized_extra
        self.ranges: list[str | None] = []
        self.sent = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/models/weights.pt"


@pytest.fixture
def serve():
    with contextlib.ExitStack() as servers:
        yield lambda body, **kwargs: servers.enter_context(serving(_Server(body, **kwargs)))


def _fetch(srv: _Server, out: Path, sha: str, size: int | None, **kw) -> Path:
    return fetch(srv.url, out, sha, size, progress=io.StringIO(), **kw)


def test_right_checksum_puts_verified_file_in_place(serve, payload, digest, tmp_path):
    srv = serve(payload)
    out = tmp_path / "w" / "weights.pt"
    assert _fetch(srv, out, digest, len(payload)) == out
    assert out.read_bytes() == payload
    assert check_file(out, digest, len(payload)) is None
    assert not out.with_name("weights.pt.part").exists()
    assert srv.ranges == [None]


def test_progress_goes_to_the_given_stream(serve, payload, digest, tmp_path):
    stream = io.StringIO()
    fetch(serve(payload).url, tmp_path / "weights.pt", digest, len(payload), progress=stream)
    text = stream.getvalue()
    assert "100.0%" in text and "MiB" in text and "verified" in text


def test_wrong_checksum_fails_and_leaves_nothing_under_the_final_name(serve, payload, tmp_path):
    srv = serve(payload)
    out = tmp_path / "weights.pt"
    with pytest.raises(ChecksumMismatch, match="sha256"):
        _fetch(srv, out, hashlib.sha256(b"something else").hexdigest(), len(payload))
    assert not out.exists()
    assert not out.with_name("weights.pt.part").exists()


def test_wrong_size_fails_before_hashing(serve, payload, digest, tmp_path):
    out = tmp_path / "weights.pt"
    with pytest.raises(ChecksumMismatch, match="bytes, expected"):
        _fetch(serve(payload), out, digest, len(payload) + 10)
    assert not out.exists()


def test_server_file_longer_than_expected_is_refused_at_once(serve, payload, digest, tmp_path):
    srv = serve(payload)
    out = tmp_path / "weights.pt"
    with pytest.raises(ChecksumMismatch, match=f"serves {len(payload):,} bytes, not the expected checkpoint"):
        _fetch(srv, out, digest, len(payload) - 10)
    assert srv.ranges == [None]  # one request, no retries
    assert not out.exists() and not out.with_name("weights.pt.part").exists()


class _FullDisk(io.BytesIO):
    def write(self, data):
        raise OSError(28, "No space left on device")


class _FullAtFlush(io.BytesIO):  # the last chunk stayed buffered; quotas and NFS report late
    def flush(self):
        raise OSError(122, "Disk quota exceeded")

    def fileno(self):
        return 0


def _refuse_permission(*args, **kwargs):
    raise PermissionError(13, "Permission denied")


@pytest.mark.parametrize("part_file, message", [(_FullDisk, "No space left on device"),
                                                (_FullAtFlush, "Disk quota exceeded"),
                                                (_refuse_permission, "Permission denied")],
                         ids=["disk-full", "full-at-flush", "not-writable"])
def test_local_write_failure_is_a_clear_error_not_a_network_cut(serve, payload, digest, tmp_path, monkeypatch,
                                                                 part_file, message):
    import builtins

    real_open = builtins.open

    def fake_open(path, mode="r", *args, **kwargs):
        if str(path).endswith(".part") and mode in ("wb", "ab"):
            return part_file()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    srv = serve(payload)
    with pytest.raises(FetchError, match=f"cannot write .*{message}"):
        _fetch(srv, tmp_path / "weights.pt", digest, len(payload))
    assert srv.ranges == [None]  # not retried


def test_unreachable_proxy_is_reported_as_offline(tmp_path, monkeypatch):
    import requests

    def refuse(*args, **kwargs):
        raise requests.exceptions.ProxyError("Cannot connect to proxy.", OSError("Connection refused"))

    monkeypatch.setattr(requests.Session, "get", refuse)
    monkeypatch.setattr("weights.fetch._resolve_or_fail", lambda *args: None)
    with pytest.raises(NetworkUnavailable, match="through the proxy"):
        fetch("https://example.invalid/w.pt", tmp_path / "w.pt", "0" * 64, 10, progress=io.StringIO())


def test_tls_failure_is_not_reported_as_offline(tmp_path, monkeypatch):
    import requests

    def refuse(*args, **kwargs):
        raise requests.exceptions.SSLError("certificate verify failed")

    monkeypatch.setattr(requests.Session, "get", refuse)
    monkeypatch.setattr("weights.fetch._resolve_or_fail", lambda *args: None)
    with pytest.raises(FetchError, match="SSLError") as error:
        fetch("https://example.invalid/w.pt", tmp_path / "w.pt", "0" * 64, 10, progress=io.StringIO())
    assert not isinstance(error.value, NetworkUnavailable)


@pytest.mark.parametrize("option, value", [("--retries", "-1"), ("--size", "0")])
def test_cli_refuses_impossible_numbers(option, value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["fetch", "--output", str(tmp_path / "w.pt"), option, value])
    assert exit_.value.code == 2 and "must be at least" in capsys.readouterr().err


def test_interrupted_download_resumes_with_range_on_the_next_run(serve, payload, digest, tmp_path):
    srv = serve(payload, cut_first_after=CUT_AFTER)
    out = tmp_path / "weights.pt"
    part = tmp_path / "weights.pt.part"
    with pytest.raises(FetchError, match="run the same command again to resume"):
        _fetch(srv, out, digest, len(payload), retries=0)
    assert not out.exists()
    kept = part.stat().st_size
    assert 0 < kept <= CUT_AFTER
    assert part.read_bytes() == payload[:kept]

    _fetch(srv, out, digest, len(payload), retries=0)
    assert srv.ranges == [None, f"bytes={kept}-"]
    assert out.read_bytes() == payload
    assert not part.exists()


def test_interrupted_download_resumes_within_the_same_run(serve, payload, digest, tmp_path):
    srv = serve(payload, cut_first_after=CUT_AFTER)
    out = tmp_path / "weights.pt"
    _fetch(srv, out, digest, len(payload), retries=1)
    assert len(srv.ranges) == 2 and srv.ranges[0] is None
    assert 0 < int(srv.ranges[1].removeprefix("bytes=").rstrip("-")) <= CUT_AFTER
    assert check_file(out, digest, len(payload)) is None


def test_server_that_ignores_range_makes_the_download_restart(serve, payload, digest, tmp_path):
    srv = serve(payload, honour_range=False)
    out = tmp_path / "weights.pt"
    # A stale .part whose bytes are NOT a prefix of the file: appending to it would fail the check.
    (tmp_path / "weights.pt.part").write_bytes(b"\0" * CUT_AFTER)
    _fetch(srv, out, digest, len(payload))
    assert srv.ranges == [f"bytes={CUT_AFTER}-"]  # asked to resume, got 200, started over
    assert out.read_bytes() == payload


def test_complete_part_file_is_verified_and_renamed(serve, payload, digest, tmp_path):
    srv = serve(payload)
    (tmp_path / "weights.pt.part").write_bytes(payload)
    _fetch(srv, tmp_path / "weights.pt", digest, len(payload))
    assert srv.ranges == []  # nothing left to download
    assert (tmp_path / "weights.pt").read_bytes() == payload


def test_part_file_longer_than_the_checkpoint_is_discarded_and_the_download_starts_over(serve, payload, digest,
                                                                                         tmp_path):
    srv = serve(payload)
    (tmp_path / "weights.pt.part").write_bytes(payload + b"trailing junk")
    _fetch(srv, tmp_path / "weights.pt", digest, len(payload))
    assert srv.ranges == [None]  # no Range: it cannot be a prefix of the file
    assert (tmp_path / "weights.pt").read_bytes() == payload


def test_without_a_known_size_a_complete_part_file_is_finished_by_the_servers_416(serve, payload, digest, tmp_path):
    srv = serve(payload)
    (tmp_path / "weights.pt.part").write_bytes(payload)
    _fetch(srv, tmp_path / "weights.pt", digest, None)
    assert srv.ranges == [f"bytes={len(payload)}-"]  # answered 416: nothing left to send
    assert (tmp_path / "weights.pt").read_bytes() == payload


def test_a_range_answer_that_starts_elsewhere_is_refused_and_the_part_file_kept(serve, payload, digest, tmp_path):
    srv = serve(payload, range_shift=-100)
    part = tmp_path / "weights.pt.part"
    part.write_bytes(payload[:CUT_AFTER])
    with pytest.raises(FetchError, match=f"Range bytes={CUT_AFTER}- with 'bytes {CUT_AFTER - 100}-"):
        _fetch(srv, tmp_path / "weights.pt", digest, len(payload))
    assert part.read_bytes() == payload[:CUT_AFTER]  # appending would have shifted every byte after it


def test_a_resumed_range_from_a_larger_file_is_refused_and_the_part_file_kept(serve, payload, digest, tmp_path):
    srv = serve(payload, total=len(payload) + 1000)
    part = tmp_path / "weights.pt.part"
    part.write_bytes(payload[:CUT_AFTER])
    with pytest.raises(ChecksumMismatch, match=f"serves {len(payload) + 1000:,} bytes"):
        _fetch(srv, tmp_path / "weights.pt", digest, len(payload))
    assert part.read_bytes() == payload[:CUT_AFTER]  # still a good prefix, perhaps of the right URL's file


def test_a_range_answer_that_ends_before_its_stated_total_is_resumed(serve, payload, digest, tmp_path):
    """A 206 "bytes N-(last)/(size + 1000)" sent in full, no size expected: the transfer ended short of
    what the server itself promised, so it is left to resume, not checked (and deleted) as a wrong file."""
    srv = serve(payload, total=len(payload) + 1000)
    part = tmp_path / "weights.pt.part"
    part.write_bytes(payload[:CUT_AFTER])
    with pytest.raises(FetchError, match=f"transfer ended after {len(payload):,} of {len(payload) + 1000:,} bytes"):
        _fetch(srv, tmp_path / "weights.pt", digest, None, retries=0)
    assert part.read_bytes() == payload


def test_a_stream_without_a_length_is_read_no_further_than_the_checkpoint(serve, payload, digest, tmp_path):
    extra = 256 * 1024 * 1024  # far more than any socket buffers
    srv = serve(payload, unsized_extra=extra)
    with pytest.raises(ChecksumMismatch, match="bytes, expected"):
        _fetch(srv, tmp_path / "weights.pt", digest, len(payload))
    assert srv.sent < len(payload) + extra // 4  # the client hung up after one chunk too many
    assert not (tmp_path / "weights.pt").exists() and not (tmp_path / "weights.pt.part").exists()


def test_already_present_verified_file_is_skipped(serve, payload, digest, tmp_path):
    srv = serve(payload)
    out = tmp_path / "weights.pt"
    out.write_bytes(payload)
    before = out.stat().st_mtime_ns
    _fetch(srv, out, digest, len(payload))
    assert srv.ranges == []
    assert out.stat().st_mtime_ns == before


def test_present_but_wrong_file_is_replaced_only_by_a_verified_one(serve, payload, digest, tmp_path):
    out = tmp_path / "weights.pt"
    out.write_bytes(b"corrupt")
    _fetch(serve(payload), out, digest, len(payload))
    assert out.read_bytes() == payload


def test_lfs_pointer_is_named_in_the_error(serve, tmp_path):
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 339176593\n"
    with pytest.raises(ChecksumMismatch, match="Git LFS pointer"):
        _fetch(serve(pointer), tmp_path / "weights.pt", "0" * 64, 339176593, retries=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "url",
    [f"http://127.0.0.1:{_free_port()}/weights.pt", "http://weights.nonexistent.invalid/weights.pt"],
    ids=["connection-refused", "unresolvable-host"],
)
def test_unreachable_url_fails_fast_with_offline_instructions(url, tmp_path):
    out = tmp_path / "weights.pt"
    start = time.monotonic()
    with pytest.raises(NetworkUnavailable) as info:
        fetch(url, out, "0" * 64, 10, progress=io.StringIO(), connect_timeout=3)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "WEIGHTS=/path/to/weights.pt" in message
    assert "python -m weights random" in message
    assert not out.exists() and not out.with_name("weights.pt.part").exists()


def test_cli_fetch_exit_codes(serve, payload, digest, tmp_path, capsys):
    srv = serve(payload)
    out = tmp_path / "weights.pt"
    args = ["fetch", "--url", srv.url, "--output", str(out), "--sha256", digest, "--size", str(len(payload))]
    assert cli.main(args) == 0
    assert check_file(out, digest, len(payload)) is None
    bad = ["fetch", "--url", srv.url, "--output", str(tmp_path / "x.pt"), "--sha256", "0" * 64]
    assert cli.main(bad + ["--size", str(len(payload))]) == cli.EXIT_FAILED
    offline = ["fetch", "--url", f"http://127.0.0.1:{_free_port()}/w.pt", "--output", str(tmp_path / "y.pt")]
    assert cli.main(offline) == cli.EXIT_OFFLINE
    assert "no network access" in capsys.readouterr().err


def test_cli_url_comes_from_the_environment(serve, payload, digest, tmp_path, monkeypatch):
    srv = serve(payload)
    monkeypatch.setenv("CAPTION_WEIGHTS_URL", srv.url)
    out = tmp_path / "weights.pt"
    assert cli.main(["fetch", "--output", str(out), "--sha256", digest, "--size", str(len(payload))]) == 0
    assert srv.ranges == [None]


def test_cli_verify_official_file(payload, digest, tmp_path, monkeypatch, capsys):
    official = {"name": "models/weights.pt", "size_bytes": len(payload), "sha256": digest}
    monkeypatch.setattr(cli, "official_file", lambda: official)
    good = tmp_path / "weights.pt"
    good.write_bytes(payload)
    assert cli.main(["verify", str(good)]) == 0
    assert "official checkpoint" in capsys.readouterr().out
    other = tmp_path / "other.pt"
    other.write_bytes(payload[:-1] + b"\x00")
    assert cli.main(["verify", "--official", str(other)]) == cli.EXIT_FAILED
    assert cli.main(["verify", str(tmp_path / "missing.pt")]) == cli.EXIT_FAILED


def test_cli_verify_hands_other_checkpoints_to_the_model_loader(tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "validate_structure", lambda path, config: seen.append((path, config)))
    mine = tmp_path / "fine-tuned.pt"
    mine.write_bytes(b"not the official bytes")
    assert cli.main(["verify", str(mine)]) == 0
    assert seen == [(mine, None)]
    out = capsys.readouterr()
    assert "structurally valid" in out.out and "official checkpoint's size" not in out.err


def test_cli_verify_warns_when_a_file_has_the_official_size_but_not_its_bytes(payload, digest, tmp_path,
                                                                             monkeypatch, capsys):
    """A damaged copy of the official file (a flipped byte inside a tensor loads fine) must not
    pass silently as a checkpoint of one's own."""
    monkeypatch.setattr(cli, "official_file", lambda: {"name": "w", "size_bytes": len(payload), "sha256": digest})
    monkeypatch.setattr(cli, "validate_structure", lambda path, config: None)
    damaged = tmp_path / "weights.pt"
    damaged.write_bytes(payload[:-1] + bytes([payload[-1] ^ 1]))
    assert cli.main(["verify", str(damaged)]) == 0
    assert "has the official checkpoint's size but not its sha256" in capsys.readouterr().err
    assert cli.main(["verify", "--official", str(damaged)]) == cli.EXIT_FAILED


def test_cli_verify_rejects_a_file_that_is_no_checkpoint(tmp_path, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert cli.main(["verify", str(junk)]) == cli.EXIT_FAILED
    assert "not a PyTorch checkpoint in torch.save's zip format" in capsys.readouterr().err


def test_manifest_mismatches_names_the_differences():
    shapes = {"a": (2, 3), "b": (4,)}
    manifest = {"keys": {"a": [2, 3], "b": [5], "c": [1]}}
    problems = manifest_mismatches(shapes, manifest)
    assert problems == ["missing key c [1]", "shape of b: [4], expected [5]"]
    assert manifest_mismatches({"a": (2, 3), "b": (5,), "c": (1,)}, manifest) == []
