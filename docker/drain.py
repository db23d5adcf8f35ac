#!/usr/bin/env python3
"""Kubernetes preStop hook of the caption container: TorchServe answers what it holds first.

TorchServe 0.12 stops at once on SIGTERM: the connections of the requests it is computing or
queueing are reset, unanswered (``tests/e2e/test_drain.py`` shows it). Kubernetes runs this
hook before it sends SIGTERM to the container (``deploy/k8s/deployment.yaml``), all of it
within ``terminationGracePeriodSeconds``:

1. settle: ``CAPTION_DRAIN_SETTLE_S`` seconds (default 10) for the Service to stop sending new
   requests here (a terminating pod's endpoint is removed while it is already stopping);
2. barrier: for every registered model version, a describe request with ``customized=true``
   on the management API. TorchServe queues it behind the version's earlier requests and
   sends it to the worker in a batch of its own, and the handler answers it, so its answer
   means the worker has answered everything queued before it (one worker per model, as
   deployed; with several, one of them may still be computing). A full queue
   (``job_queue_size``) refuses it with 503; with no new requests arriving the queue empties
   a batch at a time, so the hook asks again every ``RETRY_S`` seconds.

``CAPTION_DRAIN_TIMEOUT_S`` (default 40) bounds the whole hook. Exit 0 once drained, 1 with
the reason otherwise (Kubernetes records a failed hook as an event and stops the container
anyway). The management key comes from ``key_file.json`` like the health check's inference
key (none with ``CAPTION_DISABLE_TOKEN_AUTH=true``). Stdlib only.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus

from healthcheck import api_key, key_file, setting

SETTLE_S = 10  # CAPTION_DRAIN_SETTLE_S
TIMEOUT_S = 40  # CAPTION_DRAIN_TIMEOUT_S: under the Deployment's terminationGracePeriodSeconds
RETRY_S = 0.5  # pause before asking a version whose queue was full again


class Management:
    """GET requests to TorchServe's management API on this host, with the live management key."""

    def __init__(self, deadline: float):
        self.base = f"http://{setting('CAPTION_HEALTH_HOST', '127.0.0.1')}:{setting('CAPTION_MANAGEMENT_PORT', '8081')}"
        self.deadline = deadline
        key, problem = api_key(key_file(), "management")
        if problem:
            raise RuntimeError(problem)
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def get(self, path: str, **query: str):
        url = self.base + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        timeout = self.deadline - time.monotonic()
        if timeout <= 0:
            raise TimeoutError(f"no time left for {url}")
        request = urllib.request.Request(url, headers=self.headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)


def model_versions(api: Management) -> list[tuple[str, str]]:
    """(name, version) of every registered model version that has a worker (one without
    workers holds no request, and a describe request would wait for a worker in vain)."""
    names = [entry["modelName"] for entry in api.get("/models", limit="1000")["models"]]
    return [(name, description["modelVersion"]) for name in names
            for description in api.get(f"/models/{urllib.parse.quote(name)}/all") if description.get("workers")]


def barrier(api: Management, name: str, version: str) -> None:
    """Returns once the version's worker has answered what was queued before this request."""
    path = f"/models/{urllib.parse.quote(name)}/{urllib.parse.quote(version)}"
    while True:
        try:
            api.get(path, customized="true")
            return
        except urllib.error.HTTPError as exc:
            exc.close()
            if exc.code != HTTPStatus.SERVICE_UNAVAILABLE:
                raise
            if time.monotonic() + RETRY_S >= api.deadline:
                raise TimeoutError(f"the queue of {name} {version} stayed full (503)") from exc
        time.sleep(RETRY_S)


def drain() -> tuple[bool, str]:
    started = time.monotonic()
    deadline = started + float(setting("CAPTION_DRAIN_TIMEOUT_S", str(TIMEOUT_S)))
    time.sleep(min(float(setting("CAPTION_DRAIN_SETTLE_S", str(SETTLE_S))), max(0.0, deadline - started)))
    try:
        api = Management(deadline)
        versions = model_versions(api)
        if versions:
            with ThreadPoolExecutor(len(versions)) as pool:
                list(pool.map(lambda model: barrier(api, *model), versions))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # URLError and timeouts are OSErrors
        return False, f"not drained after {time.monotonic() - started:.1f} s: {exc}"
    drained = ", ".join(f"{name} {version}" for name, version in versions) or "no models"
    return True, f"drained ({drained}) in {time.monotonic() - started:.1f} s"


def main() -> int:
    drained, message = drain()
    print(message, flush=True)
    return 0 if drained else 1


if __name__ == "__main__":
    sys.exit(main())
