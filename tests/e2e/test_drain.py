"""The container's preStop hook (`docker/drain.py`) against the real TorchServe: a pod that is
stopped while it computes and queues requests answers all of them.

TorchServe 0.12 resets the connections of every request it holds when it gets SIGTERM (as tini
`-g` delivers it to the container's process group). Kubernetes runs the hook first, so here:
requests in flight, the hook, then the same SIGTERM.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import requests

from tests.e2e.seed import MODEL, image_b64
from tests.e2e.torchserve import REPO, TorchServe

pytestmark = pytest.mark.e2e

DRAIN = REPO / "docker" / "drain.py"
# 24 captions of up to 40 tokens each: long enough on the tiny model that a batch of them is
# still being computed when the hook starts.
SLOW = {"num_captions": 8, "max_new_tokens": 40}
FIRST_WAVE, SECOND_WAVE = 8, 4  # a full batch, then requests that queue behind it


@pytest.fixture
def doomed_server(e2e_root, seed_archive, model_store, request):
    """A TorchServe of its own, stopped by each test (with SIGTERM to its process group)."""
    ts = TorchServe(e2e_root / f"drain-{request.node.name}", model_store=model_store,
                    overrides={"load_models": seed_archive.name})
    with ts:
        ts.wait_model_ready(MODEL)
        yield ts


def send_in_flight(ts: TorchServe) -> tuple[list, list[threading.Thread]]:
    """Two waves of slow requests, each in its own thread; returns (results, threads)."""
    results: list = []

    def call(seed: int) -> None:
        try:
            response = ts.infer(MODEL, json={"image": image_b64("chelsea.png"), "seed": seed, **SLOW}, timeout=120)
            results.append((response.status_code, response.text[:200]))
        except requests.RequestException as exc:
            results.append((None, repr(exc)[:200]))

    threads = [threading.Thread(target=call, args=(seed,)) for seed in range(FIRST_WAVE + SECOND_WAVE)]
    for k, thread in enumerate(threads):
        thread.start()
        if k == FIRST_WAVE - 1:
            time.sleep(0.1)
    time.sleep(0.3)
    return results, threads


def run_drain(ts: TorchServe, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTION_RUN_DIR": str(ts.workdir), "CAPTION_MANAGEMENT_PORT": str(ts.ports["management"]),
           "CAPTION_DRAIN_SETTLE_S": "0", **env}
    return subprocess.run([sys.executable, str(DRAIN)], env=env, capture_output=True, text=True, timeout=120)


def test_the_prestop_hook_lets_every_request_in_flight_be_answered(doomed_server):
    ts = doomed_server
    results, threads = send_in_flight(ts)
    unanswered_at_hook = FIRST_WAVE + SECOND_WAVE - len(results)
    drained = run_drain(ts)
    ts.stop()  # what Kubernetes sends once the hook has returned
    for thread in threads:
        thread.join(timeout=150)
    assert drained.returncode == 0 and drained.stdout.startswith(f"drained ({MODEL} 1.0)"), drained
    assert unanswered_at_hook > 0, "every request was answered before the hook ran: the test proves nothing"
    assert [status for status, _ in results] == [200] * (FIRST_WAVE + SECOND_WAVE), results


def test_without_the_hook_sigterm_resets_the_requests_in_flight(doomed_server):
    """Why the hook exists (TorchServe 0.12's behaviour, not this project's)."""
    ts = doomed_server
    results, threads = send_in_flight(ts)
    ts.stop()
    for thread in threads:
        thread.join(timeout=150)
    assert len(results) == FIRST_WAVE + SECOND_WAVE
    assert any(status is None for status, _ in results), results


def test_the_hook_gives_up_at_its_timeout_and_says_so(doomed_server):
    ts = doomed_server
    results, threads = send_in_flight(ts)
    started = time.monotonic()
    drained = run_drain(ts, CAPTION_DRAIN_TIMEOUT_S="0.2")
    took = time.monotonic() - started
    for thread in threads:
        thread.join(timeout=150)
    assert drained.returncode == 1 and drained.stdout.startswith("not drained after"), drained
    assert took < 10, took
