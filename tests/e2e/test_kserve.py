"""The KServe deployment's TorchServe config (`deploy/kserve/config/config.properties`) with the
real TorchServe: the model registered from its snapshot, v1 requests answered by the handler
itself, several requests batched together, no token (the KServe model server sends none), and
the environment KServe's runtime sets (TS_SERVICE_ENVELOPE=kserve) ignored.

Only the addresses and paths that KServe's pod provides are replaced (ports, model store,
metrics file); every other line is the shipped file's.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.e2e.seed import IMAGE_NAMES, MODEL, golden, image_b64
from tests.e2e.torchserve import REPO, TorchServe

pytestmark = pytest.mark.e2e

KSERVE_CONFIG = REPO / "deploy" / "kserve" / "config" / "config.properties"
GREEDY = {"temperature": 0, "num_captions": 1}
# What KServe's model server sends: `application/json` (recent kserve) or with a charset (older)
V1_CONTENT_TYPES = ["application/json", "application/json; charset=UTF-8"]


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


def predict(ts: TorchServe, instances: list[dict], content_type: str = V1_CONTENT_TYPES[0]) -> requests.Response:
    return requests.post(ts.url("inference", f"/v1/models/{MODEL}:predict"), data=json.dumps({"instances": instances}),
                         headers={"Content-Type": content_type}, timeout=120)


def test_snapshot_registers_the_model_with_the_archive_settings(kserve):
    (description,) = kserve.describe(MODEL)
    assert (description["batchSize"], description["maxBatchDelay"], description["responseTimeout"]) == (8, 50, 600)
    assert [w["status"] for w in description["workers"]] == ["READY"]


@pytest.mark.parametrize("content_type", V1_CONTENT_TYPES)
def test_v1_requests_are_batched_and_answered_in_instance_order(kserve, content_type):
    requests_ = [[{"image": image_b64(name), **GREEDY}] for name in IMAGE_NAMES]
    requests_.append([{"image": image_b64(name), **GREEDY, "styles": ["concise"]} for name in reversed(IMAGE_NAMES)])
    batches_before = sum(kserve.metric_values("CaptionBatchesTotal", MODEL))
    with ThreadPoolExecutor(len(requests_)) as pool:
        responses = list(pool.map(lambda instances: predict(kserve, instances, content_type), requests_))
    for name, response in zip(IMAGE_NAMES, responses):
        assert response.status_code == 200, response.text[:300]
        assert response.json() == {"predictions": [golden(name)]}
    assert responses[-1].json() == {"predictions": [golden(n, styles=["concise"]) for n in reversed(IMAGE_NAMES)]}
    batches = sum(kserve.metric_values("CaptionBatchesTotal", MODEL)) - batches_before
    assert batches < len(requests_), f"{len(requests_)} concurrent requests took {batches} batches"


def test_a_bad_instance_fails_its_request_with_its_index(kserve):
    response = predict(kserve, [{"image": image_b64("chelsea.png"), **GREEDY}, {"image": "@@not base64@@"}])
    assert response.status_code == 400
    assert response.json()["error"].startswith("instances[1]: 'image' is not valid base64"), response.text
