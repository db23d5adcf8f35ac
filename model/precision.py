"""Floating-point type names, and "auto": the type a device runs the model fastest in.

On CUDA that is bfloat16 (tensor cores, half float32's memory traffic) wherever the card
supports it. On a CPU it depends on the instruction set: with AVX-512 BF16 or AMX, oneDNN
multiplies bfloat16 matrices in hardware, at half the bytes of float32 per weight (the speed
issue's reference host: the seed took about 7 s per image in bf16, 15 s in float32). Without
them bfloat16 products are emulated and slower than float32: on this project's AVX2 host the
6-row output layer took 214 ms in bf16 against 67 ms in float32 (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

AUTO = "auto"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = (AUTO, *DTYPES)


def cpu_has_native_bfloat16() -> bool:
    """AVX-512 BF16 or AMX tiles: bfloat16 matrix products in hardware."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def fastest_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bfloat16() else torch.float32


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`name` ("auto" or a key of DTYPES) as the torch dtype to load the model in on `device`."""
    if name == AUTO:
        return fastest_dtype(torch.device(device))
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {list(DTYPE_CHOICES)}")
    return DTYPES[name]
