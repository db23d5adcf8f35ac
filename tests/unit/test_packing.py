"""oneDNN-packed Linear: same products as nn.Linear for every input shape the decoder uses."""

import pytest
import torch
from torch import nn

from model.packing import PackedLinear

pytestmark = pytest.mark.unit


def test_this_pytorch_has_onednn():
    assert torch.backends.mkldnn.is_available()  # the CPU fast path depends on it


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 48), (6, 48), (3, 1, 48), (2, 146, 48)])
def test_packed_linear_equals_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(shape)
    with torch.inference_mode():
        expected, actual = linear(x), packed(x)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert "oneDNN-packed" in repr(packed)
