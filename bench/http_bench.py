"""HTTP load benchmark of the caption service: ``python -m bench http``.

Drives a running TorchServe (``--url``/``--management-url`` with keys from ``--key-file`` or
``--key``/``--management-key``), or one it starts itself (``--start --weights W``: builds the
archive with ``export.build_archive`` and starts TorchServe through ``tests/e2e/torchserve.py``
in a private folder, with the handler's intra-op threads pinned by ``--threads``).

Batching on vs off: the same archive is registered under extra names through the management
API, once per ``--max-batch-delay`` value with ``batch_size=<--batch-size>`` and once with
``batch_size=1`` (one request at a time). ``describe`` confirms what TorchServe applied (the
API's batch_size / max_batch_delay override the archive's model-config.yaml; its
responseTimeout wins over the API's). The extra registrations are removed at the end.
``--no-register`` instead measures ``--model`` as it is registered.

Load: every request is the same JSON document (a small generated JPEG, base64, plus fixed
options), so every request is one image and costs the same. Closed loop (``--concurrency``):
N clients each send a request as soon as their previous one is answered; a level ends after a
fixed number of requests (``--requests``, or ``--rounds`` per client) or ``--max-seconds``.
Open loop (``--rate``): Poisson arrivals at a fixed rate, latency counted from the scheduled
arrival, so a server that falls behind shows it. Levels run interleaved across modes and
repeats (repeat, level, mode), so the noise of a shared host hits every mode alike.

Per level: images/s (successful requests / wall time from the first send to the last answer),
latency p50/p95/p99/max, errors by kind, the load average, and the mean batch size the server
formed (CaptionRequestsTotal / CaptionBatchesTotal deltas from the metrics endpoint, when
reachable). The ratio printed at the end: best images/s of each batched mode (over its
concurrency levels) / images/s of ``batch_size=1`` at concurrency 1 (one request at a time).
Writes ``<out>/<name>.json`` and ``<out>/<name>.png``.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests

from handler.cpu_cores import usable_cores

REPO = Path(__file__).resolve().parents[1]
STYLES = ("concise", "narrative", "descriptive")


# ---------------------------------------------------------------------------- the request
def synthetic_jpeg(width: int = 320, height: int = 240, quality: int = 85) -> bytes:
    """A small photo-like JPEG: gradients in two channels, noise in the third. Every request of
    a run sends the same bytes; the cost of a request does not depend on the picture."""
    from PIL import Image

    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 48)
    other = Image.linear_gradient("L").rotate(90).resize((width, height))
    buffer = io.BytesIO()
    Image.merge("RGB", (gradient, noise, other)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def request_options(max_new_tokens: int | None = None, num_captions: int | None = None,
                    styles: list[str] | None = None, extra: dict | None = None) -> dict:
    """The caption options sent with every request (absent = the service's default)."""
    options = {}
    if styles:
        options["styles"] = list(styles)
    if num_captions is not None:
        options["num_captions"] = num_captions
    if max_new_tokens is not None:
        options["max_new_tokens"] = max_new_tokens
    options.update(extra or {})
    return options


def request_body(image: bytes, options: dict) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode("ascii"), **options}).encode()


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` with a JSON value when it parses as one (``seed=3``, ``temperature=0``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# ---------------------------------------------------------------------------- statistics
def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's
    default method); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0..100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass
class Sample:
    """One request: when it was due or sent, when it was answered, what came back."""

    start: float
    end: float
    status: int  # HTTP status; 0 when no response (connection error, timeout)
    error: str | None = None  # None for a good answer

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def ok(self) -> bool:
        return self.error is None


def summarize(samples: list[Sample], wall_s: float) -> dict:
    """Throughput and latency of one level. images/s counts successful requests only."""
    good = [s.latency for s in samples if s.ok]
    errors: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            errors[s.error] = errors.get(s.error, 0) + 1
    return {
        "requests": len(samples),
        "ok": len(good),
        "errors": len(samples) - len(good),
        "error_kinds": errors,
        "wall_s": wall_s,
        "images_per_s": len(good) / wall_s if wall_s > 0 else 0.0,
        "latency_s": {
            "mean": statistics.fmean(good) if good else None,
            "p50": percentile(good, 50),
            "p95": percentile(good, 95),
            "p99": percentile(good, 99),
            "max": max(good) if good else None,
        },
    }


# ---------------------------------------------------------------------------- the client
class Client:
    """POSTs the same body to /predictions/<model>; one keep-alive session per thread."""

    def __init__(self, url: str, model: str, body: bytes, key: str | None = None, timeout: float = 600.0):
        self.endpoint = f"{url.rstrip('/')}/predictions/{model}"
        self.body = body
        self.headers = {"Content-Type": "application/json"}
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        self.timeout = timeout
        self._local = threading.local()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        return session

    def send(self, scheduled: float | None = None) -> Sample:
        """One request. Latency runs from ``scheduled`` (open loop) or from now."""
        start = time.perf_counter() if scheduled is None else scheduled
        try:
            response = self._session().post(self.endpoint, data=self.body, headers=self.headers,
                                            timeout=self.timeout)
        except requests.Timeout:
            return Sample(start, time.perf_counter(), 0, "timeout")
        except requests.RequestException as exc:
            return Sample(start, time.perf_counter(), 0, f"connection: {type(exc).__name__}")
        end = time.perf_counter()
        return Sample(start, end, response.status_code, check_answer(response))


def check_answer(response: requests.Response) -> str | None:
    """None for a 200 with a JSON object of captions, else a short error kind."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return "200 without JSON"
    if not isinstance(body, dict) or "error" in body or not body:
        return "200 without captions"
    return None


def closed_loop(send, concurrency: int, requests_total: int, max_seconds: float | None = None) -> dict:
    """``concurrency`` clients, each sending as soon as its previous answer arrived, until
    ``requests_total`` requests were started or ``max_seconds`` passed (requests in flight then
    are still awaited and counted)."""
    if concurrency < 1 or requests_total < 1:
        raise ValueError("concurrency and requests must be >= 1")
    lock = threading.Lock()
    samples: list[Sample] = []
    issued = 0
    start = time.perf_counter()
    deadline = start + max_seconds if max_seconds else math.inf

    def client() -> None:
        nonlocal issued
        while True:
            with lock:
                if issued >= requests_total or time.perf_counter() >= deadline:
                    return
                issued += 1
            sample = send()
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=client, name=f"bench-client-{i}", daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = (max(s.end for s in samples) if samples else time.perf_counter()) - start
    return {"kind": "closed", "concurrency": concurrency, **summarize(samples, wall)}


def open_loop(send, rate: float, requests_total: int, max_seconds: float | None = None,
              max_in_flight: int = 64, seed: int = 0) -> dict:
    """Poisson arrivals at ``rate`` requests/s (fixed seed), ``requests_total`` of them or until
    ``max_seconds``; at most ``max_in_flight`` outstanding (later arrivals wait for a free
    client, and that wait counts in their latency)."""
    if rate <= 0 or requests_total < 1:
        raise ValueError("rate must be > 0 and requests >= 1")
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(requests_total):
        arrivals.append(t)
        t += rng.expovariate(rate)
    lock = threading.Lock()
    samples: list[Sample] = []
    slots = threading.Semaphore(max_in_flight)
    threads = []
    start = time.perf_counter()
    deadline = start + max_seconds if max_seconds else math.inf

    def one(scheduled: float) -> None:
        try:
            sample = send(scheduled)
            with lock:
                samples.append(sample)
        finally:
            slots.release()

    for offset in arrivals:
        due = start + offset
        if due >= deadline:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        slots.acquire()
        thread = threading.Thread(target=one, args=(due,), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    wall = (max(s.end for s in samples) if samples else time.perf_counter()) - start
    return {"kind": "open", "rate": rate, "max_in_flight": max_in_flight, **summarize(samples, wall)}


# ---------------------------------------------------------------------------- the server
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


# ---------------------------------------------------------------------------- helpers
def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


# CPU features that decide the CPU path's dtype and kernels (model/precision.py, model/packing.py).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def host_info() -> dict:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flag_lists = [line.split(":", 1)[1].split() for line in lines if line.startswith("flags")]
    cpu = names[0] if names else platform.processor() or platform.machine()
    flags = set(flag_lists[0]) if flag_lists else set()
    info = {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "cpu_flags": [f for f in SPEED_FLAGS if f in flags],
            "python": platform.python_version(), "platform": platform.platform()}
    try:
        from importlib.metadata import version

        info.update(torch=version("torch"), torchserve=version("torchserve"))
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


def read_keys(path: str | Path) -> dict[str, str]:
    data = json.loads(Path(path).read_text())
    return {name: entry["key"] for name, entry in data.items() if isinstance(entry, dict) and "key" in entry}


def requests_for(concurrency: int, args) -> int:
    if args.requests:
        return args.requests
    return max(args.min_requests, args.rounds * concurrency)


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


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


# ---------------------------------------------------------------------------- report
def summarize_runs(runs: list[dict], modes: list[Mode]) -> list[dict]:
    """Per (mode, level): images/s of every repeat, their mean, best and spread; latency
    percentiles as the median over the repeats of each repeat's percentile."""
    rows = []
    levels = []
    for run in runs:
        level = (run["kind"], run.get("concurrency") or run.get("rate"))
        if level not in levels:
            levels.append(level)
    for mode in modes:
        for kind, value in levels:
            group = [r for r in runs if r["mode"] == mode.key and r["kind"] == kind
                     and (r.get("concurrency") or r.get("rate")) == value]
            if not group:
                continue
            ips = [r["images_per_s"] for r in group]
            mean = statistics.fmean(ips)

            def median_of(name: str):
                values = [r["latency_s"][name] for r in group if r["latency_s"][name] is not None]
                return statistics.median(values) if values else None

            batches = [r["mean_batch_size"] for r in group if r.get("mean_batch_size") is not None]
            rows.append({
                "mode": mode.key, "kind": kind, "concurrency" if kind == "closed" else "rate": value,
                "repeats": len(group), "images_per_s": mean, "images_per_s_best": max(ips), "images_per_s_runs": ips,
                "spread_pct": (max(ips) - min(ips)) / mean * 100 if mean else None,
                "p50_s": median_of("p50"), "p95_s": median_of("p95"), "p99_s": median_of("p99"),
                "errors": sum(r["errors"] for r in group), "requests": sum(r["requests"] for r in group),
                "mean_batch_size": statistics.fmean(batches) if batches else None,
            })
    return rows


def ratios(summary: list[dict], modes: list[Mode]) -> dict:
    """Best images/s of each batched mode (closed loop) over batch_size 1 at concurrency 1."""
    single = next((m for m in modes if m.batch_size == 1), None)
    base = next((r for r in summary if single and r["mode"] == single.key and r["kind"] == "closed"
                 and r["concurrency"] == 1), None)
    out = {}
    if base is None or not base["images_per_s"]:
        return out
    for mode in modes:
        if mode.batch_size in (None, 1):
            continue
        closed = [r for r in summary if r["mode"] == mode.key and r["kind"] == "closed"]
        if not closed:
            continue
        best = max(closed, key=lambda r: r["images_per_s"])
        runs, base_runs = best["images_per_s_runs"], base["images_per_s_runs"]
        out[mode.key] = {
            "best_concurrency": best["concurrency"], "images_per_s": best["images_per_s"],
            "baseline_images_per_s": base["images_per_s"], "ratio": best["images_per_s"] / base["images_per_s"],
            # the range the repeats allow: worst batched repeat / best baseline repeat, and vice versa
            # (None where a baseline repeat served nothing)
            "ratio_range": [min(runs) / max(base_runs), max(runs) / min(base_runs) if min(base_runs) else None],
            # least-disturbed repeats on a shared host: the best of each side
            "ratio_best_repeats": max(r["images_per_s_best"] for r in closed) / base["images_per_s_best"],
        }
    return out


def print_table(summary: list[dict], modes: list[Mode]) -> None:
    labels = {m.key: m.key for m in modes}
    print(f"\n{'mode':<14} {'level':>8} {'req':>5} {'err':>4} {'images/s':>9} {'runs':>17} {'spread':>7} "
          f"{'p50 s':>7} {'p95 s':>7} {'p99 s':>7} {'batch':>6}")
    for row in summary:
        level = f"c={row['concurrency']}" if row["kind"] == "closed" else f"{row['rate']:g}/s"
        runs = "/".join(f"{v:.2f}" for v in row["images_per_s_runs"])
        print(f"{labels[row['mode']]:<14} {level:>8} {row['requests']:>5} {row['errors']:>4} "
              f"{row['images_per_s']:>9.3f} {runs:>17} {fmt(row['spread_pct'], '.0f'):>6}% "
              f"{fmt(row['p50_s']):>7} {fmt(row['p95_s']):>7} {fmt(row['p99_s']):>7} "
              f"{fmt(row['mean_batch_size'], '.1f'):>6}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    kinds = [k for k in ("closed", "open") if any(r["kind"] == k for r in summary)]
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4 * len(kinds)), squeeze=False)
    for row_axes, kind in zip(axes, kinds):
        x_name = "concurrency" if kind == "closed" else "rate"
        left, right = row_axes
        for mode in results["modes"]:
            rows = [r for r in summary if r["mode"] == mode["key"] and r["kind"] == kind]
            if not rows:
                continue
            xs = [r[x_name] for r in rows]
            line = left.plot(xs, [r["images_per_s"] for r in rows], marker="o", label=mode["label"])[0]
            for x, r in zip(xs, rows):
                left.scatter([x] * len(r["images_per_s_runs"]), r["images_per_s_runs"], s=10,
                             color=line.get_color(), alpha=0.5)
            right.plot(xs, [r["p95_s"] for r in rows], marker="o", label=mode["label"], color=line.get_color())
        if kind == "closed":
            base = next((r for r in summary if r["kind"] == "closed" and r["concurrency"] == 1 and
                         any(m["key"] == r["mode"] and m["batch_size"] == 1 for m in results["modes"])), None)
            if base:
                left.axhline(4 * base["images_per_s"], color="grey", linestyle="--", linewidth=1,
                             label="target: 4x one-at-a-time")
        xlabel = "concurrent clients (closed loop)" if kind == "closed" else "offered requests/s (Poisson)"
        xs = sorted({r[x_name] for r in summary if r["kind"] == kind})
        for ax in (left, right):
            ax.set_xlabel(xlabel)
            if kind == "closed":
                ax.set_xscale("log", base=2)
            ax.set_xticks(xs, [f"{x:g}" for x in xs])
            ax.minorticks_off()
        left.set_ylabel("images / s (dots: repeats)")
        right.set_ylabel("p95 latency (s)")
        left.set_ylim(bottom=0)
        right.set_ylim(bottom=0)
        left.legend(fontsize=8)
        right.legend(fontsize=8)
    server = results["server"]
    model = Path(server["config"]).parent.name if server.get("config") else "full size"
    if server.get("cpu_quantize"):
        model += f" ({server['cpu_quantize']} decoder)"
    if server.get("cpu_compile_decode"):
        model += " (compiled step)"
    options = json.dumps(results["request"]["options"]) if results["request"]["options"] else "service defaults"
    fig.suptitle(f"{results['name']}: {model} model, {results['host']['cpu']} ({results['host']['cores']} cores), "
                 f"threads {server.get('threads', '?')}, options {options}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main
def build_modes(args) -> list[Mode]:
    if not args.register:
        return [Mode(key="as-registered", model=args.model, batch_size=None, max_batch_delay=None)]
    prefix = f"{args.model}-bench"
    modes = [Mode(key=f"b{args.batch_size}-d{delay}", model=f"{prefix}-b{args.batch_size}-d{delay}",
                  batch_size=args.batch_size, max_batch_delay=delay) for delay in args.max_batch_delay]
    if args.single:
        modes.append(Mode(key="b1", model=f"{prefix}-b1", batch_size=1, max_batch_delay=None))
    return modes


SECRET_OPTIONS = ("--key", "--management-key")


def recorded_command(argv: list[str]) -> str:
    """The command line for the results file, with the values of key options masked."""
    shown = []
    for arg in argv:
        if shown and shown[-1] in SECRET_OPTIONS:
            arg = "***"
        elif arg.startswith(tuple(f"{option}=" for option in SECRET_OPTIONS)):
            arg = arg.split("=", 1)[0] + "=***"
        shown.append(arg)
    return "python -m bench " + " ".join(shown)


def run(args, argv: list[str] | None = None) -> dict:
    command = recorded_command(argv if argv is not None else sys.argv[1:])
    options = request_options(args.max_new_tokens, args.num_captions, args.styles,
                              dict(parse_option(o) for o in args.option))
    image = synthetic_jpeg(*args.image_size)
    body = request_body(image, options)
    levels = [("closed", c) for c in args.concurrency] + [("open", r) for r in args.rate]
    if not levels:
        raise SystemExit("nothing to measure: give --concurrency and/or --rate")
    results: dict = {
        "name": args.name, "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(), "load_average": {"before": load_average()},
        "request": {"options": options, "image_size": list(args.image_size), "image_bytes": len(image),
                    "body_bytes": len(body)},
        "server": {}, "modes": [], "runs": [],
    }
    server = workdir = None
    modes = build_modes(args)
    management = None
    try:
        if args.start:
            server, workdir, archive = start_server(args, results)
            url, metrics_url = server.url("inference", ""), server.url("metrics", "")
            inference_key, management_key = server.keys.get("inference"), server.keys.get("management")
            management = Management(server.url("management", ""), management_key)
        else:
            keys = read_keys(args.key_file) if args.key_file else {}
            inference_key = args.key or keys.get("inference")
            management_key = args.management_key or keys.get("management")
            url, metrics_url = args.url, args.metrics_url
            management = Management(args.management_url, management_key)
            archive = args.archive
            if args.register and not archive:
                archive = management.describe(args.model)["modelUrl"]
            results["server"].update(url=url, archive=archive, threads=args.threads)

        for mode in modes:
            if mode.batch_size is None:
                try:
                    mode.applied = applied_settings(management.describe(mode.model))
                    mode.applied["worker"] = management.worker_facts(mode.model)
                except (RuntimeError, requests.RequestException) as exc:
                    mode.applied = {"describe": f"unavailable: {exc}"}
                continue
            print(f"registering {mode.model} ({mode.label}) from {archive} ...", flush=True)
            started = time.perf_counter()
            mode.applied = applied_settings(management.register(mode, archive))
            check_applied(mode, mode.applied)
            mode.applied["register_s"] = round(time.perf_counter() - started, 1)
            mode.applied["worker"] = management.worker_facts(mode.model)
            print(f"  describe: {mode.applied}", flush=True)
        results["modes"] = [{**asdict(mode), "label": mode.label} for mode in modes]

        clients = {mode.key: Client(url, mode.model, body, inference_key, args.timeout) for mode in modes}
        for mode in modes:  # first requests (the largest batch) pay for lazy allocation; not measured
            batch = mode.batch_size or mode.applied.get("batchSize") or 1
            warm = min(max(args.concurrency or [1]), batch)
            print(f"warm-up {mode.key}: {warm} concurrent request(s) ...", flush=True)
            level = closed_loop(clients[mode.key].send, warm, warm, args.max_seconds)
            if level["errors"]:
                raise RuntimeError(f"warm-up of {mode.model} failed: {level['error_kinds']}")

        print(f"\n{'repeat':>6} {'mode':<14} {'level':>8} {'req':>5} {'err':>4} {'images/s':>9} {'p50 s':>7} "
              f"{'p95 s':>7} {'p99 s':>7} {'batch':>6} {'load1':>6}", flush=True)
        for repeat in range(args.repeats):
            for kind, value in levels:
                for mode in modes:
                    before = metric_totals(metrics_url, mode.model)
                    send = clients[mode.key].send
                    if kind == "closed":
                        level = closed_loop(send, value, requests_for(value, args), args.max_seconds)
                    else:
                        count = args.requests or max(args.min_requests, math.ceil(value * args.open_seconds))
                        level = open_loop(send, value, count, args.max_seconds, seed=repeat)
                    level.update(mode=mode.key, repeat=repeat, load_average=load_average(),
                                 mean_batch_size=mean_batch_size(metrics_url, mode.model, before, level["requests"]),
                                 last_batch=last_batch(metrics_url, mode.model))
                    results["runs"].append(level)
                    lat = level["latency_s"]
                    label = f"c={value}" if kind == "closed" else f"{value:g}/s"
                    print(f"{repeat:>6} {mode.key:<14} {label:>8} {level['requests']:>5} {level['errors']:>4} "
                          f"{level['images_per_s']:>9.3f} {fmt(lat['p50']):>7} {fmt(lat['p95']):>7} "
                          f"{fmt(lat['p99']):>7} {fmt(level['mean_batch_size'], '.1f'):>6} "
                          f"{level['load_average'][0] if level['load_average'] else '-':>6}", flush=True)
                    if level["last_batch"]:
                        print("       last batch: " + ", ".join(f"{k} {v:g}" for k, v in level["last_batch"].items()),
                              flush=True)
                    if level["errors"]:
                        print(f"       errors: {level['error_kinds']}", flush=True)
    finally:
        if management is not None:
            for mode in modes:
                if mode.registered_here:
                    try:
                        management.unregister(mode.model)
                    except requests.RequestException:
                        pass
        if server is not None:
            server.stop()
        if workdir is not None and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    results["load_average"]["after"] = load_average()
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["summary"] = summarize_runs(results["runs"], modes)
    results["ratio"] = ratios(results["summary"], modes)
    print_table(results["summary"], modes)
    for key, ratio in results["ratio"].items():
        low, high = ratio["ratio_range"]
        print(f"\n{key}: {ratio['images_per_s']:.3f} images/s at concurrency {ratio['best_concurrency']} vs "
              f"{ratio['baseline_images_per_s']:.3f} images/s one request at a time (b1, c=1): "
              f"{ratio['ratio']:.2f}x (repeats allow {low:.2f}x-{fmt(high)}x, best repeats "
              f"{ratio['ratio_best_repeats']:.2f}x; target >= 4x: "
              f"{'MET' if ratio['ratio'] >= 4 else 'MISSED'})")
    print(f"load average before {results['load_average']['before']}, after {results['load_average']['after']}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / f"{args.name}.png")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")
    return results


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
