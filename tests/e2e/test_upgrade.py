"""docs/operations.md's zero-downtime model upgrade on one TorchServe, with clients calling
throughout: register v2 beside v1 under the same name, try v2 at its own URL, set it as the
default, wait for v1 to answer what it was given, unregister v1. No request may fail or go
unanswered on the way.

v2 is the same checkpoint archived with `--version 2.0` and a lower `max_num_captions` (4), so
a request for 6 captions tells which version answered it (200 from v1, 400 from v2).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import requests

from tests.e2e.seed import MODEL, SEED, golden, image_b64, seed_model_config
from tests.e2e.torchserve import TorchServe

pytestmark = pytest.mark.e2e

GREEDY = {"temperature": 0, "num_captions": 1}
V2_MAX_CAPTIONS = 4
SIX_CAPTIONS = {"image": image_b64("coffee.png"), "styles": ["concise"], "num_captions": 6, "max_new_tokens": 4}
CLIENTS = 2


@pytest.fixture(scope="module")
def upgrade_server(e2e_root, seed_archive):
    """A TorchServe of its own (the upgrade changes which archives serve `captioner`), its
    store holding v1 (`captioner.mar`) and v2 (`captioner-v2.mar`), v1 loaded at start."""
    from export import build_archive

    store = e2e_root / "upgrade-store"
    store.mkdir()
    os.link(seed_archive, store / "captioner.mar")
    v2 = build_archive(SEED / "weights.pt", SEED / "config.json", model_name=MODEL, version="2.0",
                       output=e2e_root / "upgrade-v2",
                       model_config=seed_model_config(e2e_root / "upgrade-v2-config",
                                                      {"limits": {"max_num_captions": V2_MAX_CAPTIONS}}),
                       progress=lambda _line: None)
    os.link(v2.path, store / "captioner-v2.mar")
    with TorchServe(e2e_root / "upgrade-ts", model_store=store, overrides={"load_models": "captioner.mar"}) as ts:
        ts.wait_model_ready(MODEL)
        yield ts


class Clients:
    """Threads sending greedy requests to /predictions/captioner until stopped."""

    def __init__(self, ts: TorchServe, count: int):
        self.ts, self.results, self.stopping = ts, [], threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(name,), daemon=True)
                        for name in ("chelsea.png", "rocket.jpg")[:count]]

    def _run(self, name: str) -> None:
        while not self.stopping.is_set():
            try:
                response = self.ts.infer(MODEL, json={"image": image_b64(name), **GREEDY}, timeout=120)
                self.results.append((name, response.status_code, response.text))
            except requests.RequestException as exc:  # a refused connection counts as a failure
                self.results.append((name, None, repr(exc)))

    def __enter__(self) -> "Clients":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=180)


def answered_by(ts: TorchServe, path: str) -> str:
    """Which version served a 6-caption request at `path`: v1 accepts it, v2 refuses it."""
    response = requests.post(ts.url("inference", path), json=SIX_CAPTIONS, headers=ts.auth("inference"), timeout=120)
    if response.status_code == 200:
        return "1.0"
    assert response.status_code == 400 and "num_captions" in response.json()["error"], response.text
    return "2.0"


def default_version(ts: TorchServe) -> str:
    (description,) = ts.manage("GET", f"/models/{MODEL}").json()
    return description["modelVersion"]


def test_zero_downtime_upgrade_with_clients_calling_throughout(upgrade_server):
    ts = upgrade_server
    with Clients(ts, CLIENTS) as clients:
        # 2. register v2 next to v1; v1 stays the default
        response = ts.manage("POST", "/models", params={"url": "captioner-v2.mar", "model_name": MODEL,
                                                        "initial_workers": 1, "synchronous": "true"})
        assert response.status_code == 200, response.text
        versions = ts.manage("GET", f"/models/{MODEL}/all").json()
        assert sorted(v["modelVersion"] for v in versions) == ["1.0", "2.0"]
        assert default_version(ts) == "1.0" and answered_by(ts, f"/predictions/{MODEL}") == "1.0"
        # 3. smoke-test v2 at its own URL, then make it the default
        assert answered_by(ts, f"/predictions/{MODEL}/2.0") == "2.0"
        response = ts.manage("PUT", f"/models/{MODEL}/2.0/set-default")
        assert response.status_code == 200, response.text
        assert default_version(ts) == "2.0" and answered_by(ts, f"/predictions/{MODEL}") == "2.0"
        # 4. wait until v1 has answered every request routed to it: TorchServe 0.12 unregisters a
        # busy version at once and its in-flight requests are never answered (seen in this test:
        # two clients waited out their timeout). v1's describe request queues behind them.
        response = ts.manage("GET", f"/models/{MODEL}/1.0", params={"customized": "true"})
        assert response.status_code == 200 and "customizedMetadata" in response.json()[0], response.text
        response = ts.manage("DELETE", f"/models/{MODEL}/1.0")
        assert response.status_code == 200, response.text
        assert [v["modelVersion"] for v in ts.manage("GET", f"/models/{MODEL}/all").json()] == ["2.0"]
        time.sleep(2)  # a few requests served by v2 alone
    failures = [(name, status, text[:200]) for name, status, text in clients.results if status != 200]
    assert not failures, failures
    assert len(clients.results) >= 2 * CLIENTS, clients.results
    assert all(json.loads(text) == golden(name) for name, _, text in clients.results)
