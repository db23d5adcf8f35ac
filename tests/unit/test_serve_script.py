"""scripts/serve.py's own logic, without starting TorchServe: how long it waits for READY, how many
threads the worker gets, the port settings and the properties it reads."""

import json
import os
import subprocess
import sys
import time

import pytest

from scripts import serve

pytestmark = pytest.mark.unit


@pytest.fixture
def server_process():
    """A stand-in for TorchServe's process that stays up while a test waits on it."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield process
    process.kill()
    process.wait()


def test_waiting_for_ready_gives_up_with_the_worker_log(tmp_path, monkeypatch, server_process):
    monkeypatch.setattr(serve, "KEY_FILE", tmp_path / "key_file.json")  # never written: the server is stuck
    monkeypatch.setattr(serve, "log_tail", lambda name: f"tail of {name}")
    started = time.monotonic()
    with pytest.raises(serve.Failure, match=r"not ready after 1 s (?s:.*)tail of model_log.log"):
        serve.wait_ready(server_process, {"management_address": "http://127.0.0.1:9"}, timeout_s=1)
    assert time.monotonic() - started < 10


def test_ready_timeout_outlasts_the_archive_startup_timeout():
    """TorchServe gives up on a worker after startupTimeout: make serve waits longer, so that it
    reports the worker's failure rather than its own impatience (an H100's cold warm-up: 121 s)."""
    import yaml

    startup = yaml.safe_load(serve.MODEL_YAML.read_text())["startupTimeout"]
    assert serve.ready_timeout_s() > startup >= 121


def test_a_process_that_only_names_the_frontend_is_not_another_instance(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "REPO", tmp_path)
    watcher = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", serve.FRONTEND_CLASS],
                               cwd=tmp_path)  # e.g. `watch pgrep -af org.pytorch.serve.ModelServer` left running
    try:
        deadline = time.monotonic() + 10
        while serve.working_folder(watcher.pid) != str(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(pid == watcher.pid for pid, _ in serve.described_processes([str(tmp_path)], by_cwd=True))
        serve.check_no_other_instance_here()  # not java: no refusal
    finally:
        watcher.kill()
        watcher.wait()


def test_the_compile_cache_outlives_the_run():
    """The run's temporary folder goes when it stops; torch.compile's cache must not go with it."""
    assert serve.compile_cache_env({}) == {"TORCHINDUCTOR_CACHE_DIR": str(serve.REPO / "build" / "compile-cache")}
    assert serve.compile_cache_env({"TORCHINDUCTOR_CACHE_DIR": "/data/cache"}) == {"TORCHINDUCTOR_CACHE_DIR": "/data/cache"}


def test_a_worker_that_fails_to_load_ends_the_wait_with_its_error(tmp_path, monkeypatch, server_process):
    """TorchServe retries a worker whose initialize raised, for up to startupTimeout; make serve
    stops at the first failure of this run (earlier runs' lines in the appended log do not count)."""
    (tmp_path / "logs").mkdir()
    log = tmp_path / "logs" / "model_log.log"
    log.write_text("2026-01-01 [INFO ] W-9000-captioner_1.0-stdout MODEL_LOG - Failed to load model captioner, "
                   "exception an earlier run\n")
    monkeypatch.setattr(serve, "REPO", tmp_path)
    monkeypatch.setattr(serve, "KEY_FILE", tmp_path / "key_file.json")
    offset = serve.log_size("model_log.log")
    assert serve.load_failure(offset) is None and serve.load_failure(0).endswith("an earlier run")
    with open(log, "a") as out:
        out.write("2026-01-01 [INFO ] W-9000-captioner_1.0-stdout MODEL_LOG - Failed to load model captioner, "
                  "exception TorchServe assigned GPU 0 to this worker, but PyTorch cannot use CUDA\n")
    started = time.monotonic()
    with pytest.raises(serve.Failure, match="could not load captioner: Failed to load model captioner, exception "
                                            "TorchServe assigned GPU 0"):
        serve.wait_ready(server_process, {"management_address": "http://127.0.0.1:9"}, timeout_s=600, log_offset=offset)
    assert time.monotonic() - started < 10


def test_the_archive_is_stale_when_the_code_it_packs_changes_whatever_the_file_times(tmp_path, monkeypatch):
    """Contents decide: an edit, a new file, a deletion or a rename (which keeps the file's time);
    so do an archive replaced behind make's back and another checkpoint."""
    for name, text in (("model/a.py", "a = 1\n"), ("handler/b.py", "b = 2\n"), ("export/c.py", "c = 3\n")):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    weights, archive = tmp_path / "weights.pt", tmp_path / "store" / "captioner.mar"
    weights.write_bytes(b"w")
    archive.parent.mkdir()
    archive.write_bytes(b"mar")
    monkeypatch.setattr(serve, "REPO", tmp_path)
    monkeypatch.setattr(serve, "ARCHIVE", archive)
    monkeypatch.setattr(serve, "STAMP", tmp_path / "stamp.json")

    def record():
        serve.STAMP.write_text(json.dumps({"source": serve._identity(weights, "zip-store"),
                                           "archive_mtime_ns": archive.stat().st_mtime_ns,
                                           "code": serve.code_digests()}))

    record()
    assert serve.stale_reason(weights, "zip-store") is None
    os.utime(tmp_path / "model/a.py", ns=(10**18, 10**18))  # newer, same bytes: nothing to rebuild
    assert serve.stale_reason(weights, "zip-store") is None
    (tmp_path / "model/a.py").write_text("a = 2\n")
    assert serve.stale_reason(weights, "zip-store") == "model/a.py changed since it was built"
    record()
    (tmp_path / "handler/b.py").rename(tmp_path / "handler/renamed.py")
    assert serve.stale_reason(weights, "zip-store") == "handler/b.py was removed since it was built"
    record()
    (tmp_path / "export/new.py").write_text("")
    assert serve.stale_reason(weights, "zip-store") == "export/new.py is new since it was built"
    record()
    archive.write_bytes(b"another mar")  # e.g. a python -m export by hand into model-store/
    os.utime(archive, ns=(archive.stat().st_mtime_ns + 10**9,) * 2)
    assert serve.stale_reason(weights, "zip-store") == "the archive was replaced since make built it"
    record()
    (tmp_path / "other.pt").write_bytes(b"w")
    assert serve.stale_reason(tmp_path / "other.pt", "zip-store").startswith(f"it was built from {weights}")


@pytest.mark.parametrize("address, url", [
    ("http://0.0.0.0:8080", "http://127.0.0.1:8080"),
    ("http://[::]:8081", "http://127.0.0.1:8081"),
    ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
    ("http://10.1.2.3:8082", "http://10.1.2.3:8082"),
])
def test_a_listening_address_becomes_the_url_a_local_client_uses(address, url):
    assert serve.local_url(address) == url


def test_the_worker_gets_the_usable_cores_but_one(monkeypatch):
    """A container's CPU limit counts (`handler/cpu_cores.py`), not only the visible cores."""
    from handler import cpu_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(cpu_cores, "cgroup_cpu_quota", lambda cgroup=None: 4.0)  # e.g. docker run --cpus 4
    env = {}
    assert "4 cores" in serve.thread_settings(env) and env["OMP_NUM_THREADS"] == "3"
    env = {}
    serve.thread_settings(env, cores=1)
    assert env["OMP_NUM_THREADS"] == "1"
    env = {"OMP_NUM_THREADS": "6"}
    assert "from the environment" in serve.thread_settings(env) and env["OMP_NUM_THREADS"] == "6"


@pytest.mark.parametrize("port", ["0", "65536", "8o80", "-1", "80.5"])
def test_a_port_setting_that_is_no_port_number_stops_the_run(port):
    with pytest.raises(serve.Failure, match=f"INFERENCE_PORT='{port}' is not a port number"):
        serve.server_config({"INFERENCE_PORT": port})


def test_port_settings_go_into_a_copy_of_the_shipped_config(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "WORK", tmp_path)
    assert serve.server_config({"INFERENCE_PORT": " "})[0] == serve.SHIPPED_CONFIG  # blank: not given
    path, props = serve.server_config({"INFERENCE_PORT": "65535", "GRPC_INFERENCE_PORT": "1"})
    assert path == tmp_path / "config.properties"
    written = serve.read_properties(path)
    assert written["inference_address"].endswith(":65535") and written["grpc_inference_port"] == "1"
    assert props["inference_address"] == written["inference_address"]
    assert written["management_address"] == serve.read_properties(serve.SHIPPED_CONFIG)["management_address"]


def test_properties_skip_comments_and_token_authorization_is_off_only_when_turned_off(tmp_path):
    path = tmp_path / "config.properties"
    path.write_text("# disable_token_authorization=true\n! enable_model_api=true\n  inference_address = http://h:1 \n")
    assert serve.read_properties(path) == {"inference_address": "http://h:1"}
    assert serve.token_authorization(serve.read_properties(path))
    path.write_text("disable_token_authorization= True \n")
    assert not serve.token_authorization(serve.read_properties(path))


def test_waiting_for_ready_waits_past_a_worker_that_is_still_loading(monkeypatch, server_process):
    """TorchServe lists a loading worker (status UNLOADING in 0.12) before it is READY."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tests.local_http import serving

    answers = ["UNLOADING", "UNLOADING", "READY"]
    asked = []

    class Management(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802 - http.server's naming
            asked.append(self.path)
            status = answers[min(len(asked), len(answers)) - 1]
            body = json.dumps([{"modelName": "captioner", "workers": [{"id": "9000", "status": status}]}]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    monkeypatch.setattr(serve, "load_failure", lambda offset: None)
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Management)) as server:
        props = {"management_address": f"http://127.0.0.1:{server.server_address[1]}",
                 "disable_token_authorization": "true"}
        description = serve.wait_ready(server_process, props, timeout_s=60)
    assert description["workers"] == [{"id": "9000", "status": "READY"}]
    assert asked == ["/models/captioner"] * 3
