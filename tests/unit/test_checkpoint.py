"""Checkpoint loading: the full-size layout, both backbone key layouts, and clear failures."""

import json

import pytest
import torch

from model.checkpoint import CheckpointError, expected_shapes, load_model, load_state_dict
from model.config import PRESETS, CaptionConfig
from tests.conftest import REPO, SEED_TINY

pytestmark = pytest.mark.unit
MANIFEST = json.loads((REPO / "weights" / "manifest.json").read_text())


def test_full_size_model_matches_the_manifest():
    shapes = expected_shapes(PRESETS["seed-full"])
    assert shapes == {k: tuple(v) for k, v in MANIFEST["keys"].items()}
    assert sum(torch.Size(s).numel() for s in shapes.values()) == MANIFEST["num_parameters"] == 169_498_554
    assert CaptionConfig.from_dict(MANIFEST["config"]) == PRESETS["seed-full"]


def test_full_size_random_checkpoint_loads(tmp_path):
    path = tmp_path / "random.pt"
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=generator).to(torch.bfloat16) * 0.02 for k, v in MANIFEST["keys"].items()}
    torch.save(state, path)
    del state
    loaded = load_state_dict(path, PRESETS["seed-full"])
    assert {k: list(v.shape) for k, v in loaded.items()} == MANIFEST["keys"]
    assert {v.dtype for v in loaded.values()} == {torch.bfloat16}


def test_transformers4_backbone_keys_are_accepted(tmp_path):
    state = torch.load(SEED_TINY / "weights.pt", weights_only=True)
    renamed = {k.replace("backbone.model.layer.", "backbone.layer."): v for k, v in state.items()}
    assert renamed.keys() != state.keys()
    torch.save(renamed, tmp_path / "v4.pt")
    config = CaptionConfig.from_json(SEED_TINY / "config.json")
    model = load_model(tmp_path / "v4.pt", config)
    assert torch.equal(model.vision_encoder.backbone.model.layer[0].norm1.weight,
                       state["vision_encoder.backbone.model.layer.0.norm1.weight"].float())


def test_marker_embeddings_come_from_the_checkpoint():
    state = torch.load(SEED_TINY / "weights.pt", weights_only=True)
    model = load_model(SEED_TINY / "weights.pt", CaptionConfig.from_json(SEED_TINY / "config.json"))
    prefix = model.prefix_embeddings(torch.zeros(1, 4, 64))
    assert torch.equal(prefix[0, 0], state["token_embeddings.weight"][30522].float())
    assert torch.equal(prefix[0, -1], state["token_embeddings.weight"][30523].float())


def test_rope_tables_stay_float32_when_the_model_is_cast():
    """The tables are rounded once, as the config says (the seed's bfloat16), and keep that exact
    float32 value whatever dtype the weights take: a float32-table config keeps every bit."""
    import dataclasses

    from model.captioner import CaptionModel
    from model.layers import rope_tables

    config = dataclasses.replace(PRESETS["seed-tiny"], rope_table_dtype="float32")
    model = CaptionModel(config).to(torch.bfloat16)
    cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_base, "float32")
    assert model.rope_cos.dtype == model.rope_sin.dtype == torch.float32
    assert torch.equal(model.rope_cos, cos) and torch.equal(model.rope_sin, sin)
    assert not torch.equal(cos, cos.bfloat16().float())  # so a bfloat16 cast would have shown


def test_truncated_file(tmp_path):
    data = (SEED_TINY / "weights.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_state_dict(tmp_path / "cut.pt", PRESETS["seed-tiny"])


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint in torch.save's zip format"):
        load_state_dict(tmp_path / "text.pt", PRESETS["seed-tiny"])
    (tmp_path / "pointer.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 3\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer file"):
        load_state_dict(tmp_path / "pointer.pt", PRESETS["seed-tiny"])
    data = (SEED_TINY / "weights.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_state_dict(tmp_path / "cut.pt", PRESETS["seed-tiny"])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict(tmp_path / "list.pt", PRESETS["seed-tiny"])
    with pytest.raises(CheckpointError, match="does not exist"):
        load_state_dict(tmp_path / "missing.pt", PRESETS["seed-tiny"])


def test_wrong_shape_missing_and_unexpected_keys_are_named(tmp_path):
    state = torch.load(SEED_TINY / "weights.pt", weights_only=True)
    state["text_transformer.output.bias"] = torch.zeros(7)
    del state["text_transformer.final_norm.weight"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as error:
        load_state_dict(tmp_path / "bad.pt", CaptionConfig.from_json(SEED_TINY / "config.json"))
    message = str(error.value)
    assert "text_transformer.output.bias is (7,), expected (30522,)" in message
    assert "missing key(s): text_transformer.final_norm.weight" in message
    assert "unexpected key(s): extra.weight" in message


def test_a_long_list_of_keys_is_cut_and_counted(tmp_path):
    state = torch.load(SEED_TINY / "weights.pt", weights_only=True)
    state.update({f"extra.{k:02d}": torch.zeros(1) for k in range(20)})
    torch.save(state, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"20 unexpected key\(s\): extra.00, .*, extra.07 \.\.\. and 12 more"):
        load_state_dict(tmp_path / "extra.pt", CaptionConfig.from_json(SEED_TINY / "config.json"))


def test_full_size_checkpoint_against_tiny_config_fails(tmp_path):
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_state_dict(SEED_TINY / "weights.pt", PRESETS["seed-full"])


def test_checkpoints_are_read_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(CheckpointError, match="objects other than tensors and was refused unread: Unsupported global"):
        load_state_dict(tmp_path / "evil.pt", PRESETS["seed-tiny"])


def test_any_failure_inside_the_unpickler_is_a_checkpoint_error(tmp_path, monkeypatch):
    """Corrupt bytes inside data.pkl fail as KeyError, TypeError, IndexError ... in torch.load."""
    for error in (KeyError("storages"), TypeError("bad"), IndexError("out of range")):
        def corrupt(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(torch, "load", corrupt)
        with pytest.raises(CheckpointError, match=f"truncated or corrupt.*{type(error).__name__}"):
            load_state_dict(SEED_TINY / "weights.pt", PRESETS["seed-tiny"])


@pytest.mark.parametrize("change, named", [
    (lambda t: t.to(torch.int8), "int8, strided"),
    (lambda t: t.to(torch.float64), "float64, strided"),
    (lambda t: t.to_sparse(), "bfloat16, sparse_coo"),
])
def test_weights_that_are_not_dense_floats_are_refused_by_name(tmp_path, change, named):
    """Such files pass a shape check, then fail in the worker (an int8 weight cannot be a
    Parameter) or load as something else (a sparse weight)."""
    state = torch.load(SEED_TINY / "weights.pt", weights_only=True)
    state["text_transformer.output.bias"] = change(state["text_transformer.output.bias"])
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=rf"1 key\(s\) not dense floating-point.*text_transformer.output.bias \({named}"):
        load_state_dict(tmp_path / "odd.pt", PRESETS["seed-tiny"])


@pytest.mark.parametrize("raw, message", [
    ({"depth": 2, "colour": 1}, "unknown model config fields: ['colour']"),
    ({"vision": {"rope_thetaa": 100.0}}, "unknown model config vision fields: ['rope_thetaa']"),
    ({"vision": [1, 2]}, "model config vision must be a JSON object, got list"),
    ([1], "model config must be a JSON object, got list"),
    # sizes a worker would only trip over at load or at the first image (export used to pass them)
    ({"image_size": 80}, "image_size 80 must be a multiple of 32"),
    ({"embed_dim": "64"}, "field 'embed_dim' must be a JSON int, got '64'"),
    ({"depth": True}, "field 'depth' must be a JSON int, got True"),  # Python's bool is an int
    ({"num_heads": 0}, "field 'num_heads' must be positive"),
    ({"embed_dim": 60, "num_heads": 4}, "embed_dim 60 must split into num_heads 4 heads of an even size"),
    ({"vision": {"num_attention_heads": 5}}, "vision hidden_size 384 must divide by its num_attention_heads 5"),
    ({"vision": {"use_gated_mlp": 1}}, "vision field 'use_gated_mlp' must be a JSON bool, got 1"),
    ({"rope_table_dtype": "int8"}, "rope_table_dtype must be bfloat16, float16 or float32"),
])
def test_bad_config_fields_are_value_errors_naming_them(tmp_path, raw, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as error:
        CaptionConfig.from_json(path)
    assert message in str(error.value)
