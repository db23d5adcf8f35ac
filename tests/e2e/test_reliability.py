"""Every bad input gets a clear 4xx and nothing else breaks -- against the real TorchServe 0.12.

The corpus (tests/e2e/bad_inputs.py) is sent to a second registration of the seed-tiny
archive with ``batch_size=8&max_batch_delay=500`` on the session server, in groups of exactly
8 CONCURRENT requests: up to six cases and at least two valid greedy requests, so that each
group is one TorchServe batch (one handler call; checked with the handler's metrics). For
every case: the status code, the ``{"error": ...}`` JSON message, the golden captions of its
batch-mates, and the worker still READY with the same pid after its batch (no crash, no
restart). Then the worker's memory across the decompression bombs, and bodies over
``max_request_size`` (413 from the frontend, on a server started with a 1 MiB limit so the
test need not send 32 MB).
"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from tests.e2e.bad_inputs import (ECHO_CASES, GREEDY, MAX_PIXELS, Case, b64, by_name, corpus, one_thread_archive,
                                  valid_request)
from tests.e2e.seed import MODEL, STYLE_KEYS, golden
from tests.e2e.torchserve import REPO, TorchServe

pytestmark = pytest.mark.e2e

BATCHED = "captioner-batch8"
MATES = ("chelsea.png", "rocket.jpg")  # the valid requests sent in the same batch as each case
CLIENT_TIMEOUT = 120  # s; no request may hang


# ------------------------------------------------------------------ helpers
def worker_of(server: TorchServe, model: str) -> dict:
    workers = server.describe(model)[0]["workers"]
    assert len(workers) == 1, workers
    return workers[0]


def status_of(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) of a worker process."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


def check_answer(case: Case, response: requests.Response, reference: requests.Response | None = None) -> str:
    """Assert the answer fits the case; return a one-line summary for the report."""
    assert response.status_code in case.statuses, (case.name, response.status_code, response.text[:500])
    assert response.headers.get("content-type") == "application/json", (case.name, response.headers)
    body = response.json()
    if response.status_code == 200:
        if case.golden:
            assert body == golden(case.golden), (case.name, body)
        else:
            assert list(body) == list(STYLE_KEYS.values()), (case.name, body)
            assert all(captions and all(isinstance(c, str) and c for c in captions) for captions in body.values())
        if reference is not None:
            assert reference.status_code == 200, reference.text
            assert body == reference.json(), (case.name, body, reference.json())
        return "200 " + body["Concise"][0]
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"], (case.name, body)
    assert case.needle in body["error"], (case.name, body["error"])
    return f"{response.status_code} {body['error'][:160]}"


def send(server: TorchServe, model: str, kwargs: dict) -> requests.Response:
    return server.infer(model, timeout=CLIENT_TIMEOUT, **kwargs)


def prepare(server: TorchServe, model: str, kwargs: dict) -> requests.PreparedRequest:
    """The request fully encoded in advance, so that a group's 8 requests leave at once."""
    kwargs = dict(kwargs)
    headers = {**server.auth("inference"), **kwargs.pop("headers", {})}
    return requests.Request("POST", server.url("inference", f"/predictions/{model}"), headers=headers,
                            **kwargs).prepare()


def send_prepared(request: requests.PreparedRequest) -> requests.Response:
    with requests.Session() as session:
        return session.send(request, timeout=CLIENT_TIMEOUT)


def metric(server: TorchServe, name: str, model: str) -> float:
    values = server.metric_values(name, model)
    return values[0] if values else 0.0


def wait_metric(server: TorchServe, name: str, model: str, at_least: float, timeout: float = 15) -> float:
    deadline = time.monotonic() + timeout
    while (value := metric(server, name, model)) < at_least and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def batched(server, model_store):
    """The seed-tiny archive (one intra-op thread) registered with batch_size 8 and a 500 ms delay."""
    archive = one_thread_archive(model_store)
    response = server.manage("POST", "/models", params={
        "url": archive, "model_name": BATCHED, "batch_size": 8, "max_batch_delay": 500,
        "initial_workers": 1, "synchronous": "true"})
    assert response.status_code == 200, response.text
    try:
        # READY a moment after the synchronous answer (see test_scale_workers_up_and_down).
        description = server.wait_model_ready(BATCHED, timeout=30)[0]
        assert (description["batchSize"], description["maxBatchDelay"]) == (8, 500)
        yield BATCHED
    finally:
        server.manage("DELETE", f"/models/{BATCHED}")


@pytest.fixture(scope="module")
def batched_pid(server, batched) -> int:
    worker = worker_of(server, batched)
    assert worker["status"] == "READY"
    return worker["pid"]


def test_corpus_limits_match_the_shipped_settings():
    handler = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())["handler"]
    assert handler["max_pixels"] == MAX_PIXELS
    assert handler["limits"]["max_num_captions"] == 8


# ------------------------------------------------------------------ the corpus, in full batches
@dataclass
class Outcome:
    """What one case got: its response, its reference's, its batch-mates', the worker after."""

    response: requests.Response
    reference: requests.Response | None
    mates: list[tuple[str, requests.Response]]
    worker: dict
    batch: int
    seconds: float


def groups_of_eight(cases: list[Case]) -> list[list[Case]]:
    """Cases packed into groups of at most six requests (a case captioned 'like' another image
    brings its reference image along), leaving room for at least two valid batch-mates."""
    groups, current, size = [], [], 0
    for case in cases:
        need = 1 + (case.same_as is not None)
        if size + need > 8 - len(MATES):
            groups.append(current)
            current, size = [], 0
        current.append(case)
        size += need
    return groups + [current] if current else groups


@dataclass
class CorpusRun:
    cases: dict[str, Outcome]
    sent: int  # requests, the batch-mates included
    groups: int
    served: float  # requests the handler saw (CaptionRequestsTotal)
    batches: float  # handler calls (CaptionBatchesTotal)


@pytest.fixture(scope="module")
def outcomes(server, batched, batched_pid) -> CorpusRun:
    """Send the corpus in batches of exactly 8 concurrent requests: up to six cases, two valid
    greedy requests, padded with valid ones. batchSize 8 is reached at once, so each group is one
    handler call. After each batch the worker must still be READY with the same pid."""
    results: dict[str, Outcome] = {}
    requests_before = metric(server, "CaptionRequestsTotal", batched)
    batches_before = metric(server, "CaptionBatchesTotal", batched)
    groups = groups_of_eight(list(corpus()))
    sent = 0
    for number, group in enumerate(groups):
        jobs: list[tuple[str, dict]] = []
        for case in group:
            jobs.append((case.name, case.request()))
            if case.same_as is not None:
                jobs.append((f"{case.name} [reference]", {"json": {"image": b64(case.same_as()), **GREEDY}}))
        mates = [MATES[i % len(MATES)] for i in range(8 - len(jobs))]
        jobs += [(f"mate:{mate}", valid_request(mate)) for mate in mates]
        prepared = [prepare(server, batched, kwargs) for _, kwargs in jobs]
        started = time.monotonic()
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = dict(zip([name for name, _ in jobs], pool.map(send_prepared, prepared)))
        seconds = time.monotonic() - started
        sent += len(jobs)
        worker = worker_of(server, batched)
        mate_responses = [(name.removeprefix("mate:"), r) for name, r in responses.items() if name.startswith("mate:")]
        for case in group:
            results[case.name] = Outcome(responses[case.name], responses.get(f"{case.name} [reference]"),
                                         mate_responses, worker, number, seconds)
    served = wait_metric(server, "CaptionRequestsTotal", batched, requests_before + sent) - requests_before
    batches = metric(server, "CaptionBatchesTotal", batched) - batches_before
    print(f"\ncorpus: {len(results)} cases + batch-mates = {sent} requests in {len(groups)} groups of 8 -> "
          f"{served:.0f} requests seen by the handler in {batches:.0f} handler batches")
    return CorpusRun(results, sent, len(groups), served, batches)


def test_each_group_of_eight_was_one_handler_batch(outcomes):
    """Every request reached the handler, in (nearly) one handler call per group. On a loaded
    host a group's last request may miss the 500 ms window and make a batch of its own; more
    than a few such splits means the cases did not share batches with valid requests."""
    assert outcomes.served == outcomes.sent, (outcomes.served, outcomes.sent)
    assert outcomes.groups <= outcomes.batches <= outcomes.groups + 2, \
        f"{outcomes.groups} groups of 8 concurrent requests took {outcomes.batches} handler batches"


@pytest.mark.parametrize("name", [case.name for case in corpus()])
def test_bad_input_answer_batch_mates_and_worker(outcomes, batched_pid, name):
    case, outcome = by_name(name), outcomes.cases[name]
    summary = check_answer(case, outcome.response, outcome.reference)
    for mate, response in outcome.mates:
        assert response.status_code == 200, (mate, response.status_code, response.text[:300])
        assert response.json() == golden(mate), mate
    worker = outcome.worker
    assert worker["status"] == "READY" and worker["pid"] == batched_pid, ("worker restarted or not ready", worker)
    print(f"\n[{name}] -> {summary} | {len(outcome.mates)} batch-mates OK (batch {outcome.batch}, "
          f"{outcome.seconds:.2f} s) | worker {worker['pid']} READY")


# ------------------------------------------------------------------ bombs are not decoded
BOMBS = ("PNG bomb 30000x30000 (real 1-bit PNG)", "PNG header claiming 30000x30000",
         "PNG 8000x6000 = 48 MP (over max_pixels, under Pillow's limit)", "JPEG header claiming 65000x65000")


def test_decompression_bombs_are_refused_without_decoding(server, batched, batched_pid):
    """Decoding the 30000x30000 bomb would take 900 MB (Pillow's 1-bit image: a byte per pixel):
    the worker's peak RSS must not move, and each answer comes at once."""
    before = status_of(batched_pid)
    for name in BOMBS:
        case = by_name(name)
        started = time.monotonic()
        response = send(server, batched, case.request())
        elapsed = time.monotonic() - started
        summary = check_answer(case, response)
        assert elapsed < 10, (name, elapsed)
        print(f"\n[{name}] {summary} in {elapsed:.2f} s")
    after = status_of(batched_pid)
    print(f"worker {batched_pid}: VmHWM {before['VmHWM'] // 1024} -> {after['VmHWM'] // 1024} MiB, "
          f"VmRSS {before['VmRSS'] // 1024} -> {after['VmRSS'] // 1024} MiB")
    assert after["VmHWM"] - before["VmHWM"] < 100 * 1024, (before, after)


# ------------------------------------------------------------------ over max_request_size
@pytest.fixture(scope="module")
def small_server(e2e_root, model_store, seed_archive):
    """A second TorchServe whose max_request_size is 1 MiB (one thread: the host is shared)."""
    with TorchServe(e2e_root / "ts-small-request", model_store=model_store,
                    overrides={"load_models": seed_archive.name, "max_request_size": str(1 << 20)},
                    env={"OMP_NUM_THREADS": "1"}) as ts:
        ts.wait_model_ready(MODEL)
        yield ts


@pytest.mark.parametrize("form", ["json", "raw", "multipart"])
def test_body_over_max_request_size_gets_413_and_the_server_keeps_serving(small_server, form):
    big = random.Random(3).randbytes(1_200_000)  # 1.2 MB > 1 MiB, ~1.6 MB as base64 in JSON
    payload = {"json": {"json": {"image": b64(big)}},
               "raw": {"data": big, "headers": {"Content-Type": "image/png"}},
               "multipart": {"files": {"data": ("big.png", big, "image/png")}}}[form]
    pid = worker_of(small_server, MODEL)["pid"]
    try:
        response = send(small_server, MODEL, payload)
    except requests.ConnectionError as error:  # the frontend may close while the body is still being sent
        pytest.fail(f"no 413 answer, the connection was dropped: {error}")
    assert response.status_code == 413, (response.status_code, response.text[:300])
    print(f"\n[{form} body of {len(big)} bytes, limit 1 MiB] -> 413 {response.text.strip()[:200]}")
    # The frontend refused it before any worker saw it; the next request is served.
    assert send(small_server, MODEL, valid_request("coffee.png")).json() == golden("coffee.png")
    worker = worker_of(small_server, MODEL)
    assert worker["status"] == "READY" and worker["pid"] == pid


def test_body_just_under_max_request_size_is_served(small_server):
    """The limit is on the HTTP body: an image whose JSON stays under 1 MiB is captioned."""
    from tests.e2e.bad_inputs import encode, rgb

    image = encode(rgb("chelsea.png").resize((900, 600)), "PNG")
    payload = {"json": {"image": b64(image), "temperature": 0, "num_captions": 1}}
    size = len(b64(image))
    assert 500_000 < size < 1 << 20, size
    response = send(small_server, MODEL, payload)
    assert response.status_code == 200, response.text[:300]


# ------------------------------------------------------------------ error messages stay small
# Last in the module: if the echo came back, these requests would restart the batched model's worker.
@pytest.mark.parametrize("name", [case.name for case in ECHO_CASES])
def test_error_message_echoing_a_huge_value_does_not_kill_the_worker(server, batched, name):
    """A 1.5 MB unknown style or option name (the request is within max_request_size) must get a
    400 whose message is bounded, with its batch-mates captioned and the worker untouched.

    The failure it guards against (seen before model/styles.py quoted at most 40 characters of a
    client's value and the handler capped messages at MAX_ERROR_CHARS): the whole name echoed
    ("unknown style '<1.5 MB>'"), a worker reply over max_response_size (1 MiB) that the frontend
    drops (TooLongFrameException), the whole batch answered 500 "Worker died." and the worker
    restarted: any client with the inference key could take a worker down for ~10 s per request."""
    case = next(case for case in ECHO_CASES if case.name == name)
    pid = worker_of(server, batched)["pid"]
    jobs = [case.request()] + [valid_request(mate) for mate in MATES]
    prepared = [prepare(server, batched, kwargs) for kwargs in jobs]
    with ThreadPoolExecutor(len(prepared)) as pool:
        responses = list(pool.map(send_prepared, prepared))
    print(f"\n[{name}] -> {[(r.status_code, r.text[:80]) for r in responses]}")
    try:
        assert responses[0].status_code == 400, (responses[0].status_code, responses[0].text[:300])
        assert len(responses[0].content) < 10_000, "the error message echoes the whole value"
        summary = check_answer(case, responses[0])
        for mate, response in zip(MATES, responses[1:]):
            assert response.status_code == 200 and response.json() == golden(mate), (mate, response.text[:300])
        assert worker_of(server, batched)["pid"] == pid
        print(summary[:200])
    finally:  # leave a serving worker behind whatever happened
        server.wait_model_ready(batched, timeout=120)
