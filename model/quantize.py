"""Optional int8 weight quantization of the decoder for CPU serving.

Decoding on a CPU is bound by reading the decoder's weights every step (one image) or by their
products (a batch). `Int8Linear` holds each decoder weight as int8 with one scale per output
channel, prepacked for PyTorch's x86 (fbgemm) kernels, and multiplies 8-bit activations in
integers: half the bfloat16 weight bytes and the CPU's 8-bit dot products (AVX-512 VNNI).

Activations are quantized per row, so that a row's numbers never depend on the other rows of
its batch (README: the same captions alone or in a batch). Each row is mapped onto [-1, 1] by
its own midpoint and half-range, quantized with one fixed scale and zero point, multiplied, and
mapped back: `W x = half * (W x') + mid * W 1`. (PyTorch's dynamic quantization takes one scale
for the whole batch: with it, 2 of 18 greedy captions of the tiny model changed when batched.)

The model around it keeps its dtype (bfloat16 where the CPU has it, else float32). As an
`OpaqueLinear` (`model/packing.py`) the product also runs inside the compiled CPU decode step
(`compile_step`), where inductor fuses the row mapping into the neighbouring operators. The
numbers change (about 1% of a product's range), so it is opt-in (`cpu_quantize: int8` in the
handler settings, `--quantize int8` in `python -m bench model`) and the float32 path stays the
reference for parity. The vision encoder (compute-bound, run once per image) is left as is.
Figures: docs/benchmarks.md, nineteenth session.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .captioner import CaptionModel
from .packing import OpaqueLinear, replace_linears

QUANTIZATIONS = ("int8",)
INT8_MAX = 127
QUANTIZED_ENGINE = "x86"  # PyTorch's fbgemm-based x86 kernels
TINY = torch.finfo(torch.float32).tiny  # the least scale or half-range, for an all-zero channel or a constant row
# A row mapped onto [-1, 1] quantizes to 1..255 (zero point 128), or to 1..127 where the
# kernels need 7-bit activations (`reduce_activation_range`).
UNIT_QUANTIZATION = {False: (1 / 127, 128), True: (1 / 63, 64)}


def reduce_activation_range() -> bool:
    """Without 8-bit dot-product instructions (AVX2, AVX-512 without VNNI) the x86 kernels add
    pairs of u8 x s8 products in 16 bits, which full-range activations can saturate; there the
    activations use 7 bits (as PyTorch's `reduce_range` does)."""
    return not torch.cpu._is_vnni_supported()


def quantize_per_channel(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) float weight -> symmetric int8 per output channel (zero point 0)."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1).clamp(min=TINY) / INT8_MAX
    zero_points = torch.zeros(len(scales), dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's notice that quantized tensors are deprecated
        return torch.quantize_per_channel(weight, scales.double(), zero_points, 0, torch.qint8)


class Int8Linear(OpaqueLinear):
    """`y = x W^T + b` with W in int8 per output channel and each row of x quantized on its own."""

    def __init__(self, linear: nn.Linear, reduce_range: bool):
        super().__init__(linear)
        weight = quantize_per_channel(linear.weight)
        self.packed_params = torch.ops.quantized.linear_prepack(weight, None)
        self.register_buffer("weight_sums", weight.dequantize().sum(dim=1), persistent=False)  # W 1: (out,)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float(), persistent=False)
        self.reduce_range = reduce_range
        self.scale, self.zero_point = UNIT_QUANTIZATION[reduce_range]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In place on this layer's own float32 copies: a prefill's (1168, 6144) product is 28 MB,
        # and each fresh temporary of that size costs page faults (eager; compiled, they fuse).
        rows = x.to(torch.float32, copy=True)
        low, high = torch.aminmax(rows, dim=-1, keepdim=True)  # (..., 1) each
        mid, half = (high + low) / 2, ((high - low) / 2).clamp(min=TINY)
        y = super().forward(rows.sub_(mid).div_(half)).mul_(half).addcmul_(mid, self.weight_sums)
        return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)

    def multiply(self, unit_rows: torch.Tensor) -> torch.Tensor:
        """Rows within [-1, 1] (float32) -> their products with the int8 weight (float32)."""
        return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
            unit_rows, self.scale, self.zero_point, self.packed_params)

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 weights per channel, "
                f"{bits}-bit activations per row")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(module, Int8Linear) for module in model.modules())


def quantize_decoder(model: CaptionModel, scheme: str) -> CaptionModel:
    """Replace every `nn.Linear` of the decoder (blocks and output layer) in place (CPU only)."""
    if scheme not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization '{scheme}'; choose from {', '.join(QUANTIZATIONS)}")
    weight = model.token_embeddings.weight
    if weight.device.type != "cpu" or not weight.dtype.is_floating_point:
        raise ValueError("int8 decoder quantization needs a floating-point model on the CPU")
    if QUANTIZED_ENGINE not in torch.backends.quantized.supported_engines:
        raise ValueError(f"int8 decoder quantization needs PyTorch's {QUANTIZED_ENGINE} quantized kernels, "
                         f"which this build lacks (it has {torch.backends.quantized.supported_engines})")
    torch.backends.quantized.engine = QUANTIZED_ENGINE
    reduce_range = reduce_activation_range()
    replace_linears(model.text_transformer, lambda linear: Int8Linear(linear, reduce_range))
    return model
