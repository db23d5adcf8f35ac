"""Slow requests sent in waves from client threads, and the preStop hook run against a test
TorchServe: what the drain and overload tests keep in flight while the server is stopped or full."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import requests

from tests.e2e.seed import MODEL, image_b64
from tests.e2e.torchserve import REPO, TorchServe

DRAIN = REPO / "docker" / "drain.py"
# 24 captions of up to 40 tokens each: long enough on the tiny model that a batch of them is
# still being computed when the hook starts.
SLOW = {"num_captions": 8, "max_new_tokens": 40}
FULL_BATCH = 8  # the archive's batchSize


def send_waves(ts: TorchServe, waves: tuple[int, ...]) -> tuple[list, list[threading.Thread]]:
    """One thread per request, a short pause between waves (a full batch first, so the worker
    takes it whole); returns (results in the order they came back, threads). A result is
    (status or None when the connection failed, the body or the error)."""
    results: list = []

    def call(seed: int) -> None:
        try:
            response = ts.infer(MODEL, json={"image": image_b64("chelsea.png"), "seed": seed, **SLOW}, timeout=120)
            results.append((response.status_code, response.text))
        except requests.RequestException as exc:
            results.append((None, repr(exc)[:200]))

    threads: list[threading.Thread] = []
    for size in waves:
        for _ in range(size):
            threads.append(threading.Thread(target=call, args=(len(threads),)))
            threads[-1].start()
        time.sleep(0.1)
    time.sleep(0.2)
    return results, threads


def join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=150)


def run_drain(ts: TorchServe, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTION_RUN_DIR": str(ts.workdir), "CAPTION_MANAGEMENT_PORT": str(ts.ports["management"]),
           "CAPTION_DRAIN_SETTLE_S": "0", **env}
    return subprocess.run([sys.executable, str(DRAIN)], env=env, capture_output=True, text=True, timeout=120)
