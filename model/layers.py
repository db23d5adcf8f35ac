"""Decoder building blocks of the seed: RoPE helpers, QK-normed self-attention, SwiGLU, blocks.

Module and parameter names follow the seed checkpoint exactly
(`decoder_blocks.N.self_attention.{pre_norm,q_proj,k_proj,v_proj,q_norm,k_norm,proj}`,
`decoder_blocks.N.feed_forward.{pre_norm,feature,gate,proj}`, `decoder_blocks.N.ffn_norm`).

Attention does not own its key/value storage: each call receives a `kv` object whose
`attend(layer, q, k, v, mask)` stores the new keys/values and attends over what the queries see.
The engine passes different ones for prefix prefill, per-style prefill and decode steps
(see `model/kv_cache.py`); `kv=None` attends over the call's own positions only.

After loading, `model/fusion.py` may merge q/k/v and feature/gate into single Linears, and
q_norm/k_norm into one weight; the blocks run either form. Fused, queries and keys are normed
and rotated together, in one pass: fewer eager operators on CPU, and one fused loop (a GPU
kernel) fewer per layer in a compiled step (`docs/benchmarks.md`, ninth session).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import CaptionConfig


def rope_tables(head_dim: int, max_len: int, base: float, rounding: str = "float32"):
    """cos/sin tables (max_len, head_dim // 2), rounded through `rounding`, stored in float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    rounded = getattr(torch, rounding)
    return angles.cos().to(rounded).float(), angles.sin().to(rounded).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1) of x (..., hd) by cos/sin broadcastable to (..., hd/2):
    (T, hd/2) for x (B, H, T, hd)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., hd) -> (..., hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def norm_heads(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMS-normalise each head vector of x (..., hd), times `weight` broadcast to x: what
    `nn.RMSNorm(hd)` computes for one weight (float32 arithmetic and float32's eps for any
    input dtype, rounded back to x's dtype), for queries and keys in one call."""
    return (F.rms_norm(x.float(), x.shape[-1:]) * weight).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        dim, self.num_heads, self.head_dim = config.embed_dim, config.num_heads, config.head_dim
        self.pre_norm = nn.RMSNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)
        # Set by `model/fusion.py`: q, k and v in one Linear; q_norm's and k_norm's weights (2, 1, hd).
        self.qkv_proj: nn.Linear | None = None
        self.qk_norm: nn.Parameter | None = None

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, T, D) -> (B, H, T, hd)

    def _separate_qkv(self, h, cos, sin):
        """The checkpoint's layers: three projections, two norms, two rotations."""
        q, k, v = (self._heads(linear(h)) for linear in (self.q_proj, self.k_proj, self.v_proj))
        return apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin), v

    def _fused_qkv(self, h, cos, sin):
        """One projection, then queries and keys normed and rotated together."""
        qkv = self.qkv_proj(h).unflatten(-1, (3, self.num_heads, self.head_dim))  # (B, T, 3D) -> (B, T, 3, H, hd)
        qk = apply_rope(norm_heads(qkv[:, :, :2], self.qk_norm), cos[:, None, None], sin[:, None, None])
        q, k = qk.permute(2, 0, 3, 1, 4).unbind(0)  # (B, T, 2, H, hd) -> 2 x (B, H, T, hd)
        return q, k, qkv[:, :, 2].transpose(1, 2)  # v: (B, T, H, hd) -> (B, H, T, hd)

    def forward(self, x, cos, sin, mask=None, kv=None, layer: int = 0):
        project = self._separate_qkv if self.qkv_proj is None else self._fused_qkv
        q, k, v = project(self.pre_norm(x), cos, sin)
        if kv is None:
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            context = kv.attend(layer, q, k, v, mask)
        return x + self.proj(context.transpose(1, 2).flatten(2))  # (B, H, T, hd) -> (B, T, D)


class FeedForward(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        dim, hidden = config.embed_dim, config.embed_dim * config.ffn_multiplier
        self.pre_norm = nn.RMSNorm(dim)
        self.feature = nn.Linear(dim, hidden)
        self.gate = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)
        self.feature_gate: nn.Linear | None = None  # feature and gate in one Linear (`model/fusion.py`)

    def _feature_and_gate(self, h: torch.Tensor):
        if self.feature_gate is None:
            return self.feature(h), self.gate(h)
        return self.feature_gate(h).chunk(2, dim=-1)  # (B, T, 2F) -> 2 x (B, T, F)

    def forward(self, x):
        feature, gate = self._feature_and_gate(self.pre_norm(x))
        return x + self.proj(F.silu(feature) * gate)


class DecoderBlock(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.self_attention = SelfAttention(config)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = nn.RMSNorm(config.embed_dim)  # in the checkpoint, unused by the seed

    def forward(self, x, cos, sin, mask=None, kv=None, layer: int = 0):
        return self.feed_forward(self.self_attention(x, cos, sin, mask, kv, layer))


class DecoderTransformer(nn.Module):
    def __init__(self, config: CaptionConfig):
        super().__init__()
        self.decoder_blocks = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.final_norm = nn.RMSNorm(config.embed_dim)
        self.output = nn.Linear(config.embed_dim, config.output_size)

    def forward(self, x, cos, sin, mask=None, kv=None):
        """Hidden states after every block (no final norm / output: prefix prefill needs no logits)."""
        for layer, block in enumerate(self.decoder_blocks):
            x = block(x, cos, sin, mask, kv, layer)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(self.final_norm(hidden))
