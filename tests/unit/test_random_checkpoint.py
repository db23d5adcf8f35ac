"""`python -m weights random`: a full-size random-init checkpoint in the official format.

The checkpoint (339 MB) is written once per module to pytest's tmp dir and read back with
`mmap=True`; the whole module takes a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from weights import __main__ as cli
from weights import load_manifest, manifest_mismatches
from weights.random_init import build_state_dict, init_rule, write_random_checkpoint

pytestmark = pytest.mark.unit

MANIFEST = load_manifest()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("random") / "random-init-weights.pt", seed=0)
    return path, torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def test_every_manifest_key_and_shape_in_bfloat16(checkpoint):
    path, state = checkpoint
    assert type(state) is dict  # a plain state dict, like the official file
    assert list(state) == list(MANIFEST["keys"])  # same keys, same order
    assert len(state) == 436
    assert manifest_mismatches({k: tuple(v.shape) for k, v in state.items()}) == []
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert not path.with_name(path.name + ".part").exists()


def test_parameter_count_is_the_seed_models(checkpoint):
    _, state = checkpoint
    assert sum(math.prod(v.shape) for v in state.values()) == 169_498_554 == MANIFEST["num_parameters"]


def test_file_size_is_close_to_the_official_files(checkpoint):
    path, _ = checkpoint
    official = MANIFEST["original_file"]["size_bytes"]
    assert abs(path.stat().st_size - official) < 0.001 * official


def test_init_values_follow_the_documented_rules(checkpoint):
    _, state = checkpoint
    ones = ["vision_encoder.backbone.model.layer.0.layer_scale1.lambda1", "vision_encoder.proj.0.weight",
            "vision_encoder.norm.weight", "text_transformer.decoder_blocks.3.self_attention.q_norm.weight",
            "text_transformer.final_norm.weight", "vision_encoder.backbone.model.layer.11.norm2.weight"]
    for key in ones:
        assert torch.all(state[key] == 1), key
    for key in ["vision_encoder.backbone.model.layer.0.norm1.bias", "text_transformer.output.bias",
                "vision_encoder.backbone.embeddings.patch_embeddings.bias"]:
        assert torch.all(state[key] == 0), key
    out = state["text_transformer.output.weight"].float()
    assert out.abs().max() <= 0.0401 and 0.015 < out.std() < 0.02  # trunc_normal(0.02) at +-2 std
    emb = state["token_embeddings.weight"].float()
    assert 0.98 < emb.std() < 1.02
    cls = state["vision_encoder.backbone.embeddings.cls_token"].float()
    assert 0 < cls.abs().max() <= 0.0401


def test_seed_makes_it_reproducible():
    small = {"keys": {"a.weight": [64, 32], "token_embeddings.weight": [10, 4], "a.bias": [64]}, "dtype": "bfloat16"}
    first, again, other = (build_state_dict(s, small) for s in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["a.weight"], other["a.weight"])


def test_unknown_key_pattern_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match="no init rule"):
        init_rule("something.new", (3, 3, 3))


def test_cli_prints_the_nonsense_warning(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr("weights.random_init.write_random_checkpoint",
                        lambda output, seed: written.append((output, seed)) or _touch(output))
    assert cli.main(["random", "--output", str(tmp_path / "r.pt"), "--seed", "3"]) == 0
    assert written == [(tmp_path / "r.pt", 3)]
    assert "RANDOM-INIT" in capsys.readouterr().err


def test_cli_never_replaces_an_existing_file_without_force(tmp_path, monkeypatch, capsys):
    written = []
    monkeypatch.setattr("weights.random_init.write_random_checkpoint",
                        lambda output, seed: written.append((output, seed)) or _touch(output))
    official = tmp_path / "weights.pt"
    official.write_bytes(b"the official checkpoint")
    assert cli.main(["random", "--output", str(official)]) == cli.EXIT_FAILED
    assert "exists; pass --force" in capsys.readouterr().err
    assert official.read_bytes() == b"the official checkpoint" and written == []
    assert cli.main(["random", "--output", str(official), "--force"]) == 0
    assert written == [(official, 0)] and official.read_bytes() == b""


def _touch(path):
    path.write_bytes(b"")
    return path
