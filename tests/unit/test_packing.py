"""oneDNN-packed Linear: same products as nn.Linear for every input shape the decoder uses, in
float32 everywhere and in bfloat16 where oneDNN multiplies it (AVX-512 or newer)."""

import pytest
import torch
from torch import nn

from model.packing import PackedLinear, prepack_available

pytestmark = pytest.mark.unit

ONEDNN_BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
BF16_TOLERANCE = {"rtol": 1.6e-2, "atol": 1e-2}  # two bf16 roundings of sums of 48 products


def test_this_pytorch_has_onednn():
    assert torch.backends.mkldnn.is_available()  # the CPU fast path depends on it


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (6, 48), (3, 1, 48), (2, 146, 48)])
@pytest.mark.parametrize("dtype", [
    torch.float32,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        not ONEDNN_BF16, reason="oneDNN has no bfloat16 products on this CPU (AVX2): weights stay plain here")),
])
def test_packed_linear_equals_linear(shape, bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(shape, dtype=dtype)
    with torch.inference_mode():
        expected, actual = linear(x), packed(x)
    assert actual.shape == expected.shape and actual.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else BF16_TOLERANCE
    torch.testing.assert_close(actual, expected, **tolerance)
    assert "oneDNN-packed" in repr(packed)


def test_bfloat16_is_packed_exactly_where_onednn_multiplies_it(monkeypatch):
    cpu = torch.device("cpu")
    assert prepack_available(cpu, torch.float32)
    assert prepack_available(cpu, torch.bfloat16) == ONEDNN_BF16
    with monkeypatch.context() as patch:  # a CPU without bf16 products, whatever this one has
        patch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        assert not prepack_available(cpu, torch.bfloat16) and prepack_available(cpu, torch.float32)
    assert not prepack_available(cpu, torch.float16)
    assert not prepack_available(torch.device("cuda"), torch.float32)
    if not ONEDNN_BF16:  # what the check protects against
        with pytest.raises(RuntimeError, match="bf16 path needs"):
            PackedLinear(nn.Linear(48, 80).to(torch.bfloat16))
