"""The KServe deployment's TorchServe config (`deploy/kserve/config/config.properties`) with the
real TorchServe: the model registered from its snapshot, v1 requests answered by the handler
itself, several requests batched together, no token (the KServe model server sends none), and
the environment KServe's runtime sets (TS_SERVICE_ENVELOPE=kserve) ignored.

Only the addresses and paths that KServe's pod provides are replaced (ports, model store,
metrics file); every other line is the shipped file's.

Then the same requests through KServe's own model server in front, as in the runtime's pod
(`tests/e2e/kserve_front.py`, kserve 0.13.0 in `.venv-kserve`): what a KServe client sees.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.e2e.seed import IMAGE_NAMES, MODEL, golden, image_b64
from tests.e2e.torchserve import REPO, TorchServe, free_ports

pytestmark = pytest.mark.e2e

KSERVE_CONFIG = REPO / "deploy" / "kserve" / "config" / "config.properties"
GREEDY = {"temperature": 0, "num_captions": 1}
# What KServe's model server sends: `application/json` (recent kserve) or with a charset (older)
V1_CONTENT_TYPES = ["application/json", "application/json; charset=UTF-8"]
KSERVE_PYTHON = Path(os.environ.get("KSERVE_PYTHON", REPO / ".venv-kserve" / "bin" / "python"))
FRONT_READY_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def kserve(e2e_root, seed_archive):
    store = e2e_root / "kserve-store"  # only captioner.mar, as in <storageUri>/model-store
    store.mkdir()
    os.link(seed_archive, store / "captioner.mar")
    # KServe's TorchServe runtime puts TS_SERVICE_ENVELOPE=kserve in the container's environment
    with TorchServe(e2e_root / "kserve-ts", model_store=store, config=KSERVE_CONFIG,
                    env={"TS_SERVICE_ENVELOPE": "kserve"}) as ts:
        ts.wait_model_ready(MODEL)
        yield ts


@pytest.fixture(scope="module")
def front(kserve, e2e_root):
    """KServe's model server (its own Python, `.venv-kserve`) forwarding to that TorchServe:
    its base URL, once it reports the model ready."""
    if not KSERVE_PYTHON.exists():
        pytest.fail(f"{KSERVE_PYTHON} is missing: `make test` builds it from tests/e2e/kserve-requirements.txt "
                    "(or set KSERVE_PYTHON to a Python that has kserve 0.13.0)")
    (port,) = free_ports(1)
    log_path = e2e_root / "kserve-front.log"
    command = [str(KSERVE_PYTHON), str(REPO / "tests" / "e2e" / "kserve_front.py"), "--model-name", MODEL,
               "--predictor-host", kserve.url("inference", "").removeprefix("http://"),
               "--management-url", kserve.url("management", ""), "--front-port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + FRONT_READY_TIMEOUT_S
        while not _front_ready(base):
            assert process.poll() is None, f"KServe's model server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"KServe's model server not ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _front_ready(base: str) -> bool:
    try:
        response = requests.get(f"{base}/v1/models/{MODEL}", timeout=5)
    except requests.ConnectionError:
        return False
    return response.status_code == 200 and response.json().get("ready") is True


def predict(target: TorchServe | str, instances: list[dict], content_type: str = V1_CONTENT_TYPES[0]) -> requests.Response:
    """A v1 request to TorchServe itself, or to KServe's model server at the base URL `target`."""
    base = target if isinstance(target, str) else target.url("inference", "")
    return requests.post(f"{base}/v1/models/{MODEL}:predict", data=json.dumps({"instances": instances}),
                         headers={"Content-Type": content_type}, timeout=120)


def test_snapshot_registers_the_model_with_the_archive_settings(kserve):
    (description,) = kserve.describe(MODEL)
    assert (description["batchSize"], description["maxBatchDelay"], description["responseTimeout"]) == (8, 50, 600)
    assert [w["status"] for w in description["workers"]] == ["READY"]


def check_batched_and_in_instance_order(ts: TorchServe, target: TorchServe | str, content_type: str) -> None:
    """Concurrent v1 requests to `target` (TorchServe `ts` itself, or KServe's model server in
    front of it): golden predictions in instance order, in fewer batches than requests."""
    requests_ = [[{"image": image_b64(name), **GREEDY}] for name in IMAGE_NAMES]
    requests_.append([{"image": image_b64(name), **GREEDY, "styles": ["concise"]} for name in reversed(IMAGE_NAMES)])
    batches_before = sum(ts.metric_values("CaptionBatchesTotal", MODEL))
    with ThreadPoolExecutor(len(requests_)) as pool:
        responses = list(pool.map(lambda instances: predict(target, instances, content_type), requests_))
    for name, response in zip(IMAGE_NAMES, responses):
        assert response.status_code == 200, response.text[:300]
        assert response.json() == {"predictions": [golden(name)]}
    assert responses[-1].json() == {"predictions": [golden(n, styles=["concise"]) for n in reversed(IMAGE_NAMES)]}
    batches = sum(ts.metric_values("CaptionBatchesTotal", MODEL)) - batches_before
    assert batches < len(requests_), f"{len(requests_)} concurrent requests took {batches} batches"


@pytest.mark.parametrize("content_type", V1_CONTENT_TYPES)
def test_v1_requests_are_batched_and_answered_in_instance_order(kserve, content_type):
    check_batched_and_in_instance_order(kserve, kserve, content_type)


def test_a_bad_instance_fails_its_request_with_its_index(kserve):
    response = predict(kserve, [{"image": image_b64("chelsea.png"), **GREEDY}, {"image": "@@not base64@@"}])
    assert response.status_code == 400
    assert response.json()["error"].startswith("instances[1]: 'image' is not valid base64"), response.text


# ------------------------------------------------------------------ through KServe's model server
def test_through_kserve_v1_requests_are_batched_and_answered_in_instance_order(kserve, front):
    check_batched_and_in_instance_order(kserve, front, V1_CONTENT_TYPES[0])


def test_through_kserve_a_bad_instance_is_a_500_that_keeps_the_handlers_message(front):
    """KServe's model server turns any error status of its predictor into 500 and keeps the
    handler's JSON message (with TorchServe's status and URL appended)."""
    response = predict(front, [{"image": image_b64("chelsea.png"), **GREEDY}, {"image": "@@not base64@@"}])
    assert response.status_code == 500
    error = response.json()["error"]
    assert "instances[1]: 'image' is not valid base64" in error and "'400 Bad Request'" in error, error
    # the model keeps serving through it
    assert predict(front, [{"image": image_b64("coffee.png"), **GREEDY}]).json() == {"predictions": [golden("coffee.png")]}


def test_through_kserve_a_body_that_is_not_json_is_refused_by_kserve_itself(front):
    response = requests.post(f"{front}/v1/models/{MODEL}:predict", data=b"not json",
                             headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text[:300]
    assert response.json()["error"].startswith("Unrecognized request format"), response.text[:300]
