"""Optional int8 weight quantization of the decoder for CPU serving.

Decoding on a CPU is bound by reading the decoder's 115M weights every step; dynamic int8
quantization (int8 weights, activations quantized per call, fbgemm kernels) reads a quarter
of the float32 bytes. It changes the numbers slightly, so it is opt-in (`quantize: int8` in the
handler settings, `--quantize int8` in the CLI and benchmarks) and the float32 path stays the
reference for parity. The vision encoder (compute-bound, run once per image) is left as is.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .captioner import CaptionModel

QUANTIZATIONS = ("int8",)


def quantize_decoder(model: CaptionModel, scheme: str) -> CaptionModel:
    """Replace the decoder's Linear layers by dynamically quantized ones, in place (CPU only)."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization '{scheme}'; choose from {', '.join(QUANTIZATIONS)}")
    if model.token_embeddings.weight.device.type != "cpu" or model.token_embeddings.weight.dtype != torch.float32:
        raise ValueError("int8 decoder quantization needs a float32 model on the CPU")
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantize_dynamic(model.text_transformer, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model
