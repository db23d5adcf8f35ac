"""Export of a full-size checkpoint (all 436 keys, bfloat16, 339 MB; RANDOM weights built in
the test) and its load by a real TorchServe worker; refused exports of broken checkpoints; the
same archive bytes from the same inputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from export import ArchiveResult, ExportError, build_archive
from model.config import PRESETS
from model.precision import resolve_dtype
from tests.e2e.seed import REPO, SEED, image_b64, seed_model_config

pytestmark = pytest.mark.e2e

NAME = "captioner-full"
# Deflating 339 MB of bfloat16 takes over a minute on 2 cores; the stored (uncompressed) zip
# variant keeps this test short. The default format is exercised by the seed archive.
FORMAT = "zip-store"


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory) -> Path:
    from weights.random_init import write_random_checkpoint

    path = tmp_path_factory.mktemp("full") / "random-init-weights.pt"
    write_random_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="module")
def full_archive(full_checkpoint, model_store) -> Path:
    lines = []
    result = build_archive(full_checkpoint, None, model_name=NAME, output=model_store, archive_format=FORMAT,
                           progress=lines.append)
    assert lines[0].startswith(f"checking {full_checkpoint}")
    assert result.config == PRESETS["seed-full"]
    assert result.size_bytes > full_checkpoint.stat().st_size
    assert not [p for p in model_store.iterdir() if p.name.startswith(".")], "export left its work folder"
    return result.path


def test_archive_contents(full_archive, full_checkpoint):
    with zipfile.ZipFile(full_archive) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("MAR-INF/MANIFEST.json"))
        assert manifest["model"] == {"modelName": NAME, "serializedFile": full_checkpoint.name,
                                     "handler": "captioner_handler.py", "modelVersion": "1.0",
                                     "configFile": "model-config.yaml"}
        assert json.loads(archive.read("caption_config.json")) == PRESETS["seed-full"].to_dict()
        assert archive.read("model-config.yaml") == (REPO / "handler" / "model-config.yaml").read_bytes()
        assert archive.read("model/assets/vocab.txt") == (REPO / "model" / "assets" / "vocab.txt").read_bytes()
        assert archive.getinfo(full_checkpoint.name).file_size == full_checkpoint.stat().st_size
        assert archive.read("captioner_handler.py") == (REPO / "handler" / "captioner_handler.py").read_bytes()
    expected_code = {f"{package}/{p.relative_to(REPO / package)}" for package in ("model", "handler")
                     for p in (REPO / package).rglob("*")
                     if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
                     and (p.suffix == ".py" or p.parent.name == "assets")}
    assert expected_code <= names
    # only sources and package data: no editor backups, notes or caches from the working tree
    assert {n for n in names if n.startswith(("model/", "handler/"))} == expected_code
    assert {"model/engine.py", "model/checkpoint.py", "handler/request_parsing.py", "handler/settings.py"} <= names
    top_level = {n for n in names if "/" not in n}
    assert top_level == {full_checkpoint.name, "caption_config.json", "model-config.yaml", "captioner_handler.py",
                         "build_info.json"}
    with zipfile.ZipFile(full_archive) as archive:
        build = json.loads(archive.read("build_info.json"))
    assert build["weights_sha256"] == hashlib.sha256(full_checkpoint.read_bytes()).hexdigest()
    assert (build["weights_file"], build["weights_bytes"]) == (full_checkpoint.name, full_checkpoint.stat().st_size)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert build["code_commit"] == head and isinstance(build["code_modified"], bool)
    assert build["built_with"]["torch"] == torch.__version__
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc") or n.startswith(("tests/", "export/"))]


def test_a_worker_loads_the_full_size_archive(server, full_archive):
    response = server.manage("POST", "/models", params={"url": full_archive.name, "initial_workers": 1,
                                                        "synchronous": "true"}, timeout=600)
    try:
        assert response.status_code == 200, (response.text, server.log_tail())
        # synchronous=true can answer while the worker still warms up (describe then says
        # UNLOADING, TorchServe 0.12's word for a loading worker): wait for READY.
        description = server.wait_model_ready(NAME, timeout=600)[0]
        assert [w["status"] for w in description["workers"]] == ["READY"]
        request = {"image": image_b64("rocket.jpg"), "styles": ["concise"], "num_captions": 1, "max_new_tokens": 4}
        response = server.infer(NAME, json=request, timeout=300)
        assert response.status_code == 200, response.text
        body = response.json()
        assert list(body) == ["Concise"] and len(body["Concise"]) == 1 and isinstance(body["Concise"][0], str)
        ready = server.grep_log(rf"caption handler ready: model={NAME} ")
        # The shipped cpu_dtype is auto: float32 on this project's AVX2 hosts, bfloat16 on CPUs with native bf16.
        expected = str(resolve_dtype("auto", "cpu")).removeprefix("torch.")
        assert ready and "image_size=384" in ready[-1] and f"dtype={expected}" in ready[-1], ready
    finally:
        server.manage("DELETE", f"/models/{NAME}")


def test_export_of_a_truncated_checkpoint_fails_clearly(full_checkpoint, tmp_path):
    truncated = tmp_path / "truncated.pt"
    with open(full_checkpoint, "rb") as source:
        truncated.write_bytes(source.read(full_checkpoint.stat().st_size // 2))
    result = subprocess.run([sys.executable, "-m", "export", "--weights", str(truncated), "--output",
                             str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result
    assert "export failed" in result.stderr and "truncated.pt" in result.stderr
    assert "not a readable PyTorch checkpoint" in result.stderr, result.stderr
    assert not list(tmp_path.glob("out/*.mar"))


def test_export_of_a_wrong_shape_checkpoint_fails_clearly(full_checkpoint, tmp_path):
    import torch

    state = torch.load(full_checkpoint, weights_only=True, mmap=True)
    state["text_transformer.decoder_blocks.3.ffn_norm.weight"] = torch.ones(512, dtype=torch.bfloat16)
    del state["vision_encoder.backbone.embeddings.mask_token"]
    wrong = tmp_path / "wrong-shape.pt"
    torch.save(state, wrong)
    del state
    with pytest.raises(ExportError) as error:
        build_archive(wrong, None, output=tmp_path / "out", progress=lambda _line: None)
    message = str(error.value)
    assert "wrong-shape.pt" in message
    assert "1 mis-shaped key(s): text_transformer.decoder_blocks.3.ffn_norm.weight is (512,), expected (768,)" in message
    assert "1 missing key(s): vision_encoder.backbone.embeddings.mask_token" in message
    assert not list(tmp_path.glob("out/*.mar"))
    # Config and checkpoint of different sizes: every differing key is named (first few shown).
    with pytest.raises(ExportError, match=r"mis-shaped key\(s\)"):
        build_archive(SEED / "weights.pt", None, output=tmp_path / "out", progress=lambda _line: None)


def test_export_refuses_a_model_config_with_a_pt2_section(tmp_path):
    model_config = seed_model_config(tmp_path, pt2={"compile": {"enable": True}})
    with pytest.raises(ExportError, match="pt2"):
        build_archive(SEED / "weights.pt", SEED / "config.json", output=tmp_path / "out",
                      model_config=model_config, progress=lambda _line: None)


@pytest.mark.parametrize("name", ["build_info.json", "model", "captioner_handler.py", "model-config.yaml"])
def test_export_refuses_a_weights_file_named_like_an_archive_file(tmp_path, name):
    """The archive's files sit side by side in the model directory: a checkpoint named like one of
    them would replace it (or be replaced)."""
    weights = tmp_path / "in" / name
    weights.parent.mkdir()
    shutil.copy(SEED / "weights.pt", weights)
    with pytest.raises(ExportError, match=f"the weights file name '{name}' clashes with an archive file"):
        build_archive(weights, SEED / "config.json", output=tmp_path / "out", progress=lambda _line: None)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _tiny_archive(weights: Path, output: Path, archive_format: str = "default") -> ArchiveResult:
    return build_archive(weights, SEED / "config.json", output=output, archive_format=archive_format,
                         progress=lambda _line: None)


@pytest.mark.parametrize("archive_format", ["default", "zip-store"])
def test_the_same_inputs_give_the_same_archive_bytes(tmp_path, monkeypatch, archive_format):
    """Built at different times from a checkpoint with a different file time: the same bytes
    (the archiver's own zip has file times, listing order and a creation time in its manifest)."""
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    weights = tmp_path / "weights.pt"
    shutil.copyfile(SEED / "weights.pt", weights)
    digests = []
    for build, mtime in enumerate((1_700_000_000, 1_800_000_000)):
        if build:
            time.sleep(1.1)  # the archiver's createdOn has seconds
        os.utime(weights, (mtime, mtime))
        result = _tiny_archive(weights, tmp_path / f"out{build}", archive_format)
        archive = result.path
        digests.append(hashlib.sha256(archive.read_bytes()).hexdigest())
        assert result.sha256 == digests[-1]
    assert digests[0] == digests[1]
    with zipfile.ZipFile(archive) as built:
        names = built.namelist()
        assert names == sorted(names)
        assert {info.compress_type for info in built.infolist()} == {
            zipfile.ZIP_DEFLATED if archive_format == "default" else zipfile.ZIP_STORED}
        assert {info.date_time for info in built.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert json.loads(built.read("MAR-INF/MANIFEST.json"))["createdOn"] == "01/01/1980 00:00:00"
        assert built.read("weights.pt") == weights.read_bytes()


def test_source_date_epoch_dates_the_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")  # 2026-01-01 00:00:00 UTC
    with zipfile.ZipFile(_tiny_archive(SEED / "weights.pt", tmp_path / "out").path) as built:
        assert {info.date_time for info in built.infolist()} == {(2026, 1, 1, 0, 0, 0)}
        manifest = json.loads(built.read("MAR-INF/MANIFEST.json"))
    assert manifest["createdOn"] == "01/01/2026 00:00:00"
    assert manifest["model"]["serializedFile"] == "weights.pt" and manifest["model"]["handler"] == "captioner_handler.py"
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ExportError, match="SOURCE_DATE_EPOCH='yesterday'"):
        _tiny_archive(SEED / "weights.pt", tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_a_source_date_before_1980_dates_the_archive_1980(monkeypatch):
    from export.archive import ZIP_EPOCH, source_date

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")  # a zip entry cannot hold a date before 1980-01-01
    assert source_date() == ZIP_EPOCH
    monkeypatch.setenv("SOURCE_DATE_EPOCH", str(ZIP_EPOCH + 1))
    assert source_date() == ZIP_EPOCH + 1


def test_only_python_sources_and_package_data_are_shipped(tmp_path):
    from export.archive import PACKAGE_DATA, _not_shipped

    (tmp_path / "sub").mkdir()
    names = ["engine.py", ".#engine.py", ".hidden.py", "__pycache__", "notes.txt", "engine.py~", "sub"]
    assert _not_shipped(str(tmp_path), names) == {".#engine.py", ".hidden.py", "__pycache__", "notes.txt", "engine.py~"}
    assert _not_shipped(str(tmp_path / PACKAGE_DATA), ["vocab.txt", ".DS_Store"]) == {".DS_Store"}
