"""The container's preStop hook (`docker/drain.py`) against the real TorchServe: a pod that is
stopped while it computes and queues requests answers all of them.

TorchServe 0.12 resets the connections of every request it holds when it gets SIGTERM (as tini
`-g` delivers it to the container's process group). Kubernetes runs the hook first, so here:
requests in flight, the hook, then the same SIGTERM.
"""

from __future__ import annotations

import time

import pytest

from tests.e2e.seed import MODEL
from tests.e2e.slow_requests import FULL_BATCH, join, run_drain, send_waves
from tests.e2e.torchserve import TorchServe

pytestmark = pytest.mark.e2e

WAVES = (FULL_BATCH, 4)  # a full batch, then requests that queue behind it
SENT = sum(WAVES)


@pytest.fixture
def doomed_server(e2e_root, seed_archive, model_store, request):
    """A TorchServe of its own, stopped by each test (with SIGTERM to its process group)."""
    ts = TorchServe(e2e_root / f"drain-{request.node.name}", model_store=model_store,
                    overrides={"load_models": seed_archive.name})
    with ts:
        ts.wait_model_ready(MODEL)
        yield ts


def test_the_prestop_hook_lets_every_request_in_flight_be_answered(doomed_server):
    ts = doomed_server
    results, threads = send_waves(ts, WAVES)
    unanswered_at_hook = SENT - len(results)
    drained = run_drain(ts)
    ts.stop()  # what Kubernetes sends once the hook has returned
    join(threads)
    assert drained.returncode == 0 and drained.stdout.startswith(f"drained ({MODEL} 1.0)"), drained
    assert unanswered_at_hook > 0, "every request was answered before the hook ran: the test proves nothing"
    assert [status for status, _ in results] == [200] * SENT, results


def test_without_the_hook_sigterm_resets_the_requests_in_flight(doomed_server):
    """Why the hook exists (TorchServe 0.12's behaviour, not this project's)."""
    ts = doomed_server
    results, threads = send_waves(ts, WAVES)
    ts.stop()
    join(threads)
    assert len(results) == SENT
    assert any(status is None for status, _ in results), results


def test_the_hook_gives_up_at_its_timeout_and_says_so(doomed_server):
    ts = doomed_server
    results, threads = send_waves(ts, WAVES)
    started = time.monotonic()
    drained = run_drain(ts, CAPTION_DRAIN_TIMEOUT_S="0.2")
    took = time.monotonic() - started
    join(threads)
    assert drained.returncode == 1 and drained.stdout.startswith("not drained after"), drained
    assert took < 10, took
