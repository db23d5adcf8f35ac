#!/usr/bin/env python3
"""`make serve` and `make archive`: checkpoint -> model-store/captioner.mar -> TorchServe.

    python scripts/serve.py serve   [--weights PATH]    # make serve [WEIGHTS=PATH]
    python scripts/serve.py archive [--weights PATH]    # make archive [WEIGHTS=PATH]

1. The checkpoint: --weights (make's WEIGHTS=), else weights/weights.pt, else
   `python -m weights fetch` downloads it there (offline that fails at once: pass WEIGHTS=).
2. The archive: model-store/captioner.mar, built by the export package (which loads the
   checkpoint strictly: every key and shape). It is rebuilt only when missing, older than the
   checkpoint or than the code it packs (model/, handler/, export/), or built from another
   checkpoint (build/serve/captioner.json records which).
3. `serve`: TorchServe in the foreground, from the repository root, with the shipped
   config.properties (key_file.json and logs/ are written there). Once the model is ready,
   the curl line to try it is printed. Ctrl-C (or SIGTERM/SIGHUP) stops TorchServe's whole
   process group, workers included, and anything else of this instance.

Environment:
  INFERENCE_PORT, MANAGEMENT_PORT, METRICS_PORT, GRPC_INFERENCE_PORT, GRPC_MANAGEMENT_PORT
      other ports (the bind addresses stay the shipped ones): TorchServe then runs from a
      derived copy of config.properties in build/serve/ (docker/render_config.py writes it).
  OMP_NUM_THREADS
      CPU threads of the worker; default: all cores but one (the TorchServe frontend, the
      image decoding and the OS need one; on 2 cores two busy OpenMP threads make every
      request slower). The handler's `threads` in model-config.yaml, if set, wins.
  ARCHIVE_FORMAT  zip-store (default: the weights are bfloat16 and barely compress, and an
      uncompressed archive is built and extracted faster) or default (deflate).
  TMPDIR  where the private temporary folder of the instance is made (JVM temp files,
      extracted archive, worker sockets, the launcher's pid file).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python scripts/serve.py` puts scripts/, not the repository, on the path
    sys.path.insert(0, str(REPO))

MODEL = "captioner"
STORE = REPO / "model-store"
ARCHIVE = STORE / f"{MODEL}.mar"
WORK = REPO / "build" / "serve"
STAMP = WORK / f"{MODEL}.json"
# torch.compile's generated code (GPU workers compile at start: 121 s cold on an H100, seconds
# with this cache). Its default lives in the temporary folder, which is this run's own and goes.
COMPILE_CACHE = REPO / "build" / "compile-cache"
SHIPPED_CONFIG = REPO / "config.properties"
DEFAULT_WEIGHTS = REPO / "weights" / "weights.pt"
KEY_FILE = REPO / "key_file.json"
SAMPLE_IMAGE = REPO / "ui" / "samples" / "rocket.jpg"
CODE_DIRS = ("model", "handler", "export")
PORT_VARS = {  # environment variable -> (property, "url" for http://host:port values, "port" for plain ports)
    "INFERENCE_PORT": ("inference_address", "url"),
    "MANAGEMENT_PORT": ("management_address", "url"),
    "METRICS_PORT": ("metrics_address", "url"),
    "GRPC_INFERENCE_PORT": ("grpc_inference_port", "port"),
    "GRPC_MANAGEMENT_PORT": ("grpc_management_port", "port"),
}
STOP_TIMEOUT_S = 60
READY_MARGIN_S = 60  # past the archive's startupTimeout, make serve gives up waiting for READY
MODEL_YAML = REPO / "handler" / "model-config.yaml"
FRONTEND_CLASS = "org.pytorch.serve.ModelServer"  # in the JVM's command line
LOAD_FAILED = "Failed to load model"  # TorchServe's worker, when the handler's initialize raised


class Failure(Exception):
    """Stop with this message (and exit status)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class Stop(Exception):
    """SIGTERM or SIGHUP: stop like Ctrl-C."""


def say(message: str = "") -> None:
    print(f"serve: {message}" if message else "", flush=True)


# ---------------------------------------------------------------------------------- weights
def resolve_weights(given: str | None) -> Path:
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise Failure(f"WEIGHTS={given}: no such file")
        return path.resolve()
    if DEFAULT_WEIGHTS.is_file():
        return DEFAULT_WEIGHTS
    say(f"no WEIGHTS= given and no {DEFAULT_WEIGHTS.relative_to(REPO)}: downloading the checkpoint "
        "(python -m weights fetch) ...")
    code = subprocess.call([sys.executable, "-m", "weights", "fetch", "--output", str(DEFAULT_WEIGHTS)], cwd=REPO)
    if code != 0:
        why = "no network access" if code == 3 else "the download failed"
        raise Failure(f"{why}: no checkpoint to serve. Pass one you have: make serve WEIGHTS=/path/to/weights.pt "
                      "(for a smoke test: make weights-random, then make serve "
                      "WEIGHTS=weights/random-init-weights.pt)", code)
    return DEFAULT_WEIGHTS


# ---------------------------------------------------------------------------------- archive
def _identity(weights: Path, archive_format: str) -> dict:
    stat = weights.stat()
    return {"weights": str(weights), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": archive_format}


def _code_files():
    for name in CODE_DIRS:
        for path in (REPO / name).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                yield path


def code_digests() -> dict[str, str]:
    """sha256 of each file of the code the archive packs, by path: contents decide, not file
    times (a rename, a deletion or a copy that keeps times would not look newer)."""
    return {str(path.relative_to(REPO)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(_code_files())}


def stale_reason(weights: Path, archive_format: str) -> str | None:
    """Why model-store/captioner.mar must be (re)built, or None when it is up to date."""
    if not ARCHIVE.is_file():
        return f"no {ARCHIVE.relative_to(REPO)} yet"
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return "no record of the checkpoint it was built from"
    if stamp.get("source") != _identity(weights, archive_format):
        return f"it was built from {stamp.get('source', {}).get('weights', 'another checkpoint')} " \
               f"({stamp.get('source', {}).get('format', '?')}), not this one"
    if stamp.get("archive_mtime_ns") != ARCHIVE.stat().st_mtime_ns:
        return "the archive was replaced since make built it"
    packed, now = stamp.get("code", {}), code_digests()
    changed = sorted(name for name in packed.keys() | now.keys() if packed.get(name) != now.get(name))
    if changed:
        name = changed[0]
        what = "is new" if name not in packed else "was removed" if name not in now else "changed"
        return f"{name} {what} since it was built"
    return None


def ensure_archive(weights: Path, archive_format: str) -> Path:
    reason = stale_reason(weights, archive_format)
    if reason is None:
        say(f"{ARCHIVE.relative_to(REPO)} is up to date (built from {weights})")
        return ARCHIVE
    from export import ExportError, build_archive

    say(f"building {ARCHIVE.relative_to(REPO)}: {reason}")
    code = code_digests()  # before the build: an edit made during it is seen as a change next time
    try:
        result = build_archive(weights, None, model_name=MODEL, output=STORE, archive_format=archive_format,
                               progress=say)
    except ExportError as exc:
        raise Failure(f"the archive cannot be built: {exc}", 2) from exc
    WORK.mkdir(parents=True, exist_ok=True)
    record = {"source": _identity(weights, archive_format), "archive_mtime_ns": result.path.stat().st_mtime_ns,
              "code": code}
    STAMP.write_text(json.dumps(record, indent=1) + "\n")
    say(f"built {result.path.relative_to(REPO)} ({result.size_bytes / 1e6:.0f} MB, sha256 {result.sha256}) "
        f"in {result.seconds:.0f} s")
    return result.path


# ---------------------------------------------------------------------------------- config
def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#!" and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def token_authorization(props: dict[str, str]) -> bool:
    """Whether TorchServe asks for keys (on unless the config turns it off)."""
    return props.get("disable_token_authorization", "false").strip().lower() != "true"


def server_config(env: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """The config TorchServe runs with: the shipped one, or a copy with other ports."""
    props = read_properties(SHIPPED_CONFIG)
    overrides = {}
    for var, (key, kind) in PORT_VARS.items():
        port = env.get(var, "").strip()
        if not port:
            continue
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise Failure(f"{var}={port!r} is not a port number")
        if kind == "url":
            parts = urlsplit(props[key])
            overrides[key] = f"{parts.scheme}://{parts.hostname}:{port}"
        else:
            overrides[key] = port
    if not overrides:
        return SHIPPED_CONFIG, props
    spec = importlib.util.spec_from_file_location("render_config", REPO / "docker" / "render_config.py")
    render_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render_config)
    text = render_config.render(SHIPPED_CONFIG.read_text(), overrides, "config.properties")
    text = text.replace("docker/entrypoint.sh", "scripts/serve.py (make serve)").replace(
        "Container overrides", "Port overrides")
    WORK.mkdir(parents=True, exist_ok=True)
    derived = WORK / "config.properties"
    derived.write_text(text)
    return derived, {**props, **overrides}


def local_url(address: str) -> str:
    """http://0.0.0.0:8080 -> http://127.0.0.1:8080 (where a client on this host connects)."""
    parts = urlsplit(address)
    host = parts.hostname or "127.0.0.1"
    if host in ("0.0.0.0", "::", "[::]"):
        host = "127.0.0.1"
    return f"{parts.scheme}://{host}:{parts.port}"


def check_ports(props: dict[str, str]) -> None:
    listeners = [(var, props[key]) for var, (key, kind) in PORT_VARS.items() if kind == "url"]
    for var, address in listeners:
        parts = urlsplit(address)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((parts.hostname or "0.0.0.0", parts.port))
            except OSError as exc:
                raise Failure(f"cannot listen on {address} ({exc.strerror}): another TorchServe running? "
                              f"Stop it, or pick another port: make serve {var}=... (from another clone "
                              "when the other one is a make serve of this folder)") from exc


def working_folder(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:  # ended meanwhile, or not ours to inspect
        return None


def is_java(pid: int) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/exe")).name.startswith("java")
    except OSError:
        return False


def check_no_other_instance_here() -> None:
    """TorchServe writes key_file.json and logs/ in its working folder: a second make serve in
    the same folder would replace the first one's keys (and delete them when it stops)."""
    others = [pid for pid, cmdline in described_processes([str(REPO)], by_cwd=True)
              if FRONTEND_CLASS in cmdline and working_folder(pid) == str(REPO) and is_java(pid)]
    if others:
        raise Failure(f"TorchServe (pid {others[0]}) already runs from {REPO}: its key_file.json and logs/ are "
                      "here. Stop it first, or serve from another clone.")


def thread_settings(env: dict[str, str], cores: int | None = None) -> str:
    """Give the worker all usable cores but one (a container's CPU limit counts: `cpu_cores.py`)
    unless OMP_NUM_THREADS says otherwise."""
    from handler.cpu_cores import usable_cores

    cores = cores or usable_cores()
    if not env.get("OMP_NUM_THREADS"):
        env["OMP_NUM_THREADS"] = str(max(1, cores - 1))
        return f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} ({cores} cores, one left to the frontend; set it to change)"
    return f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} (from the environment; {cores} cores)"


# ---------------------------------------------------------------------------------- server
def compile_cache_env(env: dict[str, str]) -> dict[str, str]:
    """TORCHINDUCTOR_CACHE_DIR for the workers: the user's own, else `COMPILE_CACHE`, kept
    between runs (the workers inherit TorchServe's environment)."""
    return {"TORCHINDUCTOR_CACHE_DIR": env.get("TORCHINDUCTOR_CACHE_DIR") or str(COMPILE_CACHE)}


def private_tmp() -> Path:
    """A temporary folder of this instance only; worker sockets there must fit AF_UNIX's 108 bytes."""
    base = Path(tempfile.gettempdir())
    if len(str(base)) > 60:
        base = Path("/tmp")
    return Path(tempfile.mkdtemp(prefix="caption-serve-", dir=base))


def read_keys() -> dict[str, str] | None:
    try:
        data = json.loads(KEY_FILE.read_text())
        return {name: data[name]["key"] for name in ("inference", "management")}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet (or being written)


def ready_timeout_s() -> float:
    """The archive's startupTimeout (loading, compiling, warming up) plus a margin."""
    import yaml

    return float(yaml.safe_load(MODEL_YAML.read_text()).get("startupTimeout", 120)) + READY_MARGIN_S


def log_tail(name: str, lines: int = 15) -> str:
    try:
        return "\n".join((REPO / "logs" / name).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no logs/{name})"


def log_size(name: str) -> int:
    """Bytes of logs/NAME now (TorchServe appends to its logs across runs): where this run's lines start."""
    try:
        return (REPO / "logs" / name).stat().st_size
    except OSError:
        return 0


def load_failure(log_offset: int) -> str | None:
    """The worker's "Failed to load model" line, if this run's part of logs/model_log.log has one
    (TorchServe then retries the worker with growing pauses until startupTimeout)."""
    try:
        with open(REPO / "logs" / "model_log.log", "rb") as log:
            log.seek(log_offset)
            text = log.read().decode(errors="replace")
    except OSError:
        return None
    return next((line.split("MODEL_LOG - ", 1)[-1] for line in text.splitlines()
                 if f"{LOAD_FAILED} {MODEL}" in line), None)


def wait_ready(process: subprocess.Popen, props: dict[str, str], timeout_s: float, log_offset: int = 0) -> dict:
    """Until the model has a READY worker; a worker that fails to load ends the wait at once,
    with the worker log (its error would repeat at every retry for minutes)."""
    import requests

    management = local_url(props["management_address"])
    token_auth = token_authorization(props)
    started = time.monotonic()
    next_note = started + 30
    keys, status = None, "TorchServe is starting"
    while process.poll() is None:
        keys = keys or read_keys()
        if keys or not token_auth:
            headers = {"Authorization": f"Bearer {keys['management']}"} if keys else {}
            try:
                response = requests.get(f"{management}/models/{MODEL}", timeout=5, headers=headers)
                if response.ok:
                    workers = response.json()[0].get("workers", [])
                    if any(w.get("status") == "READY" for w in workers):
                        return response.json()[0]
                    # TorchServe 0.12 describes a worker that is still loading as "UNLOADING".
                    status = "the worker is loading the model" if workers else "no worker yet"
            except (requests.RequestException, ValueError, IndexError):
                pass
        failure = load_failure(log_offset)
        if failure:
            raise Failure(f"the worker could not load {MODEL}: {failure}\nThe end of logs/model_log.log:\n"
                          f"{log_tail('model_log.log', 40)}")
        now = time.monotonic()
        if now - started > timeout_s:
            raise Failure(f"{MODEL} was not ready after {timeout_s:.0f} s ({status}); the end of "
                          f"logs/model_log.log:\n{log_tail('model_log.log')}")
        if now >= next_note:
            say(f"still waiting for {MODEL} after {now - started:.0f} s ({status}; the worker log is "
                "logs/model_log.log)")
            next_note = now + 30
        time.sleep(0.5)
    raise Failure(f"TorchServe exited with status {process.returncode} before {MODEL} was ready; "
                  "see the output above and logs/ts_log.log, logs/model_log.log")


def handler_line() -> str:
    """device, dtype and threads from the worker's 'caption handler ready: ...' log line, if found."""
    try:
        lines = (REPO / "logs" / "model_log.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if f"caption handler ready: model={MODEL} " in line:
            found = dict(re.findall(r"\b(device|dtype|threads)=(\S+)", line))
            return ", ".join(f"{key} {value}" for key, value in found.items())
    return ""


def banner(props: dict[str, str]) -> str:
    inference = local_url(props["inference_address"])
    here = Path.cwd().resolve()
    sample = SAMPLE_IMAGE.relative_to(REPO) if here == REPO else SAMPLE_IMAGE
    key_file = KEY_FILE.relative_to(REPO) if here == REPO else KEY_FILE
    detail = handler_line()
    ui = "make ui" if inference == "http://127.0.0.1:8080" else f"CAPTION_API_URL={inference} make ui"
    rule = "=" * 100
    return f"""
{rule}
{MODEL} is ready{f" ({detail})" if detail else ""}. Try it (the inference key is in {KEY_FILE},
"inference" -> "key"; TorchServe makes new keys at every start):

  KEY=$(python3 -c 'import json; print(json.load(open("{key_file}"))["inference"]["key"])')
  curl -H "Authorization: Bearer $KEY" {inference}/predictions/{MODEL} -T {sample}

Options go in a JSON body, sent with -H 'Content-Type: application/json':
  {{"image": "<base64>", "styles": ["concise"], "num_captions": 1, "max_new_tokens": 32}}
Web page: {ui} (in another terminal). Metrics: {local_url(props["metrics_address"])}/metrics. Logs: logs/.
Stop: Ctrl-C.
{rule}
"""


def instance_processes(markers: list[str], by_cwd: bool = False) -> list[int]:
    """Processes whose command line names this instance's private folder (its JVM, its workers);
    with `by_cwd`, also those whose working directory lies under one of the markers."""
    return [pid for pid, _ in described_processes(markers, by_cwd)]


def described_processes(markers: list[str], by_cwd: bool = False) -> list[tuple[int, str]]:
    """(pid, command line) of the processes `instance_processes` finds."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd") if by_cwd else ""
        except OSError:
            continue
        if any(marker in cmdline or (by_cwd and cwd.startswith(marker)) for marker in markers):
            found.append((int(entry.name), cmdline))
    return found


def _kill(pid: int, sig: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(process: subprocess.Popen, tmp: Path) -> None:
    """SIGTERM to TorchServe's process group (the JVM stops its workers), SIGKILL after a while,
    then anything else of this instance (found by its private folder)."""
    if process.poll() is None:
        _kill(process.pid, signal.SIGTERM, group=True)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            say("TorchServe did not stop: killing it")
            _kill(process.pid, signal.SIGKILL, group=True)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                say(f"TorchServe (pid {process.pid}) is still there after SIGKILL")
    _kill(process.pid, signal.SIGTERM, group=True)  # the JVM's workers, should any outlive it
    deadline = time.monotonic() + 10
    strays = instance_processes([str(tmp)])
    for pid in strays:
        _kill(pid, signal.SIGTERM)
    while strays and time.monotonic() < deadline:
        time.sleep(0.2)
        strays = instance_processes([str(tmp)])
    for pid in strays:
        _kill(pid, signal.SIGKILL)


def serve(weights_arg: str | None, archive_format: str) -> int:
    env = dict(os.environ)
    check_no_other_instance_here()  # before server_config rewrites build/serve/, which it may run from
    config, props = server_config(env)
    java = Path(env["JAVA_HOME"], "bin", "java") if env.get("JAVA_HOME") else shutil.which("java")
    if not java or not Path(java).exists():
        raise Failure("Java (17 or newer) is needed by TorchServe: install it (apt-get install openjdk-17-jre-headless) "
                      "or set JAVA_HOME")
    check_ports(props)  # before the minutes a download or an archive build may take
    weights = resolve_weights(weights_arg)
    ensure_archive(weights, archive_format)
    say(thread_settings(env))
    tmp = private_tmp()
    env.update(TEMP=str(tmp), TMPDIR=str(tmp))  # -> java.io.tmpdir (archive, worker sockets), launcher pid file
    env.update(compile_cache_env(env))
    env.pop("TS_CONFIG_FILE", None)  # would replace --ts-config
    KEY_FILE.unlink(missing_ok=True)  # the keys of a previous run: wait for this run's
    log_offset = log_size("model_log.log")  # this run's worker lines come after
    command = [str(Path(sys.executable).parent / "torchserve"), "--start", "--foreground", "--ncs",
               "--ts-config", str(config), "--model-store", str(STORE), "--models", f"{MODEL}={ARCHIVE.name}"]
    say(f"starting TorchServe: {' '.join(command)}")
    say(f"config: {config.relative_to(REPO)}; working folder: {REPO} (key_file.json, logs/)")

    def on_signal(signum, _frame):
        raise Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    code, process = 130, None
    try:
        # Its own session: the terminal's Ctrl-C reaches this script only, which then stops the
        # whole group in order (the launcher, the JVM and its workers) instead of each dying on
        # its own. Started inside the try: a Ctrl-C right after the start still stops it.
        process = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        wait_ready(process, props, ready_timeout_s(), log_offset)
        print(banner(props), flush=True)
        code = process.wait()
        say(f"TorchServe exited with status {code}")
        code = code if code > 0 else 1  # it is not meant to exit on its own
    except (KeyboardInterrupt, Stop) as exc:
        say(f"{'Ctrl-C' if isinstance(exc, KeyboardInterrupt) else exc}: stopping TorchServe ...")
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second Ctrl-C must not cut
            signal.signal(signum, signal.SIG_IGN)                       # the clean-up short (60 s at most)
        if process is not None:
            stop(process, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        KEY_FILE.unlink(missing_ok=True)  # its keys died with the server
        say("stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["serve", "archive"])
    parser.add_argument("--weights", default="", help="the checkpoint (default: weights/weights.pt, fetched if missing)")
    args = parser.parse_args(argv)
    archive_format = os.environ.get("ARCHIVE_FORMAT") or "zip-store"
    if archive_format not in ("zip-store", "default"):
        print(f"serve: ARCHIVE_FORMAT={archive_format!r}: use zip-store or default", file=sys.stderr)
        return 2
    try:
        if args.command == "archive":
            ensure_archive(resolve_weights(args.weights), archive_format)
            return 0
        return serve(args.weights, archive_format)
    except Failure as exc:
        print(f"serve: error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except (KeyboardInterrupt, Stop):
        print("serve: interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
