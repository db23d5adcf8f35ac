"""TorchServe's gRPC inference API (`InferenceAPIsService`, 127.0.0.1 in the shipped config)
against the session's TorchServe: the same captions as over HTTP, the same error messages
(inside an OK reply: TorchServe's gRPC drops per-request statuses), and token authorization.

The client stubs are generated at test time from the `inference.proto` that the installed
TorchServe's frontend jar carries (with the Google protos it imports), so they match the
server that runs; nothing generated is committed.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import grpc
import pytest

from tests.e2e.seed import MODEL, golden, image_bytes

pytestmark = pytest.mark.e2e

PROTOS = ("inference.proto", "google/rpc/status.proto", "google/protobuf/any.proto", "google/protobuf/empty.proto")
GREEDY = {"temperature": b"0", "num_captions": b"1"}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory):
    """(inference_pb2, inference_pb2_grpc) compiled from the running TorchServe's own proto."""
    import ts

    jar = Path(ts.__file__).parent / "frontend" / "model-server.jar"
    out = tmp_path_factory.mktemp("grpc-stubs")
    with zipfile.ZipFile(jar) as archive:
        for name in PROTOS:
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            (out / name).write_bytes(archive.read(name))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{out}", f"--python_out={out}",
                    f"--grpc_python_out={out}", "inference.proto", "google/rpc/status.proto"],
                   check=True, capture_output=True, cwd=out)
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("inference_pb2"), importlib.import_module("inference_pb2_grpc")
    finally:
        sys.path.remove(str(out))


@pytest.fixture(scope="module")
def client(server, stubs):
    _, pb2_grpc = stubs
    with grpc.insecure_channel(f"127.0.0.1:{server.ports['grpc_inference']}") as channel:
        yield pb2_grpc.InferenceAPIsServiceStub(channel)


def predict(server, stubs, client, key: str | None = "inference", **inputs: bytes):
    pb2, _ = stubs
    metadata = [("authorization", f"Bearer {server.keys[key]}")] if key else []
    return client.Predictions(pb2.PredictionsRequest(model_name=MODEL, input=inputs), metadata=metadata, timeout=120)


def test_grpc_predictions_give_the_golden_captions(server, stubs, client):
    response = predict(server, stubs, client, data=image_bytes("chelsea.png"), **GREEDY)
    assert json.loads(response.prediction) == golden("chelsea.png")
    concise = predict(server, stubs, client, data=image_bytes("rocket.jpg"), styles=b"concise", **GREEDY)
    assert json.loads(concise.prediction) == golden("rocket.jpg", styles=["concise"])


def test_grpc_bad_input_is_an_ok_reply_holding_the_handlers_error(server, stubs, client):
    """TorchServe 0.12's gRPC Predictions ignores the status the handler sets for a request
    (GRPCJob.response): a refused request is an OK reply whose prediction is the JSON error."""
    bad_image = predict(server, stubs, client, data=b"not an image", **GREEDY)
    assert json.loads(bad_image.prediction) == {"error": "not a recognised image (12 bytes)"}
    bad_option = predict(server, stubs, client, data=image_bytes("chelsea.png"), num_captions=b"99")
    assert json.loads(bad_option.prediction) == {"error": "'num_captions' must be between 1 and 8, got 99"}


def test_grpc_needs_the_inference_key(server, stubs, client):
    for key in (None, "management"):
        with pytest.raises(grpc.RpcError) as caught:
            predict(server, stubs, client, key=key, data=image_bytes("chelsea.png"), **GREEDY)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED, (key, caught.value)
        assert "Token Authorization failed" in caught.value.details()


def test_grpc_stream_predictions_give_one_reply_and_keep_the_worker(server, stubs, client):
    """Before the handler marked its gRPC replies, one StreamPredictions call made TorchServe's
    frontend fail on the reply (NullPointerException), answer INTERNAL "Worker died." and
    restart the worker: a model reload, minutes on a GPU."""
    pb2, _ = stubs
    (before,) = server.describe(MODEL)[0]["workers"]
    request = pb2.PredictionsRequest(model_name=MODEL, input={"data": image_bytes("coffee.png"), **GREEDY})
    replies = list(client.StreamPredictions(request, metadata=[("authorization", f"Bearer {server.keys['inference']}")],
                                            timeout=120))
    assert [json.loads(reply.prediction) for reply in replies] == [golden("coffee.png")]
    (after,) = server.describe(MODEL)[0]["workers"]
    assert (after["pid"], after["status"]) == (before["pid"], "READY"), (before, after)
