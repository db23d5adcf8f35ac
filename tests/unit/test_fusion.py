"""Fused q/k/v and feature/gate Linears compute what the checkpoint's separate ones do."""

import pytest
import torch
from torch import nn

from model.captioner import CaptionModel
from model.config import PRESETS
from model.fusion import fuse_projections, is_fused

pytestmark = pytest.mark.unit


def linear_names(model: CaptionModel) -> set[str]:
    block = model.text_transformer.decoder_blocks[0]
    return {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def test_fused_decoder_matches_separate_projections():
    torch.manual_seed(0)
    config = PRESETS["seed-tiny"]
    separate = CaptionModel(config).eval()
    fused = CaptionModel(config).eval()
    fused.load_state_dict(separate.state_dict())
    fuse_projections(fused)
    x = torch.randn(3, 7, config.embed_dim)
    cos, sin = separate.rope(torch.arange(7))
    mask = torch.ones(7, 7, dtype=torch.bool).tril()
    with torch.no_grad():
        expected = separate.text_transformer(x, cos, sin, mask)
        got = fused.text_transformer(x, cos, sin, mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert is_fused(fused) and not is_fused(separate)


def test_fusion_replaces_the_separate_linears():
    model = fuse_projections(CaptionModel(PRESETS["seed-tiny"]))
    assert linear_names(model) == {"self_attention.qkv_proj", "self_attention.proj", "feed_forward.feature_gate",
                                   "feed_forward.proj"}
    before = sum(p.numel() for p in CaptionModel(PRESETS["seed-tiny"]).parameters())
    assert sum(p.numel() for p in model.parameters()) == before  # moved, not copied
    assert fuse_projections(model) is model and linear_names(model) == linear_names(fuse_projections(model))
