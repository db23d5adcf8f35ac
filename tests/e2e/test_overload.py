"""A full queue against the real TorchServe: `job_queue_size` bounds the requests a model
holds besides the batch its worker computes. Past it a request is refused at once with 503 and
a JSON message (no time-out), every accepted request is answered, and the preStop hook
(`docker/drain.py`), whose describe request is refused the same way, waits for room and drains.
"""

from __future__ import annotations

import json

import pytest

from tests.e2e.seed import MODEL
from tests.e2e.slow_requests import FULL_BATCH, join, run_drain, send_waves
from tests.e2e.torchserve import TorchServe

pytestmark = pytest.mark.e2e

QUEUE = 2  # job_queue_size of this test's server (shipped: 64)
WAVES = (FULL_BATCH, 6)  # a batch the worker takes, then more than the queue holds
SENT = sum(WAVES)


@pytest.fixture
def small_queue_server(e2e_root, seed_archive, model_store, request):
    ts = TorchServe(e2e_root / f"overload-{request.node.name}", model_store=model_store,
                    overrides={"load_models": seed_archive.name, "job_queue_size": str(QUEUE)})
    with ts:
        ts.wait_model_ready(MODEL)
        yield ts


def test_past_the_queue_requests_get_503_at_once_and_every_accepted_one_is_answered(small_queue_server):
    results, threads = send_waves(small_queue_server, WAVES)
    while_computing = list(results)  # what came back while the first batch was being computed
    join(threads)
    statuses = [status for status, _ in results]
    assert len(statuses) == SENT and set(statuses) == {200, 503}, results
    # The worker holds at most one batch and the queue QUEUE more; the rest were refused...
    assert QUEUE < statuses.count(200) <= FULL_BATCH + QUEUE, statuses
    # ...at once: every refusal came back before the first caption did.
    assert [status for status, _ in while_computing] == [503] * statuses.count(503), (while_computing, results)
    refusal = json.loads(while_computing[0][1])
    assert refusal["code"] == 503 and refusal["type"] == "ServiceUnavailableException", refusal
    assert refusal["message"].startswith(f'Model "{MODEL}" has no worker to serve inference request'), refusal


def test_the_hook_waits_for_room_in_a_full_queue_then_drains(small_queue_server):
    ts = small_queue_server
    results, threads = send_waves(ts, WAVES)
    at_hook = [status for status, _ in results]
    drained = run_drain(ts)
    ts.stop()
    join(threads)
    # Refused requests and no caption yet: the queue was full when the hook asked.
    assert at_hook and set(at_hook) == {503}, f"the queue was not full when the hook started: {results}"
    assert drained.returncode == 0 and drained.stdout.startswith(f"drained ({MODEL} 1.0)"), drained
    statuses = [status for status, _ in results]
    assert len(statuses) == SENT and set(statuses) == {200, 503}, results
