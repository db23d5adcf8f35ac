"""The client side of `python -m bench http`: the request every client sends, one keep-alive
client, closed- and open-loop load levels, and each level's throughput and latency summary."""

from __future__ import annotations

import base64
import io
import json
import math
import random
import statistics
import threading
import time
from dataclasses import dataclass

import requests


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
