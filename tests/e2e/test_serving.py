"""The seed-tiny archive served by the real TorchServe 0.12 (CPU), called over HTTP.

Covers every request form, the golden greedy captions, per-request errors inside a batch,
batching (proved by the handler's Prometheus metrics), registration through the management
API with batching parameters, scaling, describe, unregister, allowed_urls and token
authorization. One server for the session (see conftest.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import torch

from tests.e2e.seed import GOLDEN_CPU_DTYPE, IMAGE_NAMES, MODEL, SEED, content_type, golden, image_b64, image_bytes

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "num_captions": 1}
PLAIN = {**GREEDY, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
INVALID_KEY = "InvalidKeyException"


def ok_json(response: requests.Response) -> dict:
    assert response.status_code == 200, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/json"
    return response.json()


# ------------------------------------------------------------------ the archive as loaded
def test_model_loaded_at_start_with_the_archive_settings(server):
    description = server.describe(MODEL)[0]
    assert description["batchSize"] == 8
    assert description["maxBatchDelay"] == 50
    assert description["responseTimeout"] == 600
    assert description["loadedAtStartup"] is True
    assert [w["status"] for w in description["workers"]] == ["READY"]
    # The worker ran the code shipped inside the archive (extracted under TorchServe's temp
    # folder), not the checkout's packages.
    ready = server.grep_log(rf"caption handler ready: model={MODEL} ")
    assert ready and f"code={server.tmp}/models/" in ready[-1], ready
    # float32 on any CPU: the goldens are float32's (`tests/e2e/seed.py`, GOLDEN_CPU_DTYPE).
    assert f"dtype={GOLDEN_CPU_DTYPE}" in ready[-1], ready
    assert f"torch={torch.__version__} " in ready[-1] and "transformers=5." in ready[-1], ready  # versions in the log


# ------------------------------------------------------------------ request forms
@pytest.mark.parametrize("kind,options", [("greedy", GREEDY), ("greedy_plain", PLAIN)])
def test_json_base64_gives_the_golden_captions(server, kind, options):
    for name in IMAGE_NAMES:
        assert ok_json(server.infer(MODEL, json={"image": image_b64(name), **options})) == golden(name, kind)


@pytest.mark.parametrize("field", ["data", "file"])
def test_multipart_fields_with_form_options(server, field):
    for name in IMAGE_NAMES:
        response = server.infer(MODEL, files={field: (name, image_bytes(name), content_type(name))},
                                data={k: str(v) for k, v in GREEDY.items()})
        assert ok_json(response) == golden(name)


def test_raw_body_with_default_options(server):
    # curl --data-binary @img -H "Content-Type: application/octet-stream"
    body = ok_json(server.infer(MODEL, data=image_bytes("rocket.jpg"),
                                headers={"Content-Type": "application/octet-stream"}))
    assert list(body) == ["Concise", "Narrative", "Descriptive"]
    assert all(len(captions) == 2 and all(captions) for captions in body.values())


def test_raw_body_by_put_like_curl_upload_file(server):
    # curl -T img.png http://.../predictions/captioner  (curl -T sends PUT)
    response = requests.put(server.url("inference", f"/predictions/{MODEL}"), data=image_bytes("chelsea.png"),
                            headers=server.auth("inference"), timeout=120)
    assert set(ok_json(response)) == {"Concise", "Narrative", "Descriptive"}


def test_query_parameters_reach_the_handler_only_on_invoke(server):
    image = image_bytes("coffee.png")
    headers = {**server.auth("inference"), "Content-Type": "image/png"}
    invoke = requests.post(server.url("inference", f"/models/{MODEL}/invoke"), params=GREEDY, data=image,
                           headers=headers, timeout=120)
    assert ok_json(invoke) == golden("coffee.png")
    # TorchServe 0.12 drops the query string of /predictions/{model}: defaults apply.
    predictions = requests.post(server.url("inference", f"/predictions/{MODEL}"), params=GREEDY, data=image,
                                headers=headers, timeout=120)
    assert all(len(v) == 2 for v in ok_json(predictions).values())


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}:predict", f"/predictions/{MODEL}"])
def test_kserve_v1_instances_in_one_request(server, path):
    """KServe's TorchServe runtime forwards a v1 request's JSON as it is (content type
    `application/json; charset=UTF-8`); the predictions come back in instance order."""
    instances = [{"image": image_b64(name), **GREEDY} for name in IMAGE_NAMES]
    body = json.dumps({"instances": instances + [{"image": image_b64("rocket.jpg"), **GREEDY, "styles": "concise"}]})
    headers = {**server.auth("inference"), "Content-Type": "application/json; charset=UTF-8"}
    response = requests.post(server.url("inference", path), data=body, headers=headers, timeout=120)
    assert ok_json(response) == {"predictions": [golden(name) for name in IMAGE_NAMES]
                                 + [golden("rocket.jpg", styles=["concise"])]}
    bad = json.dumps({"instances": [instances[0], {"image": image_b64("rocket.jpg"), "num_captions": 99}]})
    response = requests.post(server.url("inference", path), data=bad, headers=headers, timeout=120)
    assert response.status_code == 400 and response.json()["error"].startswith("instances[1]: "), response.text


def test_curl_default_form_content_type_is_rejected_by_torchserve(server):
    # `curl --data-binary @img` without -H sends application/x-www-form-urlencoded: the
    # frontend tries to decode the image as a form and fails before the handler runs.
    response = server.infer(MODEL, data=image_bytes("chelsea.png"),
                            headers={"Content-Type": "application/x-www-form-urlencoded"})
    # TorchServe 0.12's frontend answers its own 500 (no handler code runs; documented in the
    # README next to the curl commands), and the model keeps serving.
    assert response.status_code == 500, (response.status_code, response.text[:300])
    assert response.json()["type"] == "ErrorDataDecoderException", response.text[:300]
    assert ok_json(server.infer(MODEL, json={"image": image_b64("chelsea.png"), **GREEDY})) == golden("chelsea.png")


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("payload,needle", [
    ({"json": {"image": image_b64("chelsea.png"), "num_captions": 99}}, "num_captions"),
    ({"json": {"image": image_b64("chelsea.png"), "flavour": "x"}}, "flavour"),
    ({"json": {"image": image_b64("chelsea.png"), "max_new_tokens": 1000}}, "max_new_tokens"),
    ({"json": {"image": "%%%"}}, "base64"),
    ({"json": {"styles": ["concise"]}}, "image"),
    ({"data": b"definitely not an image", "headers": {"Content-Type": "application/octet-stream"}},
     "not a recognised image"),
    ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, "JSON"),
])
def test_bad_requests_get_400_with_a_json_message(server, payload, needle):
    response = server.infer(MODEL, **payload)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and needle in body["error"]


def test_large_image_within_max_request_size(server):
    from PIL import Image

    rng = random.Random(0)
    image = Image.frombytes("RGB", (2600, 2600), rng.randbytes(2600 * 2600 * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)
    assert buffer.tell() > 20_000_000
    response = server.infer(MODEL, data=buffer.getvalue(), headers={"Content-Type": "image/png"})
    assert set(ok_json(response)) == {"Concise", "Narrative", "Descriptive"}


# ------------------------------------------------------------------ management API + batching
@pytest.fixture()
def batched_model(server):
    """The same archive registered again, with batching parameters given to the API."""
    name = "captioner-batched"
    response = server.manage("POST", "/models", params={
        "url": "captioner.mar", "model_name": name, "batch_size": 4, "max_batch_delay": 1000,
        "response_timeout": 60, "initial_workers": 1, "synchronous": "true"})
    assert response.status_code == 200, response.text
    assert f'Model "{name}" Version: 1.0 registered with 1 initial workers' in response.json()["status"]
    try:
        yield name
    finally:
        server.manage("DELETE", f"/models/{name}")


def metric(server, name: str, model: str) -> float:
    values = server.metric_values(name, model)
    return values[0] if values else 0.0


def test_register_with_batching_then_concurrent_requests_are_batched(server, batched_model):
    description = server.describe(batched_model)[0]
    # The API's batch_size / max_batch_delay override the archive's model-config.yaml ...
    assert (description["batchSize"], description["maxBatchDelay"]) == (4, 1000)
    # ... but the yaml's responseTimeout overrides the API's response_timeout.
    assert description["responseTimeout"] == 600
    assert description["loadedAtStartup"] is False

    requests_before = metric(server, "CaptionRequestsTotal", batched_model)
    batches_before = metric(server, "CaptionBatchesTotal", batched_model)
    valid = [name for name in IMAGE_NAMES for _ in range(2)]  # 6 valid requests
    payloads = [{"json": {"image": image_b64(n), **GREEDY}} for n in valid]
    payloads += [{"json": {"image": image_b64("coffee.png"), "num_captions": 0}},
                 {"data": b"garbage", "headers": {"Content-Type": "application/octet-stream"}}]
    with ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(lambda p: server.infer(batched_model, **p), payloads))

    for name, response in zip(valid, responses):
        assert ok_json(response) == golden(name)
    for response in responses[len(valid):]:
        assert response.status_code == 400 and "error" in response.json()

    # Metrics arrive through the worker's log: allow the frontend a moment.
    deadline = time.monotonic() + 10
    while metric(server, "CaptionRequestsTotal", batched_model) - requests_before < len(payloads):
        assert time.monotonic() < deadline, server.metrics(["CaptionRequestsTotal"])
        time.sleep(0.2)
    served = metric(server, "CaptionRequestsTotal", batched_model) - requests_before
    batches = metric(server, "CaptionBatchesTotal", batched_model) - batches_before
    assert served == len(payloads)
    # 8 concurrent requests, batch size 4, 1 s to fill a batch: a handful of batches at most,
    # i.e. several requests per engine call.
    assert 2 <= batches <= 4, (served, batches)
    assert served / batches >= 2
    assert 1 < metric(server, "CaptionBatchSize", batched_model) <= 4


def test_scale_workers_up_and_down(server):
    try:
        response = server.manage("PUT", f"/models/{MODEL}", params={"min_worker": 2, "synchronous": "true"})
        assert response.status_code == 200, response.text
        assert response.json()["status"] == f"Workers scaled to 2 for model: {MODEL}"
        # TorchServe 0.12 answers a synchronous scale-up as the new worker reports its model
        # loaded, a moment before it records that state (WorkerThread.setState notifies first):
        # describe may still say UNLOADING for it, so wait briefly for READY.
        workers = server.wait_model_ready(MODEL, workers=2, timeout=30)[0]["workers"]
        assert len(workers) == 2 and {w["status"] for w in workers} == {"READY"}
        assert ok_json(server.infer(MODEL, json={"image": image_b64("rocket.jpg"), **GREEDY})) == golden("rocket.jpg")
    finally:
        response = server.manage("PUT", f"/models/{MODEL}",
                                 params={"min_worker": 1, "max_worker": 1, "synchronous": "true"})
    assert response.status_code == 200, response.text
    assert len(server.describe(MODEL)[0]["workers"]) == 1


def child_pids(pid: int) -> set[int]:
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:  # fields: state, ppid, ...
            children.add(int(stat.parent.name))
    return children


def register_batched(server, name: str, archive: str) -> None:
    """Register `archive` as `name`: one worker, batches of up to 4 requests within 500 ms."""
    response = server.manage("POST", "/models", params={"url": archive, "model_name": name, "batch_size": 4,
                                                        "max_batch_delay": 500, "initial_workers": 1,
                                                        "synchronous": "true"})
    assert response.status_code == 200, response.text


def serve_golden_batch_with_a_bad_request(server, name: str) -> None:
    """Three golden requests and a bad one sent at once (one batch): the golden captions, and a
    400 with a JSON message for the bad one."""
    names = ["chelsea.png", "coffee.png", "rocket.jpg"]
    payloads = [{"json": {"image": image_b64(n), **GREEDY}} for n in names]
    payloads.append({"data": b"garbage", "headers": {"Content-Type": "application/octet-stream"}})
    with ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(lambda p: server.infer(name, **p), payloads))
    for image, response in zip(names, responses):
        assert ok_json(response) == golden(image)
    assert responses[-1].status_code == 400 and "error" in responses[-1].json()


def test_decode_processes_serve_a_batch_and_end_with_their_worker(server, model_store):
    """`handler.decode_processes: 2`: requests are prepared in spawned processes under the real
    worker (which runs ts/model_service_worker.py as __main__); a bad request in the batch still
    gets its 400, the pixels come back through the worker's shared block, and the processes and
    the block end when the model is unregistered."""
    from tests.e2e.bad_inputs import one_thread_archive

    name = "captioner-processes"
    archive = one_thread_archive(model_store, name, handler_settings={"decode_processes": 2})
    blocks_before = set(Path("/dev/shm").glob("psm_*"))
    register_batched(server, name, archive)
    try:
        serve_golden_batch_with_a_bad_request(server, name)
        children = child_pids(server.describe(name)[0]["workers"][0]["pid"])
        decoders = {pid for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()}
        assert len(decoders) == 2, children  # the others: multiprocessing's resource tracker
        assert decoders <= set(server.stray_processes())  # what stop() would end, were they left
        facts = server.manage("GET", f"/models/{name}", params={"customized": "true"}).json()[0]["customizedMetadata"]
        assert facts["decode_pool"] == {"processes": 2, "shared_memory": True}
        blocks = set(Path("/dev/shm").glob("psm_*")) - blocks_before
        assert blocks  # the worker's block of pixel slots (handler/pixel_slots.py)
    finally:
        server.manage("DELETE", f"/models/{name}")
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in decoders) or any(block.exists() for block in blocks):
        assert time.monotonic() < deadline, f"decode processes or shared memory outlived their worker: {decoders}, " \
                                            f"{[block for block in blocks if block.exists()]}"
        time.sleep(0.5)


def test_compiled_cpu_decode_step_serves_a_batch_under_the_real_worker(server, model_store):
    """`handler.cpu_compile_decode: true` under the real worker: its warm-up compiles the step
    (inductor's C++ build runs under TorchServe), a batch of golden requests and a bad one are
    answered as without it, and the describe answer says the step is compiled."""
    from tests.e2e.bad_inputs import one_thread_archive

    name = "captioner-compiled-step"
    archive = one_thread_archive(model_store, name, handler_settings={"cpu_compile_decode": True})
    register_batched(server, name, archive)
    try:
        serve_golden_batch_with_a_bad_request(server, name)
        facts = server.manage("GET", f"/models/{name}", params={"customized": "true"}).json()[0]["customizedMetadata"]
        assert facts["compiled"]["decode_step"] is True and facts["packed_decoder"] is True
    finally:
        server.manage("DELETE", f"/models/{name}")


def test_unregister(server):
    name = "captioner-short-lived"
    response = server.manage("POST", "/models", params={"url": "captioner.mar", "model_name": name,
                                                        "initial_workers": 1, "synchronous": "true"})
    assert response.status_code == 200, response.text
    assert name in [m["modelName"] for m in server.manage("GET", "/models").json()["models"]]
    response = server.manage("DELETE", f"/models/{name}")
    assert response.status_code == 200 and response.json()["status"] == f'Model "{name}" unregistered'
    assert server.manage("GET", f"/models/{name}").status_code == 404
    assert server.infer(name, json={"image": image_b64("rocket.jpg")}).status_code == 404


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/captioner.mar", "https://example.com/x.mar",
                                 "file:///etc/passwd"])
def test_allowed_urls_refuse_anything_but_the_model_store(server, url):
    response = server.manage("POST", "/models", params={"url": url})
    assert response.status_code == 404
    assert "does not match any allowed URL" in response.json()["message"]


def test_handler_metrics_on_the_prometheus_endpoint(server):
    ok_json(server.infer(MODEL, json={"image": image_b64("chelsea.png"), **GREEDY}))
    text = server.metrics()
    for name in ("CaptionBatchSize", "CaptionBatchesTotal", "CaptionRequestsTotal", "CaptionTokensTotal",
                 "CaptionDecodeImageMs", "CaptionEncodeMs", "CaptionPrefillMs", "CaptionGenerateMs",
                 "CaptionHandlerMs", "CaptionErrorsTotal", "CaptionServerErrorsTotal", "CaptionHandlerMsTotal",
                 "CaptionBatchSeconds", "ts_inference_requests_total"):
        assert f"# TYPE {name} " in text, name
    assert f'CaptionTokensTotal{{ModelName="{MODEL}",Level="Model",' in text
    # The batch-time histogram: cumulative buckets in seconds; every batch is in +Inf and _count.
    assert "# TYPE CaptionBatchSeconds histogram" in text

    def sample(series: str, label: str = "") -> float:
        found = [line.rsplit(" ", 1)[1] for line in text.splitlines()
                 if line.startswith(series + "{") and f'ModelName="{MODEL}"' in line and label in line]
        assert len(found) == 1, (series, label, found)
        return float(found[0])

    batches = sample("CaptionBatchSeconds_count")
    assert batches >= 1
    assert sample("CaptionBatchSeconds_bucket", 'le="+Inf"') == batches
    # The tiny model's batches take tens to hundreds of milliseconds: in seconds every one is in
    # the 10 s bucket; recorded in milliseconds, none would be.
    assert sample("CaptionBatchSeconds_bucket", 'le="10.0"') == batches
    assert 0 < sample("CaptionBatchSeconds_sum") / batches < 10


# ------------------------------------------------------------------ token authorization
def test_token_authorization(server):
    image = {"json": {"image": image_b64("chelsea.png"), **GREEDY}}
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
    for key in (None, "management", "API"):
        response = server.infer(MODEL, key=key, **image)
        assert response.status_code == 400 and INVALID_KEY in response.text, (key, response.text)
    response = server.infer(MODEL, key=None, headers={"Authorization": "Bearer not-the-key"}, **image)
    assert response.status_code == 400 and INVALID_KEY in response.text
    assert ok_json(server.infer(MODEL, **image)) == golden("chelsea.png")
    # Management needs the management key.
    for key in (None, "inference"):
        response = server.manage("GET", "/models", key=key)
        assert response.status_code == 400 and INVALID_KEY in response.text, key
    assert server.manage("GET", "/models").status_code == 200
    # Health checks need the inference key too; the metrics endpoint has none.
    assert requests.get(server.url("inference", "/ping"), timeout=10).status_code == 400
    assert requests.get(server.url("inference", "/ping"), headers=server.auth("inference"), timeout=10).json() == \
        {"status": "Healthy"}
    assert requests.get(server.url("metrics", "/metrics"), timeout=10).status_code == 200


def test_inference_key_can_be_rotated_with_the_api_key(server):
    old = server.keys["inference"]
    response = requests.post(server.url("management", "/token"), params={"type": "inference"},
                             headers=server.auth("API"), timeout=10)
    assert response.status_code == 200, response.text
    new = server.reload_keys()["inference"]
    assert new != old
    image = {"json": {"image": image_b64("rocket.jpg"), **GREEDY}}
    assert server.infer(MODEL, key=None, headers={"Authorization": f"Bearer {old}"}, **image).status_code == 400
    assert ok_json(server.infer(MODEL, **image)) == golden("rocket.jpg")


def test_describe_lists_the_archive(server):
    models = server.manage("GET", "/models").json()["models"]
    assert {"modelName": MODEL, "modelUrl": "captioner.mar"} in models
    description = server.describe(MODEL)[0]
    assert description["modelVersion"] == "1.0" and description["runtime"] == "python"
    assert description["batchSize"] >= 1 and description["workers"][0]["status"] == "READY"


@pytest.mark.parametrize("path, body", [
    (f"/explanations/{MODEL}", {"image": "x"}),
    (f"/v1/models/{MODEL}:explain", {"instances": [{"image": "x"}]}),
])
def test_explanations_are_refused_with_501(server, path, body):
    response = requests.post(server.url("inference", path), json=body, headers=server.auth("inference"), timeout=60)
    assert response.status_code == 501, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"].startswith("this model gives no explanations")


def test_customized_describe_shows_what_the_worker_serves(server):
    response = server.manage("GET", f"/models/{MODEL}", params={"customized": "true"})
    assert response.status_code == 200, response.text
    (description,) = response.json()
    facts = description["customizedMetadata"]
    assert list(facts["styles"]) == ["concise", "narrative", "descriptive"]
    assert (facts["device"], facts["dtype"], facts["packed_decoder"]) == ("cpu", GOLDEN_CPU_DTYPE, True)
    assert facts["limits"]["max_new_tokens"] == facts["model_config"]["max_text_tokens"]
    assert [w["status"] for w in description["workers"]] == ["READY"]
    # what the archive was built from (export/archive.py build_info.json)
    assert facts["build"]["weights_sha256"] == hashlib.sha256((SEED / "weights.pt").read_bytes()).hexdigest()
    assert facts["build"]["version"] == "1.0" and len(facts["build"]["code_commit"]) == 40
