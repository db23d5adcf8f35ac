"""A full-size RANDOM-INIT checkpoint in exactly the official format, for smoke tests.

It has the same 436 keys and shapes as the official ``weights.pt`` (taken from
``weights/manifest.json``), bfloat16 tensors, saved as a plain state dict with
``torch.save``. It exercises loading, memory, batching and speed realistically, but it
was never trained: **its captions are nonsense**. The default file name,
``random-init-weights.pt``, says so.

The model is not instantiated: each tensor is initialised from its key name and shape by
the rules below, one tensor at a time in float32 and then cast, so the peak memory is the
bfloat16 result (about 339 MB) plus the largest float32 tensor (about 94 MB).

Initialisation (following the usual ViT / decoder training init, chosen to give
well-scaled activations):

===========================================  ==========================================
key pattern                                  init
===========================================  ==========================================
``*.lambda1`` (DINOv3 layer scale)           1.0
``*.bias``                                   0
1-D ``*.weight`` (LayerNorm / RMSNorm scale) 1.0
``token_embeddings.weight``                  normal(0, 1): nn.Embedding's default; its
                                             RMS of 1 matches the image tokens, which
                                             leave ``vision_encoder.norm`` (RMSNorm)
                                             with RMS 1
``cls_token``, ``register_tokens``,          trunc_normal(std 0.02)
``mask_token``
other ``*.weight`` (Linear, patch Conv2d)    trunc_normal(std 0.02, cut at +-2 std)
===========================================  ==========================================
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from . import DEFAULT_RANDOM_OUTPUT, load_manifest

WARNING = (
    "WARNING: this is a RANDOM-INIT checkpoint with the official format and size. "
    "It was never trained and produces nonsense captions: use it for smoke tests, "
    "load tests and packaging only."
)
INIT_STD = 0.02
EMBEDDING_STD = 1.0
_TOKEN_SUFFIXES = ("cls_token", "register_tokens", "mask_token")


def init_rule(key: str, shape: tuple[int, ...]) -> tuple[str, float]:
    """``(kind, value)`` for one key: ``("const", v)``, ``("normal", std)`` or ``("trunc_normal", std)``."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "lambda1":
        return "const", 1.0
    if leaf == "bias":
        return "const", 0.0
    if leaf in _TOKEN_SUFFIXES:
        return "trunc_normal", INIT_STD
    if leaf == "weight" and len(shape) == 1:
        return "const", 1.0
    if key == "token_embeddings.weight":
        return "normal", EMBEDDING_STD
    if leaf == "weight" and len(shape) >= 2:
        return "trunc_normal", INIT_STD
    raise ValueError(f"no init rule for {key} {list(shape)}: extend weights/random_init.py")


def _trunc_normal_(t: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Normal(0, std) truncated to +-2 std, by redrawing the values outside (rejection).

    Exactly the truncated distribution, and several times faster on CPU than
    ``torch.nn.init.trunc_normal_`` (whose erfinv dominates a 169M-value checkpoint).
    """
    flat = t.view(-1).normal_(0.0, std, generator=generator)
    outside = (flat.abs() > 2 * std).nonzero().squeeze(1)
    while outside.numel():
        flat[outside] = torch.empty(outside.numel()).normal_(0.0, std, generator=generator)
        outside = outside[(flat[outside].abs() > 2 * std).nonzero().squeeze(1)]


def build_state_dict(seed: int = 0, manifest: dict | None = None) -> dict[str, torch.Tensor]:
    """The random state dict, in manifest key order, with the manifest's dtype."""
    manifest = manifest or load_manifest()
    dtype = getattr(torch, manifest.get("dtype", "bfloat16"))
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in manifest["keys"].items():
        shape = tuple(shape)
        kind, value = init_rule(key, shape)
        if kind == "const":
            state[key] = torch.full(shape, value, dtype=dtype)
            continue
        t = torch.empty(shape, dtype=torch.float32)
        if kind == "normal":
            t.normal_(0.0, value, generator=generator)
        else:
            _trunc_normal_(t, value, generator)
        state[key] = t.to(dtype)
        del t
    return state


def num_parameters(state: dict[str, torch.Tensor]) -> int:
    return sum(math.prod(t.shape) for t in state.values())


def write_random_checkpoint(output: str | os.PathLike[str] = DEFAULT_RANDOM_OUTPUT, seed: int = 0) -> Path:
    """Write the checkpoint atomically (``.part`` then rename) and return its path."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(output.name + ".part")
    state = build_state_dict(seed)
    expected = load_manifest().get("num_parameters")
    if expected is not None and num_parameters(state) != expected:
        raise AssertionError(f"built {num_parameters(state):,} parameters, manifest says {expected:,}")
    try:
        torch.save(state, part)
        os.replace(part, output)
    finally:
        part.unlink(missing_ok=True)
    return output
