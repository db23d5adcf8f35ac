"""The caption handler inside TorchServe's worker code (ts.service.Service), no server.

Seed-tiny checkpoint in float32 on CPU: greedy requests must give the golden captions.
"""

from __future__ import annotations

import base64
import json
import logging

import pytest
import torch

from handler import captioner_handler
from model.styles import STYLES
from tests.conftest import BF16_MIN_IDENTICAL, identical_greedy_captions
from tests.integration import handler_harness
from tests.integration.handler_harness import (
    IMAGES,
    REPO,
    batch,
    golden,
    json_row,
    make_model_dir,
    make_service,
    mime,
    multipart_row,
    predict,
    raw_row,
)

pytestmark = pytest.mark.integration

GREEDY = {"temperature": 0, "num_captions": 1}
PLAIN = {**GREEDY, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}


@pytest.fixture(scope="module", params=["threads", "processes"])
def served(request, tmp_path_factory):
    """The handler with each kind of decode pool: threads (the default) or processes."""
    overrides = {"decode_processes": 2} if request.param == "processes" else {}
    return make_service(make_model_dir(tmp_path_factory.mktemp("model"), overrides))


def test_initialize_picks_cpu_float32_and_caps_tokens(served):
    _, handler = served
    assert handler.device == torch.device("cpu")
    assert handler.engine.dtype == torch.float32
    assert handler.limits.max_new_tokens == handler.engine.config.max_text_tokens == 40


def test_the_management_apis_describe_request_gets_the_workers_facts(served):
    """GET /models/captioner?customized=true reaches the handler as a batch of one request with
    no body and the header describe=True; its answer becomes the description's customizedMetadata."""
    service, handler = served
    (reply,) = predict(service, [{"requestId": b"describe", "headers": [{"name": b"describe", "value": b"True"}],
                                  "parameters": []}])
    assert reply.status == 200 and reply.content_type == "application/json"
    facts = reply.json()
    assert list(facts["styles"]) == list(STYLES)
    assert facts["styles"]["concise"] == {"num_captions": 2, "temperature": 0.2, "top_k": 3, "top_p": 0.75,
                                          "repetition_penalty": 1.4, "no_repeat_ngram_size": 2}
    assert facts["limits"]["max_new_tokens"] == 40 and facts["limits"]["max_num_captions"] == 8
    assert (facts["device"], facts["dtype"], facts["packed_decoder"], facts["int8_decoder"]) == ("cpu", "float32",
                                                                                                 True, False)
    assert facts["compiled"] == {"encoder": False, "decode": False, "decode_step": False, "prefill": False}
    pooled = handler.settings.decode_processes  # 2 (the `processes` variant) or "gpu": threads on CPU
    assert facts["decode_pool"] == ({"processes": 2, "shared_memory": True} if pooled == 2
                                    else {"threads": handler.settings.decode_threads})
    assert facts["model_config"]["image_size"] == handler.engine.config.image_size == 64
    assert facts["images_per_engine_call"] == 8 and facts["max_instances"] == 8
    assert facts["build"] is None  # a model directory without the archive's build_info.json
    # the batches around it are captioning batches as before
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY)))
    assert replies[0].json() == golden("chelsea.png")


def test_a_predictions_own_describe_header_gets_a_prediction(served):
    """The frontend passes a prediction's HTTP headers through to the worker: `describe: True`
    sent by a client must neither answer with the worker's facts nor, at the head of a batch,
    fail the whole batch (one reply for three requests)."""
    service, _ = served
    marked = {"name": b"describe", "value": b"True"}
    rows = batch(json_row(IMAGES["chelsea.png"], **GREEDY), json_row(IMAGES["chelsea.png"], **GREEDY), json_row(None))
    rows[0]["headers"] = [marked]
    replies = predict(service, rows)
    assert [r.status for r in replies] == [200, 200, 400]
    assert replies[0].json() == replies[1].json() == golden("chelsea.png")
    alone = predict(service, [{"requestId": b"r", "headers": [marked], "parameters": json_row(None)}])
    assert alone[0].status == 400 and "styles" not in alone[0].json()


def test_grpc_replies_are_marked_as_the_last_of_their_stream_and_rest_replies_are_not(served):
    """A gRPC request has no HTTP header; its reply carries ts_stream_next=false, which ends a
    StreamPredictions call (without it TorchServe's frontend fails and restarts the worker).
    A REST reply must not carry it."""
    service, _ = served
    rows = batch(json_row(IMAGES["chelsea.png"], **GREEDY), json_row(IMAGES["rocket.jpg"], **GREEDY),
                 raw_row(b"not an image"))
    rows[1]["headers"] = [{"name": b"Host", "value": b"127.0.0.1:8080"}, {"name": b"Accept", "value": b"*/*"}]
    replies = predict(service, rows)
    assert [r.status for r in replies] == [200, 200, 400]
    assert replies[0].headers.get("ts_stream_next") == replies[2].headers.get("ts_stream_next") == "false"
    assert "ts_stream_next" not in replies[1].headers
    assert replies[0].json() == golden("chelsea.png") and replies[1].json() == golden("rocket.jpg")


def test_explanation_requests_get_501_and_their_batch_mates_are_served(served):
    """/explanations/captioner and KServe's :explain reach the handler as predictions with the
    header explain=True; before, they were captioned as if they were predictions."""
    service, _ = served
    rows = batch(json_row(IMAGES["chelsea.png"], **GREEDY), json_row(IMAGES["rocket.jpg"], **GREEDY),
                 v1_row(instance("coffee.png", **GREEDY)))
    for row in (rows[0], rows[2]):
        row["headers"] = [{"name": b"explain", "value": b"True"}]
    replies = predict(service, rows)
    assert [r.status for r in replies] == [501, 200, 501]
    assert replies[0].json() == replies[2].json() == {"error": captioner_handler.EXPLAIN_MESSAGE}
    assert replies[1].json() == golden("rocket.jpg")


@pytest.mark.parametrize("kind,options", [("greedy", GREEDY), ("greedy_plain", PLAIN)])
def test_golden_captions_for_every_image_and_style(served, kind, options):
    service, _ = served
    names = list(IMAGES)
    replies = predict(service, batch(*(json_row(IMAGES[n], **options) for n in names)))
    for name, reply in zip(names, replies):
        assert reply.status == 200, reply
        assert reply.content_type == "application/json"
        assert reply.json() == golden(name, kind)


def test_every_input_form_in_one_batch_with_invalid_rows(served):
    service, _ = served
    rows = [
        json_row(IMAGES["chelsea.png"], **GREEDY),                                   # 0 JSON
        raw_row(IMAGES["rocket.jpg"], mime("rocket.jpg"), query=GREEDY),             # 1 raw + query
        multipart_row(IMAGES["coffee.png"], "data", fields=GREEDY),                  # 2 multipart data
        multipart_row(IMAGES["chelsea.png"], "file", fields=GREEDY),                 # 3 multipart file
        json_row(IMAGES["coffee.png"], num_captions=99),                             # 4 bad option value
        json_row(IMAGES["coffee.png"], colour="blue"),                               # 5 unknown option
        raw_row(b"this is not an image", "application/octet-stream"),                # 6 undecodable image
        raw_row(IMAGES["rocket.jpg"][: len(IMAGES["rocket.jpg"]) // 3], "image/jpeg"),  # 7 truncated image
        [{"name": "body", "contentType": "application/json", "value": {"image": "@@not base64@@"}}],  # 8
        [{"name": "body", "contentType": "application/json", "value": {"styles": ["concise"]}}],      # 9 no image
        raw_row(b"", "image/png"),                                                   # 10 empty body
        json_row(IMAGES["rocket.jpg"], styles=["poetic"]),                           # 11 unknown style
        json_row(IMAGES["rocket.jpg"], temperature=0, styles=["narrative"], num_captions=3),  # 12 valid
    ]
    replies = predict(service, batch(*rows))
    assert [r.content_type for r in replies] == ["application/json"] * len(rows)
    assert replies[0].json() == golden("chelsea.png")
    assert replies[1].json() == golden("rocket.jpg")
    assert replies[2].json() == golden("coffee.png")
    assert replies[3].json() == golden("chelsea.png")
    narrative = golden("rocket.jpg", styles=["narrative"])["Narrative"][0]
    assert replies[12].json() == {"Narrative": [narrative] * 3}
    for idx in range(4, 12):
        reply = replies[idx]
        assert reply.status == 400, (idx, reply)
        assert reply.phrase == "Bad Request"
        body = reply.json()
        assert set(body) == {"error"} and body["error"], (idx, body)
    assert "num_captions" in replies[4].json()["error"]
    assert "colour" in replies[5].json()["error"]
    assert "poetic" in replies[11].json()["error"]


def test_response_holds_only_the_styles_and_count_asked_for(served):
    service, _ = served
    replies = predict(service, batch(json_row(IMAGES["coffee.png"], styles=["descriptive", "concise"],
                                              num_captions=2, seed=7, max_new_tokens=12)))
    body = replies[0].json()
    assert list(body) == ["Concise", "Descriptive"]
    assert all(len(v) == 2 and all(isinstance(c, str) and c for c in v) for v in body.values())


def v1_row(*instances, content_type: str = "application/json") -> list[dict]:
    """A KServe v1 request; KServe's runtime sends `application/json; charset=UTF-8`, which the
    worker passes on undecoded (bytes)."""
    body = {"instances": list(instances)}
    value = (body if content_type == "application/json" else json.dumps(body) if content_type.startswith("text/")
             else json.dumps(body).encode())
    return [{"name": "body", "contentType": content_type, "value": value}]


def instance(name: str, **options) -> dict:
    return {"image": base64.b64encode(IMAGES[name]).decode(), **options}


def test_kserve_v1_instances_share_the_batch_with_other_requests(served):
    service, handler = served
    calls = []
    real_caption = handler.engine.caption
    handler.engine.caption = lambda pixels, plans: calls.append(len(plans)) or real_caption(pixels, plans)
    try:
        replies = predict(service, batch(
            v1_row(instance("chelsea.png", **GREEDY), instance("rocket.jpg", **GREEDY, styles=["concise"])),
            json_row(IMAGES["coffee.png"], **GREEDY),
            v1_row(instance("coffee.png", **GREEDY), content_type="application/json; charset=UTF-8"),
            v1_row(instance("rocket.jpg", **GREEDY), instance("coffee.png", num_captions=99)),  # one bad instance
        ))
    finally:
        handler.engine.caption = real_caption
    # one engine call for the good images; the bad request's good sibling (rocket) is not run
    assert calls == [4]
    assert [r.status for r in replies] == [200, 200, 200, 400]
    assert replies[0].json() == {"predictions": [golden("chelsea.png"), golden("rocket.jpg", styles=["concise"])]}
    assert replies[1].json() == golden("coffee.png")
    assert replies[2].json() == {"predictions": [golden("coffee.png")]}
    error = replies[3].json()["error"]
    assert error.startswith("instances[1]: ") and "num_captions" in error, error
    assert all(r.content_type == "application/json" for r in replies)


def test_kserve_v1_images_beyond_batch_size_take_more_engine_calls(served, monkeypatch):
    service, handler = served
    calls = []
    real_caption = handler.engine.caption
    monkeypatch.setattr(handler, "images_per_call", 2)
    monkeypatch.setattr(handler.engine, "caption", lambda pixels, plans: calls.append(len(plans)) or real_caption(pixels, plans))
    names = ["chelsea.png", "coffee.png", "rocket.jpg", "coffee.png", "chelsea.png"]
    replies = predict(service, batch(v1_row(*(instance(n, **GREEDY) for n in names), content_type="text/plain")))
    assert calls == [2, 2, 1]
    assert replies[0].status == 200 and replies[0].json() == {"predictions": [golden(n) for n in names]}


def failing_call(handler, monkeypatch, failing_calls: set[int], error: Exception) -> list[int]:
    """The engine's `caption` raising `error` on the calls numbered in `failing_calls` (from 0);
    returns the list the image count of every call is appended to."""
    calls = []
    real_caption = handler.engine.caption

    def caption(pixels, plans):
        calls.append(len(plans))
        if len(calls) - 1 in failing_calls:
            raise error
        return real_caption(pixels, plans)

    monkeypatch.setattr(handler.engine, "caption", caption)
    return calls


@pytest.mark.parametrize("failing, statuses", [(0, [507, 507, 200]), (1, [200, 200, 507])])
def test_an_engine_call_out_of_memory_fails_only_its_own_images(served, monkeypatch, failing, statuses):
    service, handler = served
    monkeypatch.setattr(handler, "images_per_call", 2)
    calls = failing_call(handler, monkeypatch, {failing}, torch.cuda.OutOfMemoryError("CUDA out of memory"))
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY), json_row(IMAGES["rocket.jpg"], **GREEDY),
                                     v1_row(instance("coffee.png", **GREEDY), instance("chelsea.png", **GREEDY))))
    assert calls == [2, 2]
    assert [r.status for r in replies] == statuses
    served_answers = [golden("chelsea.png"), golden("rocket.jpg"), {"predictions": [golden("coffee.png"), golden("chelsea.png")]}]
    for status, reply, expected in zip(statuses, replies, served_answers):
        # a failed call's error is not the v1 request's own: it names no instance
        assert reply.json() == (expected if status == 200 else {"error": captioner_handler.OOM_MESSAGE})


def test_after_a_failed_engine_call_a_v1_requests_other_instances_are_not_run(served, monkeypatch):
    service, handler = served
    monkeypatch.setattr(handler, "images_per_call", 2)
    calls = failing_call(handler, monkeypatch, {0}, RuntimeError("shape mismatch in some kernel"))
    names = ["chelsea.png", "rocket.jpg", "coffee.png", "chelsea.png", "rocket.jpg"]
    replies = predict(service, batch(v1_row(*(instance(n, **GREEDY) for n in names)),
                                     json_row(IMAGES["coffee.png"], **GREEDY)))
    # calls of (v0, v1): fails; (v2, v3): all skipped; (v4, plain): only the plain request runs
    assert calls == [2, 1]
    assert replies[0].status == 500
    assert replies[0].json() == {"error": "internal error while captioning (RuntimeError)"}
    assert replies[1].status == 200 and replies[1].json() == golden("coffee.png")


def test_an_answer_over_the_response_limit_fails_alone(served, monkeypatch):
    service, _ = served
    monkeypatch.setattr(captioner_handler, "MAX_REPLY_BYTES", 400)  # a v1 answer of 3 images is longer
    replies = predict(service, batch(v1_row(*(instance(n, **GREEDY) for n in IMAGES)),
                                     json_row(IMAGES["chelsea.png"], **GREEDY, styles=["concise"])))
    assert replies[0].status == 400 and "would exceed the server's response limit" in replies[0].json()["error"]
    assert replies[1].status == 200 and replies[1].json() == golden("chelsea.png", styles=["concise"])


def test_an_error_message_is_cut_to_its_limit():
    document = json.loads(captioner_handler._error_json("x" * 5000))
    assert len(document["error"]) == captioner_handler.MAX_ERROR_CHARS and document["error"].endswith("...")
    assert json.loads(captioner_handler._error_json("short"))["error"] == "short"


def test_kserve_v1_whole_batch_failure_names_no_instance(served, monkeypatch):
    service, handler = served
    monkeypatch.setattr(handler.engine, "caption", lambda *_: (_ for _ in ()).throw(MemoryError()))
    replies = predict(service, batch(v1_row(instance("chelsea.png", **GREEDY), instance("rocket.jpg", **GREEDY))))
    assert replies[0].status == 507 and replies[0].json()["error"] == captioner_handler.OOM_MESSAGE


def test_kserve_v1_request_that_cannot_be_read_fails_alone(served, monkeypatch):
    from handler import instances

    service, _ = served

    def parse_json(data):
        raise MemoryError

    monkeypatch.setattr(instances, "parse_json", parse_json)
    replies = predict(service, batch(v1_row(instance("chelsea.png", **GREEDY), content_type="application/json; charset=UTF-8"),
                                     json_row(IMAGES["coffee.png"], **GREEDY)))
    assert replies[0].status == 507 and "out of memory while reading the request" in replies[0].json()["error"]
    assert replies[1].status == 200 and replies[1].json() == golden("coffee.png")


@pytest.mark.parametrize("body, needle", [
    ({"instances": []}, "'instances' must be a non-empty list"),
    ({"instances": {"image": "x"}}, "'instances' must be a non-empty list"),
    ({"instances": ["aGVsbG8="]}, "instances[0] must be an object"),
    ({"instances": [{"image": "x"}], "parameters": {}}, "holds only 'instances'"),
    ({"instances": [{"styles": ["concise"]}]}, "instances[0]: the JSON body needs an 'image' field"),
    ({"instances": [{"image": "x"}] * 9}, "at most 8 instances per request, got 9"),
    (b'{"instances": [{"image": ', "malformed JSON"),
    # as bytes, with "instances" far from the start: the same answer as the parsed dict's
    (b'{"parameters": {"note": "' + b"x" * 200 + b'"}, "instances": [{"image": "x"}]}', "holds only 'instances'"),
    ("url-field", "a v1 request carries its options in each instance; got other fields 'styles'"),
])
def test_bad_kserve_v1_requests_get_400_and_their_batch_mates_are_served(served, body, needle):
    service, _ = served
    if body == "url-field":  # /models/captioner/invoke?styles=concise: a query parameter beside the body
        bad = v1_row(instance("chelsea.png", **GREEDY)) + [{"name": "styles", "contentType": "", "value": b"concise"}]
    elif isinstance(body, bytes):
        bad = [{"name": "body", "contentType": "application/json; charset=UTF-8", "value": body}]
    else:
        bad = [{"name": "body", "contentType": "application/json", "value": body}]
    replies = predict(service, batch(bad, json_row(IMAGES["chelsea.png"], **GREEDY)))
    assert replies[0].status == 400 and needle in replies[0].json()["error"], replies[0]
    assert replies[1].status == 200 and replies[1].json() == golden("chelsea.png")


def test_batch_of_only_invalid_requests(served):
    service, _ = served
    replies = predict(service, batch(raw_row(b"nope", "image/png"), json_row(None, temperature=0)))
    assert [r.status for r in replies] == [400, 400]


@pytest.mark.parametrize("error,status", [
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 507),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                  "you tried to allocate 123456789 bytes."), 507),
    (RuntimeError("could not create a primitive"), 507),  # oneDNN (the encoder's conv2d) short of memory
    (MemoryError(), 507),
    (RuntimeError("shape mismatch in some kernel"), 500),
    (KeyError("boom"), 500),
])
def test_a_failing_batch_fails_its_rows_and_the_worker_keeps_serving(served, monkeypatch, error, status):
    service, handler = served

    def failing(*_args, **_kwargs):
        raise error

    with monkeypatch.context() as patch:
        patch.setattr(handler.engine, "caption", failing)
        replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY),
                                         raw_row(b"not an image", "image/png"),
                                         json_row(IMAGES["rocket.jpg"], **GREEDY)))
    assert [r.status for r in replies] == [status, 400, status]
    for reply in replies:
        assert reply.content_type == "application/json"
        assert set(reply.json()) == {"error"}
    if status == 507:
        assert "out of memory" in replies[0].json()["error"]
    # The next batch is served normally.
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY)))
    assert replies[0].status == 200 and replies[0].json() == golden("chelsea.png")


def test_metrics_are_emitted_with_the_declared_dimensions(served, caplog):
    service, _ = served
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY), json_row(IMAGES["rocket.jpg"], **GREEDY),
                               raw_row(b"bad", "image/png")))
    lines = [r.getMessage() for r in caplog.records if r.name == "ts.metrics.caching_metric"]
    assert not [line for line in lines if "Failed" in line], lines
    emitted = {line.split("]", 1)[1].split(".", 1)[0]: line for line in lines if line.startswith("[METRICS]")}
    for name in ("CaptionBatchSize", "CaptionBatchesTotal", "CaptionRequestsTotal", "CaptionErrorsTotal",
                 "CaptionServerErrorsTotal", "CaptionHandlerMsTotal", "CaptionDecodeImageMs", "CaptionEncodeMs",
                 "CaptionPrefillMs", "CaptionGenerateMs", "CaptionTokensTotal", "CaptionHandlerMs",
                 "CaptionBatchSeconds"):
        assert name in emitted, (name, sorted(emitted))
        assert "|#ModelName:captioner,Level:Model|" in emitted[name]
    assert emitted["CaptionBatchSize"].startswith("[METRICS]CaptionBatchSize.Count:3|")
    assert "#type:GAUGE" in emitted["CaptionBatchSize"]
    assert emitted["CaptionErrorsTotal"].startswith("[METRICS]CaptionErrorsTotal.Count:1|")
    assert emitted["CaptionServerErrorsTotal"].startswith("[METRICS]CaptionServerErrorsTotal.Count:0|")  # a 400
    assert "#type:COUNTER" in emitted["CaptionHandlerMsTotal"]
    assert "#type:COUNTER" in emitted["CaptionTokensTotal"]
    # every new token of the six greedy captions, each ending with its [SEP] (golden ids: [CLS] ... [SEP])
    goldens = torch.load(handler_harness.SEED / "golden.pt", weights_only=True)["images"]
    new_tokens = sum(len(goldens[name]["greedy"][style]["ids"]) - 1 for name in ("chelsea.png", "rocket.jpg")
                     for style in STYLES)
    assert emitted["CaptionTokensTotal"].startswith(f"[METRICS]CaptionTokensTotal.Count:{new_tokens}|")
    assert "#type:HISTOGRAM" in emitted["CaptionBatchSeconds"]
    handler_ms = float(emitted["CaptionHandlerMs"].split(":", 1)[1].split("|", 1)[0])
    batch_seconds = float(emitted["CaptionBatchSeconds"].split(":", 1)[1].split("|", 1)[0])
    assert batch_seconds == pytest.approx(handler_ms / 1000, abs=1e-5) and batch_seconds > 0


def test_a_request_that_kills_its_decode_process_fails_alone(tmp_path, monkeypatch):
    """A decode process that dies (a crash in a decoder; here os._exit) fails every task its pool
    held: those requests are tried again one at a time in a fresh pool, so only the request that
    kills it gets a 500; the next batch is served by a new pool."""
    service, handler = make_service(make_model_dir(tmp_path, {"decode_processes": 2}))
    assert len(handler._decode_pool._processes) == 2  # spawned at start, not on a first batch
    monkeypatch.setattr(captioner_handler, "prepare_request", handler_harness.prepare_or_exit)
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY),
                                     raw_row(IMAGES["rocket.jpg"], mime("rocket.jpg"), query={"exit": "1"}),
                                     raw_row(b"not an image", "image/png"),
                                     json_row(IMAGES["coffee.png"], **GREEDY)))
    assert [r.status for r in replies] == [200, 500, 400, 200]
    assert replies[0].json() == golden("chelsea.png") and replies[3].json() == golden("coffee.png")
    assert "decoding process died" in replies[1].json()["error"]
    replies = predict(service, batch(json_row(IMAGES["rocket.jpg"], **GREEDY)))
    assert replies[0].status == 200 and replies[0].json() == golden("rocket.jpg")
    # The last request retried kills its pool: a new one is started at once (in the background),
    # not left broken for the next batch to replace on its own time.
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY),
                                     raw_row(IMAGES["rocket.jpg"], mime("rocket.jpg"), query={"exit": "1"})))
    assert [r.status for r in replies] == [200, 500]
    from handler.preparation import process_id
    assert handler._decode_pool.submit(process_id, 0).result(timeout=120) > 0  # raised BrokenExecutor before


def test_decode_processes_hand_pixels_back_through_a_shared_block_that_grows_with_the_batch(tmp_path):
    """The worker makes a block of `batchSize` pixel slots at start; a batch with more requests
    (KServe v1 instances expand a request into several) gets a larger block, the old one is
    unlinked, and every request still gets its own image's captions."""
    from multiprocessing import shared_memory

    service, handler = make_service(make_model_dir(tmp_path, {"decode_processes": 2}), batch_size=2)
    first = handler._pixel_slots.layout
    assert first.count == 2 and first.shape == (3, 64, 64) and first.dtype == "<f4"  # CPU: normalised float32
    names = list(IMAGES) * 2
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in names)))
    assert [r.json() for r in replies] == [golden(n) for n in names]
    assert handler._pixel_slots.layout.count == len(names)
    with pytest.raises(FileNotFoundError):
        shared_memory.SharedMemory(name=first.name)
    replies = predict(service, batch(json_row(IMAGES["rocket.jpg"], **GREEDY)))  # a smaller batch keeps it
    assert replies[0].json() == golden("rocket.jpg") and handler._pixel_slots.layout.count == len(names)
    handler.normalize_on_device = True  # uint8 pixels, as a GPU worker's processes write them
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    assert [r.json() for r in replies] == [golden(n) for n in IMAGES]
    assert handler._pixel_slots.layout.dtype == "|u1" and handler._pixel_slots.layout.count == len(IMAGES)


def test_without_shared_memory_the_pixels_travel_pickled(tmp_path, monkeypatch):
    """No block can be made (a /dev/shm too small for it): the worker logs it and its decode
    processes pickle the pixels back, as before the shared block."""
    tried = []
    monkeypatch.setattr(captioner_handler, "make_slots", lambda count, shape, dtype: tried.append(count))
    service, handler = make_service(make_model_dir(tmp_path, {"decode_processes": 2}))
    assert handler._pixel_slots is None
    for _ in range(2):
        replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
        assert [r.json() for r in replies] == [golden(n) for n in IMAGES]
    assert tried == [8]  # at start (batchSize 8); not tried, nor logged, again for batches no larger
    assert handler.describe_handle()["decode_pool"] == {"processes": 2, "shared_memory": False}


def test_a_pool_that_cannot_start_fails_only_the_requests_that_needed_it(tmp_path, monkeypatch):
    """No decode pool can start after a crash (no memory, no file descriptors): the requests
    prepared before keep their captions, those that needed a new pool get a 500, and the next
    batch starts one."""
    from handler import preparation

    service, handler = make_service(make_model_dir(tmp_path, {"decode_processes": 1}))
    monkeypatch.setattr(captioner_handler, "prepare_request", handler_harness.prepare_or_exit)
    out_of_descriptors = []

    def start_or_fail(pool, processes, wait=True):
        if not wait or out_of_descriptors:  # from the background start on, no process can start
            out_of_descriptors.append(True)
            raise OSError(24, "Too many open files")
        preparation.start_processes(pool, processes, wait)

    monkeypatch.setattr(captioner_handler, "start_processes", start_or_fail)
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY),
                                     raw_row(IMAGES["rocket.jpg"], mime("rocket.jpg"), query={"exit": "1"})))
    assert [r.status for r in replies] == [200, 500] and replies[0].json() == golden("chelsea.png")
    out_of_descriptors.clear()
    replies = predict(service, batch(json_row(IMAGES["coffee.png"], **GREEDY)))
    assert replies[0].status == 200 and replies[0].json() == golden("coffee.png")
    # A retry after the crash finds no pool that can start: it fails alone; the request prepared
    # before the crash keeps its captions.
    replies = predict(service, batch(json_row(IMAGES["chelsea.png"], **GREEDY),
                                     raw_row(IMAGES["rocket.jpg"], mime("rocket.jpg"), query={"exit": "1"}),
                                     json_row(IMAGES["coffee.png"], **GREEDY)))
    assert [r.status for r in replies] == [200, 500, 500] and replies[0].json() == golden("chelsea.png")
    assert "OSError" in replies[2].json()["error"]
    out_of_descriptors.clear()
    replies = predict(service, batch(json_row(IMAGES["coffee.png"], **GREEDY)))
    assert replies[0].status == 200 and replies[0].json() == golden("coffee.png")


def test_failures_come_back_from_a_decode_process_as_plain_values():
    """Whatever a request's preparation raises in a decode process, its task's outcomes cross
    back: an exception object that cannot be rebuilt (or pickled) used to fail its whole task,
    or look like a dead process, instead of its own request."""
    from handler.preparation import PreparationFailure, make_pool, prepare_requests

    rows = [{"id": 0}, {"raise": "unrebuildable"}, {"raise": "unpicklable"}, {"raise": "runtime"}, {"raise": "pillow"},
            {"id": 5}]
    pool = make_pool(processes=1, threads=1, intra_op_threads=1)
    try:
        outcomes = pool.submit(prepare_requests, rows, None, handler_harness.prepare_or_raise).result(timeout=120)
    finally:
        pool.shutdown()
    assert outcomes == [{"id": 0}, PreparationFailure(422, "odd (422)"), PreparationFailure(400, "holds a lambda"),
                        PreparationFailure(500, "internal error while decoding the image (RuntimeError)"),
                        PreparationFailure(400, "image file is truncated (3 bytes not processed)"), {"id": 5}]


def test_an_archive_whose_code_is_shadowed_by_another_copy_stops_the_worker(tmp_path):
    """From an extracted archive (MAR-INF), `model` and `handler` must be the archive's own copies:
    here they come from the checkout, as a stale copy on PYTHONPATH would."""
    assert captioner_handler._check_code_origin(tmp_path) == str(REPO)  # a plain model directory: any origin
    (tmp_path / "MAR-INF").mkdir()
    with pytest.raises(RuntimeError, match="packages not loaded from the model archive .*shadows them"):
        captioner_handler._check_code_origin(tmp_path)


def test_a_missing_dependency_is_named_not_taken_for_a_missing_handler():
    """TorchServe's loader answers an ImportError from the handler file by trying its built-in
    handlers ("No module named 'ts.torch_handler.captioner_handler'"); the handler turns it into
    an error that names the missing package."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None\n"  # importing it now raises ImportError
            "try:\n    import handler.captioner_handler\nexcept RuntimeError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "cannot import its dependencies" in result.stdout and "transformers" in result.stdout, result


def test_a_gpu_that_pytorch_cannot_use_stops_the_worker_with_a_clear_error(tmp_path, monkeypatch):
    """TorchServe hands out gpu_id only where it found NVIDIA GPUs; serving on the CPU there
    (e.g. a driver too old for PyTorch's CUDA build) would be a silent hundredfold slowdown."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="assigned GPU 0 .* cannot use CUDA .* number_of_gpu=0"):
        make_service(make_model_dir(tmp_path), gpu=0)


def test_the_worker_device_is_the_gpu_torchserve_assigned(monkeypatch):
    from handler.captioner_handler import worker_device

    assert worker_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert worker_device("1") == torch.device("cuda:1") and worker_device(0) == torch.device("cuda:0")
    with pytest.raises(RuntimeError, match="assigned GPU 2 .* sees 2 GPU"):
        worker_device(2)


def test_uint8_pixels_normalised_by_the_engine_give_the_golden_captions(tmp_path):
    """What a GPU worker does (uint8 images batched, normalised on the device), run on CPU."""
    service, handler = make_service(make_model_dir(tmp_path))
    assert not handler.normalize_on_device  # CPU: normalised in the decode threads
    handler.normalize_on_device = True
    engine_inputs, prefill = [], handler.engine.prefill_prefix
    handler.engine.prefill_prefix = lambda pixels: engine_inputs.append(pixels.dtype) or prefill(pixels)
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    assert [r.json() for r in replies] == [golden(n) for n in IMAGES]
    assert engine_inputs == [torch.uint8]


def test_invalid_handler_settings_fail_the_worker_start(tmp_path):
    from handler.settings import HandlerSettings, SettingsError

    with pytest.raises(SettingsError, match="compile_encdoer"):
        make_service(make_model_dir(tmp_path, {"compile_encdoer": True}))
    with pytest.raises(SettingsError, match="cpu_dtype"):
        make_service(make_model_dir(tmp_path / "b", {"cpu_dtype": "int8"}))
    with pytest.raises(SettingsError, match="compile_decode must be true, false or 'gpu'"):
        make_service(make_model_dir(tmp_path / "c", {"compile_decode": "always"}))
    with pytest.raises(SettingsError, match="max_num_captions must be at most 64"):
        make_service(make_model_dir(tmp_path / "d", {"limits": {"max_num_captions": 65}}))
    with pytest.raises(SettingsError, match="1 <= max_instances <= 32"):
        make_service(make_model_dir(tmp_path / "e", {"max_instances": 0}))
    with pytest.raises(SettingsError, match="max_repetition_penalty must be at least 0.01"):
        make_service(make_model_dir(tmp_path / "f", {"limits": {"max_repetition_penalty": 0.005}}))
    for bad in (0, -1, True, "8", 2.5):  # a limit is a positive number, an integer where its default is one
        with pytest.raises(SettingsError, match="handler.limits: max_num_captions must be"):
            HandlerSettings.from_dict({"limits": {"max_num_captions": bad}})
    for name, path in (("vocab", "/usr/share/dict/words"), ("vocab", "../vocab.txt"),
                       ("model_config", "configs/../../caption_config.json"), ("vocab", "")):
        with pytest.raises(SettingsError, match=f"{name} must be a path inside the archive"):
            HandlerSettings.from_dict({name: path})


def test_compile_settings_per_device():
    from handler.settings import HandlerSettings

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    default = HandlerSettings.from_dict({})
    names = ("compile_encoder", "compile_decode", "compile_prefill")
    assert [default.compiles(k, d) for k in names for d in (cpu, cuda)] == [
        False, True, False, True, False, True]  # "gpu": compiled on CUDA devices only
    forced = HandlerSettings.from_dict({"compile_encoder": True, "compile_decode": False})
    assert forced.compiles("compile_encoder", cpu) and not forced.compiles("compile_decode", cuda)


@pytest.mark.parametrize("pool", [{}, {"decode_processes": 2}])
def test_jpeg_draft_decodes_large_jpegs_at_a_reduced_scale(tmp_path, pool):
    """`jpeg_draft: true` reaches the decoder in threads and in processes: the tiny model's 64 px
    input is made from rocket.jpg (640x427) decoded at 1/4 scale (160x107); a PNG is unchanged."""
    from model.image import decode_image, to_pixel_values

    service, handler = make_service(make_model_dir(tmp_path, {"jpeg_draft": True, **pool}))
    import base64

    rows = [{"body": {"image": base64.b64encode(IMAGES[name]).decode()}} for name in ("rocket.jpg", "chelsea.png")]
    prepared = handler.preprocess(rows)  # the rows as the worker hands them to handle()
    assert prepared.good == [0, 1]
    drafted = to_pixel_values(decode_image(IMAGES["rocket.jpg"], draft_to=64), 64)
    assert torch.equal(prepared.pixels[0], drafted)
    assert not torch.equal(drafted, to_pixel_values(decode_image(IMAGES["rocket.jpg"]), 64))
    assert torch.equal(prepared.pixels[1], to_pixel_values(decode_image(IMAGES["chelsea.png"]), 64))
    replies = predict(service, batch(json_row(IMAGES["rocket.jpg"], **GREEDY)))
    assert replies[0].status == 200 and set(replies[0].json()) == {"Concise", "Narrative", "Descriptive"}


def test_decode_pool_settings_per_device(monkeypatch):
    """`decode_processes`: a count, 0 (threads), or "gpu" (the default): on a CUDA device the
    worker's share of the usable cores less one, threads on CPU."""
    from handler import settings as settings_module
    from handler.settings import HandlerSettings, SettingsError

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(settings_module, "usable_cores", lambda: 16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    default = HandlerSettings.from_dict({})
    assert (default.decode_process_count(cpu), default.decode_process_count(cuda)) == (0, 15)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert default.decode_process_count(cuda) == 7  # one worker per GPU: half the cores each
    for count in (0, 3):
        explicit = HandlerSettings.from_dict({"decode_processes": count})
        assert explicit.decode_process_count(cpu) == explicit.decode_process_count(cuda) == count
    for wrong in ("many", True, 1.5):
        with pytest.raises(SettingsError, match="decode_processes must be an integer or 'gpu'"):
            HandlerSettings.from_dict({"decode_processes": wrong})
    with pytest.raises(SettingsError, match="decode_processes >= 0 or 'gpu'"):
        HandlerSettings.from_dict({"decode_processes": -1})


def test_cpu_compile_decode_serves_the_golden_captions_through_the_compiled_packed_step(tmp_path):
    """`cpu_compile_decode`: the engine's compiled eager step (`compile_step`), the packed Linears
    kept; the golden greedy captions through it. Refused with what it cannot compile."""
    from handler.settings import HandlerSettings, SettingsError
    from model.packing import is_packed

    service, handler = make_service(make_model_dir(tmp_path, {"cpu_compile_decode": True, "warmup": False}))
    assert handler.engine.compile_step and is_packed(handler.engine.model) and not handler.engine.static_shapes
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    assert [r.json() for r in replies] == [golden(n) for n in IMAGES]
    with pytest.raises(SettingsError, match="cpu_compile_decode compiles the packed eager step"):
        HandlerSettings.from_dict({"cpu_compile_decode": True, "compile_decode": True})
    assert HandlerSettings.from_dict({"cpu_compile_decode": True, "cpu_quantize": "int8"}).cpu_quantize == "int8"
    assert not HandlerSettings.from_dict({}).cpu_compile_decode  # opt-in


def test_cpu_quantize_serves_int8_through_the_compiled_step(tmp_path):
    """`cpu_quantize: int8` with `cpu_compile_decode`: the int8 Linears in the compiled step; the
    golden greedy captions within the int8 parity tolerance (tests/integration/test_quantize.py)."""
    from model.quantize import is_quantized

    service, handler = make_service(make_model_dir(tmp_path, {"cpu_quantize": "int8", "cpu_compile_decode": True,
                                                              "warmup": False}))
    assert handler.engine.compile_step and is_quantized(handler.engine.model)
    facts = handler.describe_handle()
    assert (facts["int8_decoder"], facts["packed_decoder"], facts["compiled"]["decode_step"]) == (True, False, True)
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    same = sum(r.json() == golden(n) for r, n in zip(replies, IMAGES))
    assert all(r.status == 200 for r in replies) and same >= len(IMAGES) - 1, same


def test_compile_dynamic_rows_setting_reaches_the_engine(tmp_path):
    _, handler = make_service(make_model_dir(tmp_path, {"compile_decode": True, "compile_dynamic_rows": False}))
    assert handler.engine.static_shapes and not handler.engine.dynamic_rows
    _, default = make_service(make_model_dir(tmp_path / "default", {"compile_decode": True}))
    assert default.engine.static_shapes and default.engine.dynamic_rows


def test_image_major_static_layout_gives_the_golden_captions(tmp_path):
    """`static_layout: images` with the compiled static decode path (symbolic sizes), on CPU."""
    from handler.settings import SettingsError

    with pytest.raises(SettingsError, match="compile_dynamic_rows"):
        make_service(make_model_dir(tmp_path / "static", {"static_layout": "images", "compile_dynamic_rows": False}))
    with pytest.raises(SettingsError, match="static_layout must be one of"):
        make_service(make_model_dir(tmp_path / "typo", {"static_layout": "image"}))
    service, handler = make_service(make_model_dir(tmp_path, {"compile_decode": True, "static_layout": "images"}))
    assert handler.engine.static_shapes and handler.engine.static_layout == "images"
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    assert [r.json() for r in replies] == [golden(n) for n in IMAGES]
    assert all(isinstance(key, tuple) for key in handler.engine._static_caches)


def test_compiled_prefill_setting_gives_the_golden_captions(tmp_path):
    service, handler = make_service(make_model_dir(tmp_path, {"compile_prefill": True}))
    assert handler.engine.compile_prefill and not handler.engine.static_shapes
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    assert [r.json() for r in replies] == [golden(n) for n in IMAGES]


def test_default_settings_on_cpu_serve_the_packed_eager_engine(tmp_path):
    _, handler = make_service(make_model_dir(tmp_path))
    assert not handler.engine.static_shapes and not handler.engine.encoder_buckets


def test_settings_threads_and_dtype_are_applied(tmp_path):
    before = torch.get_num_threads()
    try:
        _, handler = make_service(make_model_dir(tmp_path, {"threads": 1, "cpu_dtype": "bfloat16", "warmup": True}))
        assert torch.get_num_threads() == 1
        assert handler.engine.dtype == torch.bfloat16
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("native_bf16, expected", [(False, torch.float32), (True, torch.bfloat16)])
def test_cpu_dtype_auto_loads_bfloat16_only_where_the_cpu_has_it(tmp_path, monkeypatch, native_bf16, expected):
    """The shipped `cpu_dtype: auto`, with the CPU's capability faked both ways: the worker
    loads the weights in the chosen type, and the engine serves a request in it."""
    from model import precision

    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: native_bf16)
    service, handler = make_service(make_model_dir(tmp_path, {"cpu_dtype": "auto"}))
    assert handler.engine.dtype == expected
    assert handler.engine.model.token_embeddings.weight.dtype == expected
    reply = predict(service, batch(json_row(IMAGES["rocket.jpg"], **GREEDY)))[0]
    assert reply.status == 200 and len(reply.json()) == 3
    if expected == torch.float32:
        assert reply.json() == golden("rocket.jpg")


@pytest.mark.parametrize("per_thread", [1, 2])
def test_decode_threads_have_their_own_intra_op_thread_count(tmp_path, per_thread):
    """Each decode thread resizes with `decode_intra_op_threads` threads; the worker's thread
    keeps its own count (the decode threads change PyTorch's default for new threads)."""
    before = torch.get_num_threads()
    service, handler = make_service(make_model_dir(tmp_path, {"decode_intra_op_threads": per_thread}))
    assert predict(service, batch(json_row(IMAGES["rocket.jpg"], **GREEDY)))[0].json() == golden("rocket.jpg")
    assert handler._decode_pool.submit(torch.get_num_threads).result() == per_thread
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------- on a CUDA device
@pytest.fixture
def cuda_device():
    """Selected only with `-m gpu` (bench/gpu_check.sh): without a CUDA device that is an error."""
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device"


cuda = pytest.mark.usefixtures("cuda_device")
# Warm-up compiles a graph per row bucket and span up to batchSize x 3 x max_num_captions rows:
# at 2 captions per style, 12 graphs instead of the defaults' 20 (which took over 190 s on an
# H100), enough for the requests below.
WARMUP = {"warmup": True, "limits": {"max_num_captions": 2}}


@pytest.mark.gpu
@cuda
def test_cuda_float32_gives_the_golden_captions_and_compiled_encoder_too(tmp_path):
    for compile_encoder in (False, True):
        service, handler = make_service(make_model_dir(tmp_path / str(compile_encoder), {
            "gpu_dtype": "float32", "compile_encoder": compile_encoder, **WARMUP}), gpu=0)
        assert handler.device == torch.device("cuda:0") and handler.engine.dtype == torch.float32
        for kind, options in (("greedy", GREEDY), ("greedy_plain", PLAIN)):
            replies = predict(service, batch(*(json_row(IMAGES[n], **options) for n in IMAGES)))
            assert [r.json() for r in replies] == [golden(n, kind) for n in IMAGES], compile_encoder


@pytest.mark.gpu
@cuda
def test_cuda_defaults_to_bfloat16(tmp_path):
    service, handler = make_service(make_model_dir(tmp_path, WARMUP), gpu=0)
    assert handler.engine.dtype == torch.bfloat16
    replies = predict(service, batch(*(json_row(IMAGES[n], **GREEDY) for n in IMAGES)))
    assert all(r.status == 200 and set(r.json()) == {"Concise", "Narrative", "Descriptive"} for r in replies)
    identical = identical_greedy_captions(list(IMAGES), [r.json() for r in replies], handler_harness.EXPECTED)
    print(f"bfloat16 greedy: {identical}/{3 * len(IMAGES)} captions identical to the float32 golden captions")
    assert identical >= BF16_MIN_IDENTICAL


@pytest.mark.gpu
@cuda
def test_cuda_out_of_memory_gives_507_and_the_worker_recovers(tmp_path):
    service, handler = make_service(make_model_dir(tmp_path, {"gpu_dtype": "float32"}), gpu=0)
    rows = batch(*(json_row(IMAGES[n], num_captions=8, temperature=0) for n in IMAGES for _ in range(2)))
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (1 << 20)) / total, 0)
    try:
        replies = predict(service, rows)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert {r.status for r in replies} == {507}, [(r.status, r.body[:200]) for r in replies]
    assert "out of memory" in replies[0].json()["error"]
    replies = predict(service, batch(json_row(IMAGES["rocket.jpg"], **GREEDY)))
    assert replies[0].status == 200 and replies[0].json() == golden("rocket.jpg")


@pytest.mark.gpu
@cuda
def test_cuda_full_size_batch_timing(tmp_path):
    """Full-size RANDOM weights in bfloat16: a full batch of 8 default requests (3 styles x 2
    captions, up to 128 tokens: random weights rarely stop early), i.e. the worst case the
    responseTimeout must cover."""
    import shutil
    import time

    from weights.random_init import write_random_checkpoint

    model_dir = make_model_dir(tmp_path, WARMUP)
    write_random_checkpoint(model_dir / "weights.pt", seed=0)
    shutil.copy(REPO_CONFIG_FULL(), model_dir / "caption_config.json")
    service, handler = make_service(model_dir, gpu=0)
    assert handler.engine.config.image_size == 384
    names = list(IMAGES)
    rows = batch(*(json_row(IMAGES[names[i % 3]]) for i in range(8)))
    for attempt in range(2):
        started = time.perf_counter()
        replies = predict(service, rows)
        seconds = time.perf_counter() - started
        stats = handler.engine.last_stats
        print(f"full-size bf16 batch of 8 (attempt {attempt}): {seconds:.2f} s, stats {stats}")
    assert all(r.status == 200 for r in replies)
    assert seconds < 60


def REPO_CONFIG_FULL():  # noqa: N802 - the full-size preset as a JSON file
    import tempfile
    from pathlib import Path

    from model.config import PRESETS

    path = Path(tempfile.mkdtemp()) / "caption_config.json"
    PRESETS["seed-full"].to_json(path)
    return path


def test_warmup_covers_every_row_count_a_full_batch_can_need(tmp_path, monkeypatch):
    """batchSize 8, limits.max_num_captions 3: up to 8 images x 3 styles x 3 captions = 72 rows."""
    from model.engine import CaptionEngine

    calls = []
    monkeypatch.setattr(CaptionEngine, "warmup", lambda self, **kwargs: calls.append(kwargs))
    make_service(make_model_dir(tmp_path, {"warmup": True, "limits": {"max_num_captions": 3}}), batch_size=8)
    assert calls == [{"batch_sizes": [1, 8], "max_rows": 72}]
