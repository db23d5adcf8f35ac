"""`auto` precision: bfloat16 on CPUs that multiply it in hardware, float32 on the others."""

import pytest
import torch

from model import precision
from model.precision import resolve_dtype
from tests.conftest import cpu_flags

pytestmark = pytest.mark.unit

CPU = torch.device("cpu")


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16)])
def test_auto_on_cpu_follows_native_bfloat16(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("auto", CPU) == expected
    assert resolve_dtype("auto", "cpu") == expected


def test_auto_on_this_cpu_follows_its_own_flags():
    """The hosts differ (the project's first AVX2-only host, later an AVX-512 BF16 one): what
    auto picks here agrees with the kernel's CPU flags, read independently of PyTorch."""
    native = bool(cpu_flags() & {"avx512_bf16", "amx_tile"})
    assert precision.cpu_has_native_bfloat16() == native
    assert resolve_dtype("auto", CPU) == (torch.bfloat16 if native else torch.float32)


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_explicit_names_are_kept_whatever_the_cpu(monkeypatch, name):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_dtype(name, CPU) == getattr(torch, name)


def test_auto_picks_bfloat16_on_a_cpu_that_multiplies_it(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bfloat16", lambda: True)
    assert resolve_dtype("auto", CPU) == torch.bfloat16


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'int8'.*auto"):
        resolve_dtype("int8", CPU)
