"""Fused q/k/v and feature/gate Linears, and the stacked head norms, compute what the checkpoint's
separate layers do."""

import pytest
import torch
from torch import nn

from model.captioner import CaptionModel
from model.config import PRESETS
from model.fusion import fuse_projections, is_fused
from model.layers import norm_heads

pytestmark = pytest.mark.unit


def linear_names(model: CaptionModel) -> set[str]:
    block = model.text_transformer.decoder_blocks[0]
    return {name for name, module in block.named_modules() if isinstance(module, nn.Linear)}


def test_fused_decoder_matches_separate_projections():
    torch.manual_seed(0)
    config = PRESETS["seed-tiny"]
    separate = CaptionModel(config).eval()
    with torch.no_grad():  # distinct head-norm weights: a swapped q/k norm must show
        for name, param in separate.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)
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
    attention = model.text_transformer.decoder_blocks[0].self_attention
    assert not hasattr(attention, "q_norm") and attention.qk_norm.shape == (2, 1, PRESETS["seed-tiny"].head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_heads_is_each_rmsnorm_bit_for_bit(dtype):
    """Queries and keys normed in one call equal q_norm and k_norm applied apart, in the seed's
    bf16 too (where nn.RMSNorm uses float32's eps and rounds once, after the weight)."""
    torch.manual_seed(0)
    q_norm, k_norm = nn.RMSNorm(64), nn.RMSNorm(64)
    with torch.no_grad():
        q_norm.weight.normal_(1, 0.5)
        k_norm.weight.normal_(1, 0.5)
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    qk = torch.randn(3, 5, 2, 4, 64).to(dtype)  # (B, T, q|k, H, hd)
    weight = torch.stack((q_norm.weight, k_norm.weight))[:, None]
    with torch.no_grad():
        both = norm_heads(qk, weight)
        assert torch.equal(both[:, :, 0], q_norm(qk[:, :, 0])) and torch.equal(both[:, :, 1], k_norm(qk[:, :, 1]))
