"""scripts/serve.py's own logic, without starting TorchServe: how long it waits for READY."""

import subprocess
import sys
import time

import pytest

from scripts import serve

pytestmark = pytest.mark.unit


def test_waiting_for_ready_gives_up_with_the_worker_log(tmp_path, monkeypatch):
    monkeypatch.setattr(serve, "KEY_FILE", tmp_path / "key_file.json")  # never written: the server is stuck
    monkeypatch.setattr(serve, "log_tail", lambda name: f"tail of {name}")
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        started = time.monotonic()
        with pytest.raises(serve.Failure, match=r"not ready after 1 s (?s:.*)tail of model_log.log"):
            serve.wait_ready(process, {"management_address": "http://127.0.0.1:9"}, timeout_s=1)
        assert time.monotonic() - started < 10
    finally:
        process.kill()
        process.wait()


def test_ready_timeout_is_the_archive_startup_timeout_plus_a_margin():
    import yaml

    startup = yaml.safe_load(serve.MODEL_YAML.read_text())["startupTimeout"]
    assert serve.ready_timeout_s() == startup + serve.READY_MARGIN_S
