"""oneDNN-prepacked Linear layers for decoding on CPU (float32, and bfloat16 where oneDNN has it).

A decode step multiplies a handful of rows (6 per image) by every decoder weight. For such
skinny products PyTorch's default CPU path (MKL sgemm on an unpacked row-major weight) is far
from the memory-bandwidth limit: on this project's AVX2 machine the 30522x768 output layer
took 36 ms for 6 rows, against 7.8 ms through oneDNN with the weight reordered once into its
blocked layout (`docs/benchmarks.md`). In bfloat16, on a CPU where oneDNN multiplies it
(AVX-512 or newer; `torch.ops.mkldnn._is_mkldnn_bf16_supported`), the same reordering took a
6-row decode step from 29 to 21 ms on an AVX-512 BF16 host (thirteenth session). Without that
support oneDNN refuses to reorder bfloat16 weights, so they stay plain there.
`prepack_decoder` swaps the decoder's `nn.Linear`s for `PackedLinear`s after loading; the
numbers change only by summation order (about 1e-4 on full-size float32 logits), and the slow
reference path (`model/reference.py`) keeps plain Linears.

torch.compile cannot trace a packed weight (an opaque oneDNN tensor), nor the fbgemm int8 weight
of `model/quantize.py`. Both layers are `OpaqueLinear`s: inside a compiled graph each is the
custom operator `caption::opaque_linear(x, key)`, which finds the layer by its key at run time,
so the engine's compiled CPU decode step (`compile_step`) keeps their products and fuses the
small operators between them.
"""

from __future__ import annotations

import ctypes
import itertools
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .captioner import CaptionModel


def prepack_available(device: torch.device, dtype: torch.dtype) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Every live OpaqueLinear by its key, for the custom operator (the layers stay owned by their model).
_LAYERS: weakref.WeakValueDictionary[int, "OpaqueLinear"] = weakref.WeakValueDictionary()
_KEYS = itertools.count()


class OpaqueLinear(nn.Module):
    """A Linear whose weight torch.compile cannot trace: eager it multiplies directly, in a
    compiled graph it is `caption::opaque_linear` (subclasses define `multiply`)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.key = next(_KEYS)
        _LAYERS[self.key] = self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return opaque_linear(x, self.key)
        return self.multiply(x)

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PackedLinear(OpaqueLinear):
    """`y = x W^T + b` with W held in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


@torch.library.custom_op("caption::opaque_linear", mutates_args=())
def opaque_linear(x: torch.Tensor, key: int) -> torch.Tensor:
    """The product of the `OpaqueLinear` with this key: what a compiled graph calls."""
    return _LAYERS[key].multiply(x)


@opaque_linear.register_fake
def _opaque_linear_shape(x: torch.Tensor, key: int) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], _LAYERS[key].out_features))


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(module, PackedLinear) for module in model.modules())


def has_opaque_linears(model: nn.Module) -> bool:
    return any(isinstance(module, OpaqueLinear) for module in model.modules())


def prepack_decoder(model: CaptionModel) -> CaptionModel:
    """Replace every `nn.Linear` of the decoder (blocks and output layer) in place."""
    weight = model.token_embeddings.weight
    if not prepack_available(weight.device, weight.dtype):
        raise ValueError("prepacked Linears need a model on the CPU, in float32 or in bfloat16 where oneDNN "
                         "supports it (AVX-512 or newer), and PyTorch built with oneDNN")
    replace_linears(model.text_transformer, PackedLinear)
    return model


def replace_linears(module: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> None:
    """Swap every `nn.Linear` under `module` for `make(linear)`, in place, and give the freed
    weights' memory back."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, make(child))
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand the replaced float32 weights' pages back to the OS. glibc keeps freed heap memory
    for reuse; without this a worker's RSS stayed ~350 MiB higher (1352 vs 1003 MiB measured)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
