"""Int8 weight-only linears (chatbot/inference/precision.py) on random weights: both kernel
paths (few rows: PyTorch's int8 kernel; many rows: dequantised) compute the layer, for bf16
activations and for fp32 ones (on a CPU the rest of an int8 model stays fp32)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from chatbot.inference.engine import in_passing_thread
from chatbot.inference.precision import INT8_KERNEL_MAX_ROWS, Int8Linear, apply
from tests.fakes import tiny_model


@pytest.mark.parametrize("rows", [1, INT8_KERNEL_MAX_ROWS, INT8_KERNEL_MAX_ROWS + 5])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_linear_matches_the_float_layer(rows: int, bias: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=bias)
    q = Int8Linear(linear)
    x = torch.randn(rows, 64)
    with torch.inference_mode():
        want = linear(x)
        out = in_passing_thread(lambda: q(x.to(dtype)))
    assert out.dtype == dtype, "the output keeps the activations' dtype"
    got = out.float()
    assert got.shape == want.shape
    # int8 rounding (absmax/127 per row) and bf16 activations: ~1% of the output scale
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_apply_quantises_every_linear_and_keeps_rotary_in_fp32() -> None:
    model = apply(tiny_model(), "int8")
    assert not [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert model.inv_freq.dtype == torch.float32
    # on a CPU the activations stay fp32 around the int8 products
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        logits = in_passing_thread(lambda: model(ids))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="precision must be"):
        apply(tiny_model(), "int4")
