"""The server side of `python -m bench http`: one registration of the archive per batching
setting (`Mode`, through the management API), what TorchServe applied, the handler's
Prometheus metrics, and a private TorchServe for `--start`."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from handler.cpu_cores import usable_cores

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Mode:
    """One registration of the archive (or the model as registered, when batch_size is None)."""

    key: str
    model: str
    batch_size: int | None
    max_batch_delay: int | None
    registered_here: bool = False
    applied: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.batch_size is None:
            return f"{self.model} (as registered)"
        if self.batch_size == 1:
            return "no batching (batch_size 1)"
        return f"batching (batch_size {self.batch_size}, max_batch_delay {self.max_batch_delay} ms)"


class Management:
    def __init__(self, url: str, key: str | None, timeout: float = 900.0):
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout

    def call(self, method: str, path: str, **params) -> requests.Response:
        return requests.request(method, self.url + path, params=params or None, headers=self.headers,
                                timeout=self.timeout)

    def describe(self, model: str) -> dict:
        response = self.call("GET", f"/models/{model}")
        if response.status_code != 200:
            raise RuntimeError(f"describe {model}: HTTP {response.status_code} {response.text.strip()}")
        return response.json()[0]

    def worker_facts(self, model: str) -> dict:
        """How the worker runs the model: part of the handler's answer to a describe request
        with ``customized=true`` (device, dtype, packed or int8 decoder weights, what is compiled). An
        archive whose handler predates that answer is recorded as such, not an error."""
        response = self.call("GET", f"/models/{model}", customized="true")
        facts = response.json()[0].get("customizedMetadata") if response.status_code == 200 else None
        if not isinstance(facts, dict) or "dtype" not in facts:
            return {"unavailable": f"HTTP {response.status_code} {response.text.strip()[:200]}"}
        return {key: facts.get(key) for key in WORKER_FACTS}

    def register(self, mode: Mode, archive: str, workers: int = 1) -> dict:
        params = {"url": archive, "model_name": mode.model, "batch_size": mode.batch_size,
                  "initial_workers": workers, "synchronous": "true"}
        if mode.max_batch_delay is not None:
            params["max_batch_delay"] = mode.max_batch_delay
        response = self.call("POST", "/models", **params)
        if response.status_code != 200:
            raise RuntimeError(f"registering {mode.model}: HTTP {response.status_code} {response.text.strip()}")
        mode.registered_here = True
        return self.describe(mode.model)

    def unregister(self, model: str) -> None:
        self.call("DELETE", f"/models/{model}")


WORKER_FACTS = ("device", "dtype", "packed_decoder", "int8_decoder", "compiled")


def applied_settings(description: dict) -> dict:
    keys = ("batchSize", "maxBatchDelay", "responseTimeout", "minWorkers", "maxWorkers", "modelUrl")
    settings = {k: description.get(k) for k in keys}
    settings["workers_ready"] = sum(w.get("status") == "READY" for w in description.get("workers", []))
    return settings


def check_applied(mode: Mode, applied: dict) -> None:
    """The API's batch_size / max_batch_delay must be what TorchServe uses."""
    if applied["batchSize"] != mode.batch_size:
        raise RuntimeError(f"{mode.model}: asked batch_size {mode.batch_size}, describe says {applied['batchSize']}")
    if mode.max_batch_delay is not None and applied["maxBatchDelay"] != mode.max_batch_delay:
        raise RuntimeError(f"{mode.model}: asked max_batch_delay {mode.max_batch_delay}, "
                           f"describe says {applied['maxBatchDelay']}")


def read_metrics(metrics_url: str | None, model: str, names: tuple[str, ...]) -> dict[str, float] | None:
    """Values of some Prometheus metrics of one model (summed over label sets), None when the
    endpoint cannot be read."""
    if not metrics_url:
        return None
    try:
        response = requests.get(f"{metrics_url.rstrip('/')}/metrics", params=[("name[]", n) for n in names],
                                timeout=5)
        response.raise_for_status()
    except requests.RequestException:
        return None
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        for name in names:
            if line.startswith(name + "{") and f'ModelName="{model}"' in line:
                values[name] = values.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return values


def metric_totals(metrics_url: str | None, model: str) -> tuple[float, float] | None:
    """(CaptionRequestsTotal, CaptionBatchesTotal) of one model, None when unavailable."""
    values = read_metrics(metrics_url, model, ("CaptionRequestsTotal", "CaptionBatchesTotal"))
    if values is None:
        return None
    return values.get("CaptionRequestsTotal", 0.0), values.get("CaptionBatchesTotal", 0.0)


LAST_BATCH_GAUGES = ("CaptionBatchSize", "CaptionDecodeImageMs", "CaptionEncodeMs", "CaptionPrefillMs",
                     "CaptionGenerateMs", "CaptionHandlerMs")


def last_batch(metrics_url: str | None, model: str) -> dict | None:
    """The handler's gauges: stage times of the model's most recent batch (where its time goes)."""
    values = read_metrics(metrics_url, model, LAST_BATCH_GAUGES)
    return {name.removeprefix("Caption"): value for name, value in values.items()} if values else None


def mean_batch_size(metrics_url: str | None, model: str, before, expected_requests: int,
                    wait_s: float = 5.0) -> float | None:
    """Requests per batch the server formed since ``before`` (metrics travel through the
    worker's log, so wait briefly until all requests are counted)."""
    if before is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        after = metric_totals(metrics_url, model)
        if after is None:
            return None
        requests_delta, batches_delta = after[0] - before[0], after[1] - before[1]
        if requests_delta >= expected_requests or time.monotonic() >= deadline:
            return requests_delta / batches_delta if batches_delta > 0 else None
        time.sleep(0.2)


def read_keys(path: str | Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def bench_model_config(threads: int, decode_threads: int | None, out_dir: Path,
                       cpu_quantize: str | None = None, cpu_compile_decode: bool = False) -> Path:
    """handler/model-config.yaml with the handler's threads pinned (for --start)."""
    import yaml

    raw = yaml.safe_load((REPO / "handler" / "model-config.yaml").read_text())
    raw.setdefault("handler", {})["threads"] = threads
    if decode_threads:
        raw["handler"]["decode_threads"] = decode_threads
    if cpu_quantize:
        raw["handler"]["cpu_quantize"] = cpu_quantize
    if cpu_compile_decode:
        raw["handler"]["cpu_compile_decode"] = True
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "model-config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start_server(args, results: dict):
    """Build the archive and start a private TorchServe with nothing loaded (the modes register it)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from export import build_archive
    from tests.e2e.torchserve import TorchServe

    if not args.weights:
        raise SystemExit("--start needs --weights")
    workdir = Path(tempfile.mkdtemp(prefix="http-bench-", dir=args.workdir))
    store = workdir / "model-store"
    threads = args.threads or usable_cores()  # a container's CPU limit counts
    model_config = bench_model_config(threads, args.decode_threads, workdir / "model-config", args.cpu_quantize,
                                      args.cpu_compile_decode)
    print(f"building {args.model}.mar from {args.weights} (handler threads {threads}) in {workdir} ...", flush=True)
    result = build_archive(args.weights, args.config, model_name=args.model, output=store,
                           model_config=model_config, archive_format="zip-store", progress=lambda _line: None)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    server = TorchServe(workdir / "ts", model_store=store, overrides={"load_models": None}, env=env)
    print("starting TorchServe ...", flush=True)
    server.start()
    results["server"].update(started_here=True, weights=str(args.weights), config=args.config,
                             archive=result.path.name, archive_mb=round(result.size_bytes / 1e6, 1),
                             threads=threads, omp_num_threads=threads, decode_threads=args.decode_threads,
                             cpu_quantize=args.cpu_quantize, cpu_compile_decode=args.cpu_compile_decode,
                             workdir=str(workdir))
    return server, workdir, result.path.name
