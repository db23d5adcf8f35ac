"""Merge the decoder's parallel projections into single Linears, after loading.

The checkpoint keeps the seed's separate `q_proj`/`k_proj`/`v_proj` and `feature`/`gate`
weights. A decode step multiplies a few rows by each of them, and on a GPU each product is one
kernel whose fixed cost outweighs its work: fused, a step runs 36 fewer kernels. Measured on
an H100 (12 layers in one CUDA graph, bf16, 64 rows): q/k/v 0.149 -> 0.060 ms, feature/gate
0.130 -> 0.088 ms (`docs/benchmarks.md`). Each output column is still the dot product of the
same weights, so only the library's summation order can differ. The two head norms' weights
are stacked so that queries and keys are normed and rotated in one pass (`model/layers.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from .captioner import CaptionModel


def merged_linear(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of `linears`' outputs."""
    first = linears[0]
    has_bias = first.bias is not None
    merged = nn.Linear(first.in_features, sum(linear.out_features for linear in linears), bias=has_bias,
                       device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([linear.weight for linear in linears]))
        if has_bias:
            merged.bias.copy_(torch.cat([linear.bias for linear in linears]))
    return merged.requires_grad_(False)


def is_fused(model: CaptionModel) -> bool:
    return all(block.self_attention.qkv_proj is not None for block in model.text_transformer.decoder_blocks)


def stacked_norm_weight(norms: list[nn.RMSNorm]) -> nn.Parameter:
    """(len(norms), 1, hd): one weight per norm, broadcast over the heads each norms."""
    return nn.Parameter(torch.stack([norm.weight.detach() for norm in norms])[:, None], requires_grad=False)


def fuse_projections(model: CaptionModel) -> CaptionModel:
    """In place: each block's q/k/v, and feature/gate, become one Linear, and q_norm/k_norm one
    weight; the originals are dropped."""
    if is_fused(model):
        return model
    for block in model.text_transformer.decoder_blocks:
        attention, feed_forward = block.self_attention, block.feed_forward
        attention.qkv_proj = merged_linear([attention.q_proj, attention.k_proj, attention.v_proj])
        attention.qk_norm = stacked_norm_weight([attention.q_norm, attention.k_norm])
        feed_forward.feature_gate = merged_linear([feed_forward.feature, feed_forward.gate])
        del attention.q_proj, attention.k_proj, attention.v_proj, attention.q_norm, attention.k_norm
        del feed_forward.feature, feed_forward.gate
    return model
