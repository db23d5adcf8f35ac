"""Download the official checkpoint: resumable, size- and sha256-verified, atomic.

The file is written to ``<output>.part`` and renamed to ``<output>`` only after its size
and sha256 match, so a half-written or wrong file never sits under the final name.

- A ``.part`` left by an interrupted run is resumed with an HTTP ``Range`` request; a server
  that ignores ``Range`` (``200`` instead of ``206``) makes the download start over.
- A transfer cut mid-way is resumed in the same run up to ``retries`` times.
- No network (DNS failure, connection refused, connect timeout) fails at once with
  :class:`NetworkUnavailable`, whose message says how to proceed without network.
- A wrong checksum removes the ``.part`` and raises :class:`ChecksumMismatch`.
- An output file that already verifies is left alone.

Progress goes to stderr as plain text (no tqdm).
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, TextIO
from urllib.parse import urlsplit

import requests

from . import DEFAULT_OUTPUT, DEFAULT_RANDOM_OUTPUT, URL_ENV, default_url, official_file

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
_HASH_BLOCK = 8 << 20
_LFS_POINTER_PREFIX = b"version https://git-lfs"


class FetchError(RuntimeError):
    """The download failed; the message says why and what to do."""


class NetworkUnavailable(FetchError):
    """The server cannot be reached at all (DNS, refused, connect timeout)."""


class ChecksumMismatch(FetchError):
    """The downloaded bytes are not the expected file."""


def offline_help(output: Path) -> str:
    return (
        "Without network access, download the file on a machine that has it "
        f"({official_file()['name']} of the original project, "
        f"sha256 {official_file()['sha256']}), copy it here and either put it at {output} "
        "or pass WEIGHTS=/path/to/weights.pt (check it with `python -m weights verify PATH`). "
        f"For smoke tests only, `python -m weights random --output {DEFAULT_RANDOM_OUTPUT}` "
        "writes a random-init checkpoint of the same format (it captions nonsense). "
        f"A mirror can be given with --url or ${URL_ENV}."
    )


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: str | os.PathLike[str], sha256: str, size: int | None) -> str | None:
    """``None`` when ``path`` has the expected size and sha256, else the reason it does not."""
    path = Path(path)
    if not path.is_file():
        return f"{path} does not exist"
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:
        reason = f"{path} is {actual_size:,} bytes, expected {size:,}"
        with open(path, "rb") as f:
            if f.read(len(_LFS_POINTER_PREFIX)) == _LFS_POINTER_PREFIX:
                reason += " (it is a Git LFS pointer file, not the checkpoint: use the LFS media URL)"
        return reason
    actual = sha256_of(path)
    if actual != sha256.lower():
        return f"{path} has sha256 {actual}, expected {sha256.lower()}"
    return None


class _Progress:
    """Plain-text progress on one stderr line, at most a few updates a second."""

    def __init__(self, total: int | None, done: int, stream: TextIO | None):
        self.total, self.done, self.stream = total, done, stream
        self.start_done, self.start, self.last = done, time.monotonic(), 0.0

    def update(self, n: int, final: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if self.stream is None or (not final and now - self.last < 0.5):
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.start, 1e-6) / 1e6
        mib = self.done / (1 << 20)
        if self.total:
            text = f"{100 * self.done / self.total:5.1f}%  {mib:,.1f} / {self.total / (1 << 20):,.1f} MiB  {rate:.1f} MB/s"
        else:
            text = f"{mib:,.1f} MiB  {rate:.1f} MB/s"
        self.stream.write(f"\r  {text}" + ("\n" if final else ""))
        self.stream.flush()


def _resolve_or_fail(url: str, timeout: float) -> None:
    """Fail fast on a name that does not resolve, even where the resolver would hang."""
    host = urlsplit(url).hostname
    if not host or requests.utils.get_environ_proxies(url):
        return  # a proxy resolves the name, not us
    result: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, None)
            result.append(None)
        except OSError as exc:
            result.append(exc)

    worker = threading.Thread(target=resolve, daemon=True)
    worker.start()
    worker.join(timeout)
    if not result:
        raise NetworkUnavailable(f"cannot resolve {host}: no answer within {timeout:g}s")
    if result[0] is not None:
        raise NetworkUnavailable(f"cannot resolve {host}: {result[0]}")


def _open(session: requests.Session, url: str, offset: int, timeout: tuple[float, float]) -> requests.Response:
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return session.get(url, headers=headers, stream=True, timeout=timeout, allow_redirects=True)
    except requests.exceptions.SSLError as exc:  # the network works: a certificate problem is not "offline"
        raise FetchError(f"cannot connect to {url} ({type(exc).__name__}): {exc}") from exc
    except requests.exceptions.ProxyError as exc:
        if "Cannot connect to proxy" in str(exc):  # the proxy itself is out of reach: as good as offline
            raise NetworkUnavailable(f"cannot connect to {url} through the proxy: {exc}") from exc
        raise FetchError(f"the proxy refused {url}: {exc}") from exc
    except (requests.ConnectionError, requests.Timeout) as exc:
        if isinstance(exc, requests.ReadTimeout):
            raise FetchError(f"no response from {url} within {timeout[1]:g}s: {exc}") from exc
        raise NetworkUnavailable(f"cannot connect to {url}: {exc}") from exc


def _transfer(
    session: requests.Session,
    url: str,
    part: Path,
    size: int | None,
    timeout: tuple[float, float],
    progress: TextIO | None,
    say: Callable[[str], None],
) -> None:
    """Bring ``part`` to the full length once (resuming it); raises on a cut transfer."""
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()  # longer than the real file: cannot be a prefix of it
        offset = 0
    if size is not None and offset == size:
        return
    with _open(session, url, offset, timeout) as resp:
        if resp.status_code == 416 and offset:
            # Nothing left to send: the .part is as long as the server's file.
            return
        if resp.status_code == 206 and offset:
            start = _content_range_start(resp.headers.get("Content-Range", ""))
            if start != offset:
                raise FetchError(f"server answered Range bytes={offset}- with {resp.headers.get('Content-Range')!r}")
            mode = "ab"
            say(f"resuming {part.name} at {offset:,} bytes")
        elif resp.status_code == 200:
            if offset:
                say(f"server ignored the Range request: downloading {url} from the start")
            offset, mode = 0, "wb"
        else:
            raise FetchError(f"{url} answered HTTP {resp.status_code} {resp.reason}")
        # What the server promised to send in all: a shorter file than `size` sent in full
        # is the wrong file (checked later), not an interrupted transfer.
        promised = _content_range_total(resp.headers.get("Content-Range", "")) if mode == "ab" else None
        if promised is None and resp.headers.get("Content-Length", "").isdigit():
            promised = offset + int(resp.headers["Content-Length"])
        if size is not None and promised is not None and promised > size:
            if mode == "wb":  # a resumed .part may still be a good prefix (of another URL's file): kept
                part.unlink(missing_ok=True)
            raise ChecksumMismatch(f"{url} serves {promised:,} bytes, not the expected checkpoint's {size:,}: "
                                   "wrong URL, a proxy's page or a different version")
        bar = _Progress(size or promised, offset, progress)
        try:
            with open(part, mode) as f:
                for chunk in resp.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    bar.update(len(chunk))
                    if size is not None and bar.done > size:
                        break
                f.flush()
                os.fsync(f.fileno())
        except requests.RequestException as exc:  # the transfer was cut (an OSError subclass: caught first)
            bar.update(0, final=True)
            written = part.stat().st_size if part.exists() else 0
            raise _Interrupted(f"transfer cut after {written:,} bytes: {exc}") from exc
        except OSError as exc:  # the file: disk full, no permission, ... (retrying cannot help)
            raise FetchError(f"cannot write {part}: {exc}") from exc
        bar.update(0, final=True)
    got = part.stat().st_size
    expected = promised if promised is not None else size
    if expected is not None and got < expected:
        raise _Interrupted(f"transfer ended after {got:,} of {expected:,} bytes")


class _Interrupted(FetchError):
    """The transfer stopped early; the ``.part`` file can be resumed."""


def _content_range_start(value: str) -> int | None:
    # "bytes 100-199/200" -> 100
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _content_range_total(value: str) -> int | None:
    # "bytes 100-199/200" -> 200 ("*" when unknown)
    total = value.rpartition("/")[2]
    return int(total) if total.isdigit() else None


def fetch(
    url: str | None = None,
    output: str | os.PathLike[str] = DEFAULT_OUTPUT,
    sha256: str | None = None,
    size: int | None = -1,
    *,
    retries: int = 2,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
    progress: TextIO | None = sys.stderr,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Download ``url`` to ``output`` and verify it; returns the path of the verified file.

    ``sha256`` and ``size`` default to the manifest's official file; pass ``size=None`` to
    skip the size check (the sha256 is always checked). ``retries`` is how many times a
    transfer cut mid-way is resumed within this call.
    """
    url = url or default_url()
    sha256 = (sha256 or official_file()["sha256"]).lower()
    if size == -1:
        size = official_file()["size_bytes"]
    output = Path(output)
    part = output.with_name(output.name + ".part")
    say = log or (lambda msg: print(msg, file=progress or sys.stderr))

    if output.exists():
        problem = check_file(output, sha256, size)
        if problem is None:
            say(f"{output} is already present and verified (sha256 {sha256}); nothing to do")
            return output
        say(f"{output} exists but does not verify ({problem}); downloading it again")

    output.parent.mkdir(parents=True, exist_ok=True)
    timeout = (connect_timeout, read_timeout)
    say(f"downloading {url}\n  -> {output}" + (f" ({size:,} bytes)" if size else ""))
    try:
        _resolve_or_fail(url, connect_timeout)
        with requests.Session() as session:
            for attempt in range(retries + 1):
                try:
                    _transfer(session, url, part, size, timeout, progress, say)
                    break
                except _Interrupted as exc:
                    if attempt == retries:
                        raise FetchError(f"{exc}; run the same command again to resume from {part}") from exc
                    say(f"{exc}; resuming ({attempt + 1}/{retries})")
    except NetworkUnavailable as exc:
        raise NetworkUnavailable(f"{exc}\n{offline_help(output)}") from exc

    problem = check_file(part, sha256, size)
    if problem is not None:
        part.unlink(missing_ok=True)
        raise ChecksumMismatch(
            f"downloaded file rejected and deleted: {problem}. "
            "The URL does not serve the expected checkpoint (wrong URL, a proxy's error page, "
            "or a different version); nothing was written under the final name."
        )
    os.replace(part, output)
    say(f"verified {output} (sha256 {sha256})")
    return output
