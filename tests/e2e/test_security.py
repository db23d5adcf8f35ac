"""Locked-down defaults, each checked: token authorization, model registration only from the
model store, management and metrics on loopback, checkpoints read with ``weights_only=True``
only, and the per-request limits enforced over HTTP.

The HTTP checks run against the session server (the shipped config.properties, with only its
ports and paths replaced by the test harness).
"""

from __future__ import annotations

import ast
import functools
import http.server
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
import torch

from tests.local_http import serving
from tests.e2e.bad_inputs import GREEDY, b64, png_bomb_rect, rgb, encode
from tests.e2e.seed import MODEL, SEED, golden, image_b64
from tests.e2e.torchserve import REPO, SHIPPED_CONFIG, read_properties

pytestmark = pytest.mark.e2e

TOKEN_REFUSED = 400  # TorchServe 0.12 answers a missing or wrong key with 400, not 401


def shipped() -> dict[str, str]:
    return {key: line.split("=", 1)[1].strip() for key, line in read_properties(SHIPPED_CONFIG) if key}


def refused(response: requests.Response) -> bool:
    return response.status_code == TOKEN_REFUSED and "Token Authorization failed" in response.text


# ------------------------------------------------------------------ the shipped configuration
def test_shipped_config_keeps_management_metrics_and_grpc_on_loopback():
    config = shipped()
    for key in ("management_address", "metrics_address"):
        assert urlparse(config[key]).hostname == "127.0.0.1", (key, config[key])
    for key in ("grpc_inference_address", "grpc_management_address"):
        assert config[key] == "127.0.0.1", (key, config[key])
    # Only inference is public, and it needs a key.
    assert urlparse(config["inference_address"]).hostname == "0.0.0.0"


def test_shipped_config_locks_down_tokens_urls_and_dependencies():
    config = shipped()
    assert config["disable_token_authorization"] == "false"
    assert config["install_py_dep_per_model"] == "false"
    assert int(config["max_request_size"]) <= 64 * 2**20
    patterns = [re.compile(p, re.IGNORECASE) for p in config["allowed_urls"].split(",")]
    allowed = lambda url: any(p.fullmatch(url) for p in patterns)  # noqa: E731 - TorchServe uses matches()
    # No URL at all: archives are registered by plain name from model_store.
    for url in ("file:///home/model-server/model-store/captioner.mar", "file:///tmp/x/model-store/evil.mar",
                "http://example.com/captioner.mar", "https://example.com/model-store/captioner.mar",
                "s3://bucket/model-store/captioner.mar", "file:///etc/passwd", "file:///tmp/captioner.mar",
                "file:///srv/model-store/sub/captioner.mar", "HTTP://127.0.0.1/model-store/captioner.mar",
                "ftp://host/model-store/captioner.mar"):
        assert not allowed(url), url


# ------------------------------------------------------------------ token authorization
def test_inference_needs_the_inference_key(server):
    request = {"json": {"image": image_b64("rocket.jpg"), **GREEDY}}
    for headers in ({}, server.auth("management"), server.auth("API"), {"Authorization": "Bearer nope"},
                    {"Authorization": server.keys["inference"]}):  # the key without "Bearer"
        response = server.infer(MODEL, key=None, headers=headers, **request)
        assert refused(response), (headers.keys(), response.status_code, response.text)
    assert server.infer(MODEL, **request).json() == golden("rocket.jpg")


def test_management_needs_the_management_key(server):
    for headers in ({}, server.auth("inference"), server.auth("API"), {"Authorization": "Bearer nope"}):
        for method, path in (("GET", "/models"), ("GET", f"/models/{MODEL}"),
                             ("PUT", f"/models/{MODEL}?min_worker=3"), ("DELETE", f"/models/{MODEL}"),
                             ("POST", "/models?url=captioner.mar&model_name=intruder")):
            response = server.manage(method, path, key=None, headers=headers)
            assert refused(response), (method, path, headers.keys(), response.status_code, response.text)
    description = server.describe(MODEL)[0]
    assert len(description["workers"]) == 1  # nothing above changed the model


def test_new_keys_need_the_api_key(server):
    for kind in ("inference", "management"):
        response = requests.post(server.url("management", "/token"), params={"type": kind},
                                 headers=server.auth("management"), timeout=10)
        # /token words it differently: "Token Authentication failed ..." (InvalidKeyException, 400)
        assert response.status_code == TOKEN_REFUSED and "InvalidKeyException" in response.text, response.text
    assert (server.workdir / "key_file.json").stat().st_mode & 0o077 == 0, "key file readable by others"


# ------------------------------------------------------------------ registration only from the store
@pytest.fixture()
def archive_server(seed_archive, tmp_path):
    """A plain HTTP server on 127.0.0.1 serving a copy of the archive: a reachable, valid URL."""
    shutil.copy(seed_archive, tmp_path / "remote.mar")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with serving(http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)) as httpd:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/remote.mar"


def registered(server, name: str) -> bool:
    return server.manage("GET", f"/models/{name}").status_code == 200


def test_registration_from_a_reachable_http_url_is_refused(server, archive_server):
    assert requests.get(archive_server, timeout=10).status_code == 200  # it is downloadable
    response = server.manage("POST", "/models", params={"url": archive_server, "model_name": "remote"})
    assert response.status_code == 404 and "does not match any allowed URL" in response.json()["message"], \
        response.text
    assert not registered(server, "remote")


@pytest.mark.parametrize("make_url,needle", [
    (lambda outside, store: (outside / "captioner.mar").as_uri(), "does not match any allowed URL"),
    (lambda outside, store: str(outside / "elsewhere.mar"), "not found"),
    (lambda outside, store: "../" + store.name + "/captioner.mar", "Relative path is not allowed"),
    (lambda outside, store: "https://example.com/captioner.mar", "does not match any allowed URL"),
    (lambda outside, store: "file:///etc/passwd", "does not match any allowed URL"),
], ids=["file-url-outside-store", "absolute-path-outside-store", "relative-path", "https-url", "file-etc-passwd"])
def test_registration_from_outside_the_model_store_is_refused(server, model_store, seed_archive, tmp_path,
                                                              make_url, needle):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(seed_archive, outside / "captioner.mar")
    shutil.copy(seed_archive, outside / "elsewhere.mar")
    url = make_url(outside, model_store)
    response = server.manage("POST", "/models", params={"url": url, "model_name": "intruder"})
    print(f"\nPOST /models?url={url} -> {response.status_code} {response.text.strip()[:200]}")
    assert response.status_code in (400, 404), response.text
    assert needle.lower() in response.json()["message"].lower(), response.text
    assert not registered(server, "intruder")
    assert not (model_store / "elsewhere.mar").exists()


def test_registration_from_another_folder_named_model_store_is_refused(server, model_store, seed_archive, tmp_path):
    """An earlier ``allowed_urls=file://.*/model-store/[^/]+[.]mar`` matched ANY folder named
    model-store on the host, and TorchServe copied such an archive into the store and registered
    it: the management key plus write access to any directory ran arbitrary handler code. The
    shipped config now matches no URL at all (plain archive names from model_store still work)."""
    decoy = tmp_path / "decoy" / "model-store"
    decoy.mkdir(parents=True)
    shutil.copy(seed_archive, decoy / "sneaky.mar")
    try:
        response = server.manage("POST", "/models", params={
            "url": (decoy / "sneaky.mar").as_uri(), "model_name": "sneaky", "synchronous": "true"})
        print(f"\nPOST /models?url={(decoy / 'sneaky.mar').as_uri()} -> {response.status_code} {response.text[:200]}")
        assert response.status_code in (400, 404), response.text
        assert not registered(server, "sneaky")
    finally:
        server.manage("DELETE", "/models/sneaky")
        (model_store / "sneaky.mar").unlink(missing_ok=True)


# ------------------------------------------------------------------ weights_only everywhere
LOADERS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
    ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("jit", "load"), ("torch", "package"),
}


def tracked_python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def test_every_checkpoint_load_in_the_code_is_weights_only():
    """Every torch.load call in the repository passes weights_only=True (a literal); nothing
    unpickles with pickle/dill/joblib, torch.jit.load or numpy allow_pickle=True; nothing turns
    PyTorch's weights-only default off through the environment."""
    problems, loads = [], 0
    for path in tracked_python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = dotted(node.func)
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("torch.load", "torch.serialization.load") or name.endswith(".torch.load"):
                loads += 1
                value = keywords.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    problems.append(f"{where} without weights_only=True")
            elif tuple(name.split(".")[-2:]) in LOADERS:
                problems.append(f"{where}: unpickling")
            elif name.endswith("load") and isinstance(keywords.get("allow_pickle"), ast.Constant) \
                    and keywords["allow_pickle"].value is True:
                problems.append(f"{where} with allow_pickle=True")
    assert loads >= 2, "the scan found no torch.load at all: is it scanning the right files?"
    assert not problems, problems
    text_files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    offenders = []
    for line in text_files.splitlines():
        path = REPO / line
        if path.is_file() and path.suffix not in (".pt", ".png", ".jpg", ".mar", ".csv", ".md") \
                and path.name != Path(__file__).name and path.stat().st_size < 2_000_000:
            if "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in path.read_text(errors="ignore"):
                offenders.append(line)
    assert not offenders, offenders


def test_a_pickle_payload_checkpoint_is_refused_at_export_without_running(tmp_path):
    from export import ExportError, build_archive

    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling would create the marker file

    state = torch.load(SEED / "weights.pt", weights_only=True)
    state["extra.payload"] = Payload()
    torch.save(state, tmp_path / "weights.pt")
    with pytest.raises(ExportError, match="objects other than tensors and was refused unread"):
        build_archive(tmp_path / "weights.pt", SEED / "config.json", output=tmp_path / "store",
                      progress=lambda _line: None)
    assert not marker.exists(), "the pickle payload was executed"
    assert not list((tmp_path / "store").glob("*.mar"))


# ------------------------------------------------------------------ per-request limits over HTTP
def caption(server, **options) -> requests.Response:
    return server.infer(MODEL, json={"image": image_b64("coffee.png"), **options})


def test_num_captions_limit(server):
    response = caption(server, styles=["concise"], num_captions=8, max_new_tokens=4, seed=1)
    assert response.status_code == 200 and len(response.json()["Concise"]) == 8, response.text
    response = caption(server, styles=["concise"], num_captions=9)
    assert response.status_code == 400 and "'num_captions' must be between 1 and 8" in response.json()["error"]


def test_max_new_tokens_is_capped_by_the_model(server):
    """model-config.yaml allows 128, but the seed-tiny model holds 40 positions: 40 is the cap."""
    assert caption(server, styles=["concise"], max_new_tokens=40, **GREEDY).status_code == 200
    for value in (41, 128, 10**9):
        response = caption(server, styles=["concise"], max_new_tokens=value)
        assert response.status_code == 400, response.text
        assert "'max_new_tokens' must be between 1 and 40" in response.json()["error"]


def test_image_pixel_limit(server):
    """max_pixels (40 000 000) is enforced from the header: 6325x6325 = 40 005 625 is refused."""
    response = server.infer(MODEL, json={"image": b64(png_bomb_rect(6325, 6325)), **GREEDY})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "image is 6325x6325 = 40005625 pixels; the limit is 40000000"
    small = encode(rgb("coffee.png").resize((2000, 1000)), "JPEG")
    assert server.infer(MODEL, json={"image": b64(small), **GREEDY}).status_code == 200
