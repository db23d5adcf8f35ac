"""A real TorchServe instance for tests and benchmarks, isolated from every other one.

    with TorchServe(tmp_path / "ts", model_store=store) as ts:   # starts, waits healthy
        ts.wait_model_ready("captioner")
        r = ts.infer("captioner", data=image_bytes)
        ts.manage("PUT", "/models/captioner", params={"min_worker": 2, "synchronous": "true"})

Isolation: free local ports for every listener (REST and gRPC), and a private working folder
holding the derived config.properties, the logs, ``key_file.json`` (TorchServe writes it in
its working directory) and the JVM temp folder (extracted archives, worker sockets and the
launcher's pid file). The instance runs in its own process group; ``stop()`` (also called on
exit, and by the context manager even when the body fails) terminates that group and then any
stray process of this instance (found by its private folder in the command line), never
anything else.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import requests

from scripts.serve import instance_processes, token_authorization
from scripts.serve import read_properties as property_values

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config.properties"
METRICS_YAML = REPO / "metrics.yaml"
LOG_FILES = ("ts_log.log", "model_log.log")  # launcher.out: only when these are empty (it repeats them)


def free_ports(count: int) -> list[int]:
    """Ports the kernel considers free right now (all held open together, so distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def read_properties(path: Path) -> list[tuple[str | None, str]]:
    """(key, raw line) pairs; key is None for comments and blank lines."""
    lines = []
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or "=" not in stripped:
            lines.append((None, line))
        else:
            lines.append((stripped.split("=", 1)[0].strip(), line))
    return lines


def derive_config(source: Path, overrides: dict[str, str]) -> str:
    """The shipped config with some keys replaced (and missing ones appended)."""
    out, seen = [], set()
    for key, line in read_properties(source):
        if key in overrides:
            if overrides[key] is not None:
                out.append(f"{key}={overrides[key]}")
            seen.add(key)
        else:
            out.append(line)
    out += [f"{k}={v}" for k, v in overrides.items() if k not in seen and v is not None]
    return "\n".join(out) + "\n"


class TorchServeError(RuntimeError):
    pass


class TorchServe:
    def __init__(
        self,
        workdir: str | Path,
        *,
        model_store: str | Path | None = None,
        config: str | Path = SHIPPED_CONFIG,
        overrides: dict[str, str | None] | None = None,
        env: dict[str, str] | None = None,
        start_timeout: float = 180.0,
    ):
        self.workdir = Path(workdir).resolve()
        self.model_store = Path(model_store).resolve() if model_store else self.workdir / "model-store"
        self.source_config = Path(config)
        self.overrides = dict(overrides or {})
        self.extra_env = dict(env or {})
        self.start_timeout = start_timeout
        self.process: subprocess.Popen | None = None
        self.keys: dict[str, str] = {}
        self.ports: dict[str, int] = {}
        self.logs = self.workdir / "logs"
        self.tmp = self.workdir / "tmp"
        if len(str(self.tmp / ".ts.sock.65535")) > 100:  # AF_UNIX paths are limited to 108 bytes
            self.tmp = Path(tempfile.mkdtemp(prefix="ts-"))
        self.config_path = self.workdir / "config.properties"
        self.token_auth = True  # False when the config sets disable_token_authorization=true
        self._atexit = False

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "TorchServe":
        try:
            self.start()
        except BaseException:
            self.stop()  # whatever part of it did start
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, attempts: int = 3) -> "TorchServe":
        last = None
        for _ in range(attempts):
            try:
                self._start_once()
                return self
            except TorchServeError as exc:
                last = exc
                self.stop()
                if "Address already in use" not in str(exc):
                    raise
        raise last

    def _start_once(self) -> None:
        for folder in (self.workdir, self.logs, self.tmp, self.model_store):
            folder.mkdir(parents=True, exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        names = ("inference", "management", "metrics", "grpc_inference", "grpc_management")
        self.ports = dict(zip(names, free_ports(len(names))))
        overrides = {
            "inference_address": f"http://127.0.0.1:{self.ports['inference']}",
            "management_address": f"http://127.0.0.1:{self.ports['management']}",
            "metrics_address": f"http://127.0.0.1:{self.ports['metrics']}",
            "grpc_inference_port": str(self.ports["grpc_inference"]),
            "grpc_management_port": str(self.ports["grpc_management"]),
            "model_store": str(self.model_store),
            "metrics_config": str(METRICS_YAML),
            # This tier checks the CPU worker's numbers (float32 goldens, `dtype float32`): on a
            # GPU node the shipped number_of_gpu=1 would hand the worker GPU 0 (bfloat16, compiled).
            "number_of_gpu": "0",
            **self.overrides,
        }
        self.config_path.write_text(derive_config(self.source_config, overrides))
        self.token_auth = token_authorization(property_values(self.config_path))
        env = {
            **os.environ,
            "TEMP": str(self.tmp),  # -> -Djava.io.tmpdir: extracted archives, worker sockets
            "TMPDIR": str(self.tmp),  # -> the launcher's pid file
            "LOG_LOCATION": str(self.logs),
            "METRICS_LOCATION": str(self.logs),
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
        }
        env.pop("TS_CONFIG_FILE", None)
        launcher = Path(sys.executable).parent / "torchserve"
        command = [str(launcher), "--start", "--foreground", "--ncs", "--ts-config", str(self.config_path),
                   "--model-store", str(self.model_store)]
        out = open(self.logs / "launcher.out", "ab")
        self.process = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        key_file = self.workdir / "key_file.json"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TorchServeError(f"TorchServe exited with {self.process.returncode}\n{self.log_tail()}")
            if "Address already in use" in self._read_log("ts_log.log"):
                raise TorchServeError("Address already in use\n" + self.log_tail())
            if key_file.is_file() and not self.keys:
                try:
                    self.reload_keys()
                except (OSError, ValueError, KeyError):
                    pass  # still being written
            if self.keys or not self.token_auth:
                try:
                    if requests.get(self.url("inference", "/ping"), headers=self.auth("inference"), timeout=2).ok:
                        return
                except requests.RequestException:
                    pass
            time.sleep(0.3)
        raise TorchServeError(f"TorchServe not healthy after {self.start_timeout:.0f} s\n{self.log_tail()}")

    def reload_keys(self) -> dict[str, str]:
        """Read key_file.json (TorchServe rewrites it when a key is regenerated)."""
        data = json.loads((self.workdir / "key_file.json").read_text())
        self.keys = {name: data[name]["key"] for name in ("management", "inference", "API")}
        return self.keys

    def stop(self, timeout: float = 30.0) -> None:
        """Terminate this instance's process group, then any stray process of this instance."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        if self.process is not None:
            # The group signal reaches the launcher, its JVM and the workers; anything of this
            # instance still alive (e.g. a worker the JVM re-parented) is ended here.
            strays = self.stray_processes()
            for pid in strays:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while strays and time.monotonic() < deadline:
                time.sleep(0.2)
                strays = self.stray_processes()
            for pid in strays:
                _signal(pid, signal.SIGKILL)
        self.process = None

    def stray_processes(self) -> list[int]:
        """PIDs whose command line names this instance's private folders (its JVM, its workers), or
        whose working directory lies under them (what a worker starts, e.g. decode processes)."""
        return instance_processes([str(self.workdir), str(self.tmp)], by_cwd=True)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # ------------------------------------------------------------------ HTTP helpers
    def url(self, api: str, path: str) -> str:
        return f"http://127.0.0.1:{self.ports[api]}{path}"

    def auth(self, kind: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[kind]}"} if kind in self.keys else {}

    def infer(self, model: str, *, timeout: float = 120, key: str | None = "inference", **kwargs) -> requests.Response:
        headers = {**(self.auth(key) if key else {}), **kwargs.pop("headers", {})}
        return requests.post(self.url("inference", f"/predictions/{model}"), headers=headers, timeout=timeout, **kwargs)

    def manage(self, method: str, path: str, *, timeout: float = 300, key: str | None = "management",
               **kwargs) -> requests.Response:
        headers = {**(self.auth(key) if key else {}), **kwargs.pop("headers", {})}
        return requests.request(method, self.url("management", path), headers=headers, timeout=timeout, **kwargs)

    def describe(self, model: str) -> list[dict]:
        response = self.manage("GET", f"/models/{model}")
        response.raise_for_status()
        return response.json()

    def wait_model_ready(self, model: str, workers: int = 1, timeout: float = 300) -> list[dict]:
        deadline = time.monotonic() + timeout
        description = None
        while time.monotonic() < deadline:
            response = self.manage("GET", f"/models/{model}")
            if response.ok:
                description = response.json()
                ready = [w for w in description[0].get("workers", []) if w.get("status") == "READY"]
                if len(ready) >= workers:
                    return description
            if not self.running:
                break
            time.sleep(0.5)
        raise TorchServeError(f"model {model} not ready ({description})\n{self.log_tail()}")

    def metrics(self, names: list[str] | None = None) -> str:
        params = [("name[]", n) for n in names] if names else None
        response = requests.get(self.url("metrics", "/metrics"), params=params, timeout=10)
        response.raise_for_status()
        return response.text

    def metric_values(self, name: str, model: str | None = None) -> list[float]:
        """Values of one Prometheus metric (one per label set), optionally for one model."""
        values = []
        for line in self.metrics([name]).splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                if model is not None and f'ModelName="{model}"' not in line and f'model_name="{model}"' not in line:
                    continue
                values.append(float(line.rsplit(" ", 1)[1]))
        return values

    # ------------------------------------------------------------------ diagnostics
    def _read_log(self, name: str) -> str:
        try:
            return (self.logs / name).read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        names = LOG_FILES if any(self._read_log(n) for n in LOG_FILES) else ("launcher.out",)
        for name in names:
            text = self._read_log(name)
            if text:
                parts.append(f"----- {name} (last {lines} lines) -----\n" + "\n".join(text.splitlines()[-lines:]))
        return "\n".join(parts) or f"(no logs in {self.logs})"

    def grep_log(self, pattern: str, name: str = "model_log.log") -> list[str]:
        regex = re.compile(pattern)
        return [line for line in self._read_log(name).splitlines() if regex.search(line)]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
