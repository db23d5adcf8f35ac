"""The HTTP load generator of `python -m bench http` against a stub server on 127.0.0.1.

The stub answers POST /predictions/<model> after a fixed delay, like a TorchServe worker would,
and records what it received; a few paths answer errors. No TorchServe, no model: seconds.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from urllib.parse import parse_qsl, urlsplit

import pytest

from tests.conftest import cpu_flags
from tests.local_http import serving
from bench import http_bench, http_load, http_server
from bench.http_load import Client, Sample, closed_loop, open_loop, percentile, summarize
from bench.http_server import Mode

pytestmark = pytest.mark.unit

DELAY_S = 0.02
CAPTIONS = {"Concise": ["a"], "Narrative": ["b"], "Descriptive": ["c"]}


class StubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like TorchServe

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        server = self.server
        if self.path.startswith("/models?"):  # management: register
            self.register(dict(parse_qsl(urlsplit(self.path).query)))
            return
        with server.lock:
            model = self.path.rsplit("/", 1)[-1]
            server.counts[model] = server.counts.get(model, 0) + 1
            server.bodies.append(body)
            server.auth.append(self.headers.get("Authorization"))
            server.in_flight += 1
            server.peak = max(server.peak, server.in_flight)
        try:
            time.sleep(DELAY_S)
            model = self.path.rsplit("/", 1)[-1]
            if model == "fails":
                self.answer(503, {"code": 503, "message": "queue full"})
            elif model == "error-json":
                self.answer(200, {"error": "bad"})
            elif model == "not-json":
                self.answer(200, b"<html>")
            else:
                self.answer(200, CAPTIONS)
        finally:
            with server.lock:
                server.in_flight -= 1

    def register(self, params: dict) -> None:
        with self.server.lock:
            self.server.management_auth.append(self.headers.get("Authorization"))
            self.server.models[params["model_name"]] = {
                "modelName": params["model_name"], "modelUrl": params["url"], "batchSize": int(params["batch_size"]),
                "maxBatchDelay": int(params.get("max_batch_delay", 50)), "responseTimeout": 600,
                "minWorkers": 1, "maxWorkers": 1, "workers": [{"status": "READY"}]}
        self.answer(200, {"status": f"Model \"{params['model_name']}\" registered"})

    def do_DELETE(self):  # noqa: N802
        with self.server.lock:
            self.server.models.pop(self.path.rsplit("/", 1)[-1], None)
        self.answer(200, {"status": "unregistered"})

    def do_GET(self):  # noqa: N802 - describe, or the metrics endpoint
        if self.path.startswith("/models/"):
            name, _, query = self.path.rsplit("/", 1)[-1].partition("?")
            model = self.server.models.get(name)
            if model and query == "customized=true" and not model.get("legacy"):  # what the handler adds
                model = {**model, "customizedMetadata": {"device": "cpu", "dtype": "bfloat16", "packed_decoder": True,
                                                         "int8_decoder": False, "compiled": {"decode": False},
                                                         "styles": {}}}
            self.answer(200, [model]) if model else self.answer(404, {"code": 404})
            return
        text = "\n".join([
            "# TYPE CaptionRequestsTotal counter",
            'CaptionRequestsTotal{ModelName="m",Level="Model",Hostname="h"} 12.0',
            'CaptionRequestsTotal{ModelName="other",Level="Model",Hostname="h"} 99.0',
            "# TYPE CaptionBatchesTotal counter",
            'CaptionBatchesTotal{ModelName="m",Level="Model",Hostname="h"} 3.0',
            "# TYPE CaptionGenerateMs gauge",
            'CaptionGenerateMs{ModelName="m",Level="Model",Hostname="h"} 812.5',
        ])
        with self.server.lock:  # other models: one request per batch, counted as they arrive
            for model, count in self.server.counts.items():
                text += f'\nCaptionRequestsTotal{{ModelName="{model}",Level="Model"}} {count}.0'
                text += f'\nCaptionBatchesTotal{{ModelName="{model}",Level="Model"}} {count}.0'
        text += "\n"
        self.answer(200, text.encode())

    def answer(self, status: int, payload) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture()
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubHandler)
    server.lock = threading.Lock()
    server.bodies, server.auth = [], []
    server.in_flight = server.peak = 0
    server.management_auth, server.counts = [], {}
    server.models = {"captioner": {"modelName": "captioner", "modelUrl": "captioner.mar", "batchSize": 8,
                                   "maxBatchDelay": 50, "responseTimeout": 600, "workers": [{"status": "READY"}]}}
    with serving(server):
        yield server


def url(server) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


# ---------------------------------------------------------------------------- statistics
def test_percentile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 95) == pytest.approx(3.85)
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 101)


def test_summarize_counts_only_good_answers():
    samples = [Sample(0.0, 1.0, 200), Sample(0.0, 3.0, 200), Sample(1.0, 1.5, 503, "HTTP 503"),
               Sample(1.0, 9.0, 0, "timeout"), Sample(2.0, 2.5, 503, "HTTP 503")]
    result = summarize(samples, wall_s=4.0)
    assert (result["requests"], result["ok"], result["errors"]) == (5, 2, 3)
    assert result["error_kinds"] == {"HTTP 503": 2, "timeout": 1}
    assert result["images_per_s"] == pytest.approx(0.5)
    latency = result["latency_s"]
    assert latency["mean"] == pytest.approx(2.0) and latency["max"] == 3.0
    assert latency["p50"] == pytest.approx(2.0)
    empty = summarize([], wall_s=0.0)
    assert empty["images_per_s"] == 0.0 and empty["latency_s"]["p95"] is None


def test_summaries_and_ratio_over_repeats():
    modes = [Mode("b8-d50", "m-b8", 8, 50), Mode("b1", "m-b1", 1, None)]

    def run(mode, concurrency, ips, repeat):
        return {"mode": mode, "kind": "closed", "concurrency": concurrency, "repeat": repeat, "images_per_s": ips,
                "requests": 4, "errors": 0, "mean_batch_size": None,
                "latency_s": {"p50": 1.0 + repeat, "p95": 2.0, "p99": 3.0}}

    runs = [run("b8-d50", 1, 1.0, 0), run("b1", 1, 1.0, 0), run("b8-d50", 8, 3.0, 0), run("b1", 8, 1.1, 0),
            run("b8-d50", 1, 1.2, 1), run("b1", 1, 0.8, 1), run("b8-d50", 8, 5.0, 1), run("b1", 8, 0.9, 1)]
    summary = http_bench.summarize_runs(runs, modes)
    by = {(r["mode"], r["concurrency"]): r for r in summary}
    assert by[("b8-d50", 8)]["images_per_s"] == pytest.approx(4.0)
    assert by[("b8-d50", 8)]["images_per_s_runs"] == [3.0, 5.0]
    assert by[("b8-d50", 8)]["spread_pct"] == pytest.approx(50.0)
    assert by[("b1", 1)]["p50_s"] == pytest.approx(1.5)  # median over repeats
    ratio = http_bench.ratios(summary, modes)["b8-d50"]
    assert ratio["best_concurrency"] == 8
    assert ratio["ratio"] == pytest.approx(4.0 / 0.9)
    assert ratio["ratio_range"] == [pytest.approx(3.0 / 1.0), pytest.approx(5.0 / 0.8)]
    assert ratio["ratio_best_repeats"] == pytest.approx(5.0 / 1.0)
    # a baseline repeat that served nothing (all its requests failed) leaves the range open
    runs[5] = run("b1", 1, 0.0, 1)
    ratio = http_bench.ratios(http_bench.summarize_runs(runs, modes), modes)["b8-d50"]
    assert ratio["ratio_range"] == [pytest.approx(3.0 / 1.0), None]


def test_request_body_and_options():
    image = http_load.synthetic_jpeg(64, 48)
    assert image[:2] == b"\xff\xd8"  # a JPEG
    options = http_load.request_options(16, 2, ["concise", "narrative"], dict([http_load.parse_option("seed=3")]))
    assert options == {"styles": ["concise", "narrative"], "num_captions": 2, "max_new_tokens": 16, "seed": 3}
    assert http_load.request_options() == {}  # the service's defaults: six captions, 128 tokens
    document = json.loads(http_load.request_body(image, options))
    assert set(document) == {"image", *options}
    assert http_load.parse_option("styles=concise") == ("styles", "concise")
    with pytest.raises(ValueError):
        http_load.parse_option("novalue")


# ---------------------------------------------------------------------------- the request loop
def test_closed_loop_sends_exactly_the_requests_with_the_concurrency(stub):
    body = http_load.request_body(http_load.synthetic_jpeg(32, 32), {"max_new_tokens": 4})
    client = Client(url(stub), "m", body, key="secret", timeout=10)
    started = time.perf_counter()
    result = closed_loop(client.send, concurrency=4, requests_total=12)
    elapsed = time.perf_counter() - started
    assert (result["requests"], result["ok"], result["errors"]) == (12, 12, 0)
    assert len(stub.bodies) == 12 and all(b == body for b in stub.bodies)
    assert set(stub.auth) == {"Bearer secret"}
    assert stub.peak == 4  # never more than the clients, and all of them at once
    # 12 requests, 4 at a time, 20 ms each: ~3 rounds, not 12 sequential ones
    assert elapsed < 12 * DELAY_S
    assert result["images_per_s"] == pytest.approx(12 / result["wall_s"])
    assert result["wall_s"] <= elapsed
    assert DELAY_S <= result["latency_s"]["p50"] <= result["latency_s"]["p99"] <= result["latency_s"]["max"]


def test_closed_loop_stops_starting_requests_after_max_seconds(stub):
    client = Client(url(stub), "m", b"{}", timeout=10)
    result = closed_loop(client.send, concurrency=2, requests_total=10_000, max_seconds=0.15)
    assert 2 <= result["requests"] < 100
    assert result["errors"] == 0


@pytest.mark.parametrize("model,kind", [("fails", "HTTP 503"), ("error-json", "200 without captions"),
                                        ("not-json", "200 without JSON")])
def test_bad_answers_are_errors_by_kind(stub, model, kind):
    result = closed_loop(Client(url(stub), model, b"{}", timeout=10).send, concurrency=2, requests_total=4)
    assert (result["ok"], result["errors"], result["error_kinds"]) == (0, 4, {kind: 4})
    assert result["images_per_s"] == 0.0


def test_no_server_is_a_connection_error():
    port = http_bench_free_port()
    result = closed_loop(Client(f"http://127.0.0.1:{port}", "m", b"{}", timeout=2).send, 1, 2)
    assert result["errors"] == 2 and all(k.startswith("connection") for k in result["error_kinds"])


def test_open_loop_keeps_the_rate_and_counts_latency_from_the_arrival(stub):
    client = Client(url(stub), "m", b"{}", timeout=10)
    result = open_loop(client.send, rate=100.0, requests_total=20, seed=1)
    assert (result["requests"], result["ok"]) == (20, 20)
    # 20 Poisson arrivals at 100/s span ~0.2 s; the stub answers in 20 ms, concurrently
    assert result["wall_s"] < 2.0
    assert result["latency_s"]["p50"] >= DELAY_S
    # at most one in flight: arrivals queue on the client side, and that wait is latency
    queued = open_loop(client.send, rate=200.0, requests_total=10, max_in_flight=1, seed=1)
    assert queued["ok"] == 10
    assert queued["latency_s"]["max"] >= 5 * DELAY_S


def test_metric_totals_and_mean_batch_size(stub):
    metrics_url = url(stub)
    assert http_server.metric_totals(metrics_url, "m") == (12.0, 3.0)
    assert http_server.mean_batch_size(metrics_url, "m", (4.0, 1.0), expected_requests=8) == pytest.approx(4.0)
    assert http_server.last_batch(metrics_url, "m") == {"GenerateMs": 812.5}
    assert http_server.metric_totals(None, "m") is None
    assert http_server.metric_totals(f"http://127.0.0.1:{http_bench_free_port()}", "m") is None


def test_mean_batch_size_waits_until_every_request_is_counted(monkeypatch):
    """Metrics reach the frontend through the worker's log: a read right after the level can miss
    the last batches."""
    reads = iter([(6.0, 2.0), (12.0, 3.0)])  # 2 of 8 requests counted, then all 8 in 2 batches
    monkeypatch.setattr(http_server, "metric_totals", lambda url, model: next(reads))
    assert http_server.mean_batch_size("http://metrics", "m", (4.0, 1.0), expected_requests=8) == pytest.approx(4.0)


def test_registration_settings_are_checked():
    mode = Mode("b8-d50", "m-b8", 8, 50)
    http_server.check_applied(mode, {"batchSize": 8, "maxBatchDelay": 50})
    with pytest.raises(RuntimeError, match="max_batch_delay"):
        http_server.check_applied(mode, {"batchSize": 8, "maxBatchDelay": 100})
    with pytest.raises(RuntimeError, match="batch_size"):
        http_server.check_applied(Mode("b1", "m-b1", 1, None), {"batchSize": 8, "maxBatchDelay": 50})
    args = SimpleNamespace(register=True, model="captioner", batch_size=8, max_batch_delay=[10, 200], single=True)
    assert [(m.model, m.batch_size, m.max_batch_delay) for m in http_bench.build_modes(args)] == [
        ("captioner-bench-b8-d10", 8, 10), ("captioner-bench-b8-d200", 8, 200), ("captioner-bench-b1", 1, None)]


def http_bench_free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_keys_given_on_the_command_line_are_not_recorded():
    from bench.http_bench import recorded_command

    command = recorded_command(["http", "--key", "ik-secret", "--management-key=mk-secret", "--url", "u"])
    assert command == "python -m bench http --key *** --management-key=*** --url u"


def test_the_command_against_a_running_server(stub, tmp_path, capsys):
    """`python -m bench http --url ...`: registers the model's archive twice (batch 8 and 1),
    sweeps both, unregisters, writes the JSON and the plot."""
    from bench.__main__ import main

    keys = tmp_path / "key_file.json"
    keys.write_text(json.dumps({"management": {"key": "mk"}, "inference": {"key": "ik"}, "API": {"key": "ak"}}))
    base = url(stub)
    argv = ["http", "--url", base, "--management-url", base, "--metrics-url", base, "--key-file", str(keys),
            "--concurrency", "1,2", "--requests", "2", "--repeats", "2", "--max-new-tokens", "4",
            "--out", str(tmp_path / "out"), "--name", "stub"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "stub.json").read_text())
    assert (tmp_path / "out" / "stub.png").stat().st_size > 0
    assert results["command"] == "python -m bench " + " ".join(argv)
    assert [(m["model"], m["applied"]["batchSize"], m["applied"]["maxBatchDelay"]) for m in results["modes"]] == [
        ("captioner-bench-b8-d50", 8, 50), ("captioner-bench-b1", 1, 50)]
    assert all(m["applied"]["modelUrl"] == "captioner.mar" for m in results["modes"])  # from describe captioner
    assert all(m["applied"]["worker"] == {"device": "cpu", "dtype": "bfloat16", "packed_decoder": True,
                                          "int8_decoder": False, "compiled": {"decode": False}}
               for m in results["modes"])
    assert list(stub.models) == ["captioner"]  # the extra registrations are gone
    assert set(stub.management_auth) == {"Bearer mk"} and set(stub.auth) == {"Bearer ik"}
    assert {json.loads(b)["max_new_tokens"] for b in stub.bodies} == {4}
    # 2 modes x 2 levels x 2 repeats, 2 requests each, plus the warm-ups (2 for b8, 1 for b1)
    assert len(results["runs"]) == 8 and len(stub.bodies) == 8 * 2 + 3
    assert all(r["ok"] == 2 and r["errors"] == 0 for r in results["runs"])
    assert {(r["mode"], r["concurrency"]) for r in results["summary"]} == {
        ("b8-d50", 1), ("b8-d50", 2), ("b1", 1), ("b1", 2)}
    assert all(r["mean_batch_size"] == 1.0 for r in results["runs"])
    assert results["ratio"]["b8-d50"]["ratio"] > 0
    assert "target >= 4x" in capsys.readouterr().out


def test_worker_facts_of_an_archive_whose_handler_does_not_answer_describe(stub):
    from bench.http_server import Management

    stub.models["legacy"] = {**stub.models["captioner"], "modelName": "legacy", "legacy": True}
    management = Management(url(stub), None)
    assert management.worker_facts("captioner")["dtype"] == "bfloat16"
    assert management.worker_facts("legacy")["unavailable"].startswith("HTTP 200")


def test_host_info_names_the_cpu_features_the_cpu_path_depends_on():
    from bench.http_bench import SPEED_FLAGS, host_info

    info = host_info()
    assert info["cores"] >= info["usable_cores"] >= 1 and info["cpu"]
    assert set(info["cpu_flags"]) == cpu_flags() & set(SPEED_FLAGS)


def test_start_pins_the_handler_settings_it_is_given(tmp_path):
    """--start's archive: the shipped model-config.yaml with threads and the CPU options set."""
    import yaml

    from bench.__main__ import build_parser
    from bench.http_server import bench_model_config

    args = build_parser().parse_args(["http", "--start", "--weights", "w.pt", "--cpu-quantize", "int8",
                                      "--cpu-compile-decode"])
    path = bench_model_config(2, None, tmp_path, args.cpu_quantize, args.cpu_compile_decode)
    handler = yaml.safe_load(path.read_text())["handler"]
    assert (handler["threads"], handler["cpu_quantize"], handler["cpu_compile_decode"]) == (2, "int8", True)
    plain = yaml.safe_load(bench_model_config(2, None, tmp_path / "plain").read_text())["handler"]
    assert "cpu_quantize" not in plain and plain["cpu_compile_decode"] is False  # the shipped default
