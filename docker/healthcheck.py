#!/usr/bin/env python3
"""Container health check: GET /ping on the inference port, with the inference key.

TorchServe 0.12 puts /ping behind token authorization like every inference route, so the
check reads the current inference key from key_file.json in TorchServe's working directory
(``$CAPTION_RUN_DIR``, default ``$CAPTION_HOME/run``); the file is rewritten when the key is
rotated through the token API, so the check always uses the live key. With token
authorization off (no key file and ``CAPTION_DISABLE_TOKEN_AUTH=true``) it sends no header.

Healthy (exit 0) only when /ping answers 200 with ``"status": "Healthy"``, i.e. the frontend
is up and the model has its minimum workers. Exit 1 otherwise, with the reason on stdout
(``docker inspect`` shows it). Stdlib only; used by the Dockerfile HEALTHCHECK and the
Kubernetes exec probes.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path


def setting(name: str, default: str) -> str:
    return os.environ.get(name) or default


def key_file() -> Path:
    home = setting("CAPTION_HOME", "/home/model-server")
    return Path(setting("CAPTION_RUN_DIR", f"{home}/run")) / "key_file.json"


def api_key(path: Path, kind: str = "inference") -> tuple[str | None, str | None]:
    """``(key, problem)``: the ``kind`` key (inference or management), or why there is none."""
    if setting("CAPTION_DISABLE_TOKEN_AUTH", "false").lower() == "true":
        return None, None
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))[kind]
    except FileNotFoundError:
        return None, f"no {path} yet (TorchServe still starting?)"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"cannot read the {kind} key from {path}: {exc!r}"
    expires = entry.get("expiration time")
    if expires:
        # Java's Instant.toString: "2026-01-02T03:04:05.123456789Z"; Python 3.10 (the image's)
        # parses at most 6 fractional digits and no "Z".
        stamp = re.sub(r"(\.\d{6})\d+", r"\1", expires.replace("Z", "+00:00"))
        try:
            when = datetime.fromisoformat(stamp)
        except ValueError:
            when = None  # unknown format: let /ping decide
        if when is not None and when <= datetime.now(timezone.utc):
            return None, (
                f"the {kind} key expired at {expires}: rotate it with "
                f"GET /token?type={kind} on the management port (API key from key_file.json)"
            )
    return entry.get("key"), None


def check(timeout: float = 5.0) -> tuple[bool, str]:
    host = setting("CAPTION_HEALTH_HOST", "127.0.0.1")
    port = setting("CAPTION_INFERENCE_PORT", "8080")
    key, problem = api_key(key_file())
    if problem:
        return False, problem
    request = urllib.request.Request(f"http://{host}:{port}/ping")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            body = resp.read().decode("utf-8", "replace")
            code = resp.status
    except urllib.error.HTTPError as exc:
        body, code = exc.read().decode("utf-8", "replace"), exc.code
    except (urllib.error.URLError, OSError) as exc:
        return False, f"/ping unreachable on {host}:{port}: {exc}"
    try:
        status = json.loads(body).get("status")
    except (ValueError, AttributeError):
        status = None
    if code == 200 and status == "Healthy":
        return True, "Healthy"
    return False, f"/ping answered {code}: {body.strip()[:200]}"


def main() -> int:
    healthy, reason = check()
    print(reason)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
