"""`make serve`, the README's main command, from a fresh clone of this repository.

The clone is of the committed HEAD (uncommitted changes are not in it: commit first). It
reuses this test run's virtual environment (VENV=, and STAMP= pointing at a fresh file so
make's install rule sees an installed environment) instead of a two-minute reinstall; every
other step goes through the Makefile and scripts/serve.py as a user's `make serve` does.

SLOW (about 1-2 minutes on 2 busy cores): test_make_serve_end_to_end writes a full-size
RANDOM checkpoint (339 MB, ~15 s), builds the archive from it (~15 s), waits for TorchServe
to load and warm up the full-size model (~20 s) and captions one image with 4 tokens. The
offline test fails within seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.serve import described_processes
from tests.e2e.torchserve import free_ports

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)  # the environment running these tests has everything make serve needs
PORT_VARS = ("INFERENCE_PORT", "MANAGEMENT_PORT", "METRICS_PORT", "GRPC_INFERENCE_PORT", "GRPC_MANAGEMENT_PORT")
CURL_LINE = re.compile(r"^\s*(curl -H \"Authorization: Bearer \$KEY\" (http://\S+/predictions/captioner) -T (\S+))\s*$",
                       re.MULTILINE)
KEY_LINE = re.compile(r"^\s*(KEY=\$\(.*key_file\.json.*\))\s*$", re.MULTILINE)
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    # The README's main command: never skipped (what it needs is what `make test` needs).
    if not (REPO / ".git").exists() or not shutil.which("git") or not shutil.which("make"):
        pytest.fail("make serve is tested from a fresh clone: this needs a git checkout, git and make")
    if not (VENV / "bin" / "torchserve").exists():
        pytest.fail(f"the test environment {VENV} has no torchserve (install the project: make venv)")
    path = tmp_path_factory.mktemp("make-serve") / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(path)], check=True, timeout=120)
    return path


@pytest.fixture
def make_env(tmp_path) -> dict[str, str]:
    """The environment of a user's shell, minus what would leak from this test run into make."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WEIGHTS", "CAPTION_WEIGHTS_URL", "TS_CONFIG_FILE", "MAKEFLAGS", "MFLAGS", "MAKELEVEL",
                        *PORT_VARS)}
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return env


def make_command(target: str, tmp_path: Path, *assignments: str) -> list[str]:
    stamp = tmp_path / "installed"  # newer than the clone's pyproject.toml: "the environment is installed"
    stamp.touch()
    return ["make", "--no-print-directory", target, f"VENV={VENV}", f"STAMP={stamp}", *assignments]


def _terminal_sigint() -> None:
    # Like a shell's foreground job: Ctrl-C must reach make and its children even when this
    # test runs as a background job (which starts with SIGINT ignored, inherited across exec).
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def instance_processes(markers: list[str]) -> list[str]:
    return [f"{pid}: {cmdline[:200]}" for pid, cmdline in described_processes(markers, by_cwd=True)]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def test_make_serve_without_network_or_weights_fails_fast(clone, make_env, tmp_path):
    port, *ports = free_ports(1 + len(PORT_VARS))
    make_env["CAPTION_WEIGHTS_URL"] = f"http://127.0.0.1:{port}/weights.pt"  # refused at once, as offline
    make_env.update({var: str(p) for var, p in zip(PORT_VARS, ports)})  # not the default ports another server may hold
    started = time.monotonic()
    result = subprocess.run(make_command("serve", tmp_path), cwd=clone, env=make_env, capture_output=True,
                            text=True, timeout=120)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert elapsed < 60, f"took {elapsed:.0f} s\n{output}"
    assert "no network access" in output, output
    assert "make serve WEIGHTS=/path/to/weights.pt" in output, output
    assert not list((clone / "weights").glob("*.pt*")), "a checkpoint (or part of one) was left behind"
    assert not (clone / "model-store" / "captioner.mar").exists()
    assert not (clone / "key_file.json").exists(), "TorchServe was started without weights"


def test_make_serve_end_to_end(clone, make_env, tmp_path):
    # SLOW: a full-size random checkpoint, the README's smoke test without the real weights:
    #   make weights-random
    #   make serve WEIGHTS=weights/random-init-weights.pt
    subprocess.run(make_command("weights-random", tmp_path), cwd=clone, env=make_env, check=True,
                   capture_output=True, timeout=300)
    checkpoint = "weights/random-init-weights.pt"
    assert (clone / checkpoint).stat().st_size > 300_000_000
    ports = dict(zip(PORT_VARS, free_ports(len(PORT_VARS))))
    make_env.update({k: str(v) for k, v in ports.items()})
    log = tmp_path / "make-serve.out"
    markers = [str(clone), make_env["TMPDIR"]]
    with open(log, "wb") as out:
        make = subprocess.Popen(make_command("serve", tmp_path, f"WEIGHTS={checkpoint}"), cwd=clone, env=make_env,
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=_terminal_sigint)
    try:
        # SLOW: archive build, TorchServe start, full-size model load and warm-up.
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not CURL_LINE.search(text := log.read_text(errors="replace")):
            assert make.poll() is None, f"make serve exited with {make.returncode} before printing the curl line\n{text[-5000:]}"
            assert time.monotonic() < deadline, f"no curl line after {READY_TIMEOUT_S} s\n{text[-5000:]}"
            time.sleep(0.5)
        curl_line, url, image = CURL_LINE.search(text).groups()
        key_line = KEY_LINE.search(text).group(1)
        assert url == f"http://127.0.0.1:{ports['INFERENCE_PORT']}/predictions/captioner", text[-3000:]
        assert f"inference key is in {clone / 'key_file.json'}" in text
        assert (clone / image).is_file(), image
        assert (clone / "model-store" / "captioner.mar").is_file()
        assert "threads 1" in text, "the worker did not take OMP_NUM_THREADS=1"

        # Do what the printed lines say, with a JSON body instead of the raw image: the same
        # image, but a request small enough for the full-size random model on a CPU.
        import base64

        body = tmp_path / "request.json"
        body.write_text(json.dumps({"image": base64.b64encode((clone / image).read_bytes()).decode(),
                                    "max_new_tokens": 4, "num_captions": 1, "styles": ["concise"]}))
        request = curl_line.replace(f"-T {image}", f"-H 'Content-Type: application/json' -T {shlex.quote(str(body))}")
        if shutil.which("curl"):
            script = f"{key_line}\n{request} -sS --max-time 240 -w '\\n%{{http_code}}'"
            done = subprocess.run(["bash", "-c", script], cwd=clone, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done
            response_text, status = done.stdout.rsplit("\n", 1)
        else:  # the same request (curl -T is a PUT) without curl
            import requests

            key = json.loads((clone / "key_file.json").read_text())["inference"]["key"]
            response = requests.put(url, data=body.read_bytes(), timeout=240, headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            response_text, status = response.text, str(response.status_code)
        assert status == "200", response_text
        captions = json.loads(response_text)
        assert list(captions) == ["Concise"] and len(captions["Concise"]) == 1, captions
        assert isinstance(captions["Concise"][0], str) and captions["Concise"][0].strip(), captions

        # A second make serve in the same folder (other ports) would replace this one's
        # key_file.json: it refuses at once, and the first one's keys stay.
        keys_before = (clone / "key_file.json").read_text()
        second_env = {**make_env, **{k: str(v) for k, v in zip(PORT_VARS, free_ports(len(PORT_VARS)))}}
        second = subprocess.Popen(make_command("serve", tmp_path, f"WEIGHTS={checkpoint}"), cwd=clone, env=second_env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = second.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGINT)
            output, _ = second.communicate(timeout=STOP_TIMEOUT_S)
            pytest.fail(f"a second make serve in the same folder did not refuse:\n{output[-3000:]}")
        assert second.returncode != 0 and "already runs from" in output, output
        assert (clone / "key_file.json").read_text() == keys_before
    finally:
        # Ctrl-C: SIGINT to make's process group, as a terminal sends it.
        try:
            os.killpg(make.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            make.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait(timeout=10)
            pytest.fail(f"make serve did not stop within {STOP_TIMEOUT_S} s of Ctrl-C\n{log.read_text()[-3000:]}")

    text = log.read_text(errors="replace")
    assert "serve: Ctrl-C: stopping TorchServe" in text and "serve: stopped" in text, text[-3000:]
    deadline = time.monotonic() + 10
    while (left := instance_processes(markers)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"processes of this instance survived Ctrl-C: {left}"
    busy = {name: port for name, port in ports.items() if not port_is_free(port)}
    assert not busy, f"ports still in use after Ctrl-C: {busy}"
    assert not (clone / "key_file.json").exists(), "the stopped server's keys were left behind"

    # A second build is skipped: the archive is newer than the checkpoint and the code ...
    mar = clone / "model-store" / "captioner.mar"
    built = mar.stat().st_mtime_ns
    again = subprocess.run(make_command("archive", tmp_path, f"WEIGHTS={checkpoint}"), cwd=clone, env=make_env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "is up to date" in again.stdout, again
    assert mar.stat().st_mtime_ns == built
    # ... until the code it packs changes (checked without rebuilding: that takes a while).
    handler_file = clone / "handler" / "captioner_handler.py"
    handler_file.write_text(handler_file.read_text() + "\n# an edit\n")
    check = ("import sys; from pathlib import Path; sys.path.insert(0, 'scripts'); import serve; "
             f"print(serve.stale_reason(Path({str(clone / checkpoint)!r}), 'zip-store'))")
    reason = subprocess.run([str(VENV / "bin" / "python"), "-c", check], cwd=clone, capture_output=True, text=True,
                            timeout=60)
    assert reason.stdout.strip() == "handler/captioner_handler.py changed since it was built", reason
