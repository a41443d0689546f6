"""Serving precision of a loaded model: fp32, bf16, or int8 weights (fp32 compute around
them on a CPU, bf16 on CUDA).

Design notes
- Decoding one token reads every weight once, so on a CPU a decode step is bound by memory
  traffic: SmolLM2-135M in fp32 streams 540 MB per step (~21 of its ~31 ms on 2 cores).
  Halving or quartering the bytes is the lever, not the arithmetic.
- `bf16`: every floating tensor (weights, activations, KV cache) in bfloat16; RMSNorm still
  reduces in fp32 and the logits come out as fp32 (model.py). PyTorch runs bf16 matmuls on
  any CPU, but only fast where oneDNN has native kernels (AVX512-BF16 or AMX; see
  `native_bf16`): elsewhere bf16 is slower than fp32, and the model logs a warning.
- `auto` is bf16 on CUDA; on a CPU, int8 where the native step is built (native.py: every
  decode step and prefill of an int8 model runs there), else fp32. A reply whose worker
  died is generated again from its pinned seed, and the text streamed before must come out
  again. The native step computes each row as it would be alone, and a prefilled token as
  it would be decoded, so a retry computes the same numbers bit for bit. Through model.py
  they move with what else shares the batch (or with a prefix taken from the cache): with
  bf16 (and model.py's int8, whose products take bf16 input) often enough that a retry
  diverged from its streamed prefix in the chaos run; with fp32 by ~1e-7, which practically
  never flips a token. So without the native step `auto` is fp32 on a CPU.
- `int8`: weight-only int8 as gpt-fast does it: every linear of the decoder and the
  lm_head stores int8 weights with one fp32-derived scale per output channel (symmetric,
  absmax / 127). On CUDA activations, norms, embeddings and the KV cache are bf16. On a CPU
  they stay fp32, and only the int8 kernel's input is converted to bf16 (it has no fast path
  for fp32: 250 against 27 us a 576x576 call) and its output back: a decode step of SmolLM2
  on 2 cores of a CPU with native bf16 (AVX512-BF16) took 22 / 55 / 146 ms at 1 / 8 / 32
  sequences this way against 26 / 73 / 216 with bf16 around the kernel, and fp32 61 / 99 /
  167 (bench/kernels.py, docs/benchmarks.md); fp32 element-wise work is also closer to the
  fp32 model. On the CPU a
  call with few rows (a decode step of up to `INT8_KERNEL_MAX_ROWS` sequences) runs
  PyTorch's int8 kernel `_weight_int8pack_mm`, which reads the int8 weights directly;
  larger calls (prefill) dequantise the weight and use a bf16 matmul (fp32 activations
  converted around it) where bf16 is native, an fp32 one elsewhere, because
  that kernel's time grows with the rows while dequantising costs the same for any number
  (one 576x1536 weight held in cache: 32 rows 349 us on the kernel, 73 us dequantised).
  In the whole model, where dequantising also streams a bf16 copy of every weight, decode
  steps up to 32 sequences were faster on the kernel: 126 against 159 ms a step at 32, 79
  against 134 ms at 16 (2 cores, SmolLM2). On CUDA it always dequantises. The tied embedding stays in the activations'
  dtype for lookups; the lm_head gets its own int8 copy (a 49152x576 head is a fifth of
  SmolLM2's weights).
- Where the native step runs (native.py: a CPU, fp32 or int8), decode steps and short
  prefills do not go through these modules at all: it reads the int8 weights itself (with
  int8 activations where the CPU has VNNI). Int8Linear computes longer prefills.
- Quality against fp32 is measured, not assumed: tests/integration/test_precision.py
  checks greedy-token agreement and held-out loss of each precision on the real model;
  bench/engine.py --precisions measures their speed.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
INT8_KERNEL_MAX_ROWS = 32


@cache
def native_bf16() -> bool:
    """True when this CPU has native bf16 matmul kernels (AVX512-BF16 or AMX) that
    oneDNN will use; asked of PyTorch itself, so a CPU that lists a feature the VM cannot
    execute (AMX here) does not count unless oneDNN agrees."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(precision: str, device: str | torch.device, native_step: bool = False) -> str:
    """`auto` -> bf16 on CUDA; on a CPU int8 where the native step is built (`native_step`),
    else fp32 (see the module notes); others checked."""
    if precision == "auto":
        if torch.device(device).type == "cuda":
            return "bf16"
        return "int8" if native_step else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + b with q int8 [out, in] and one scale per output row."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # [out]
        self.register_buffer("qweight", torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(dtype), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and rows <= INT8_KERNEL_MAX_ROWS:
            # the kernel takes bf16 only (fp32 input has no fast path): an fp32 model
            # converts around it (see `apply`)
            xk = x.reshape(rows, x.shape[-1]).to(self.scales.dtype)
            y = torch.ops.aten._weight_int8pack_mm(xk, self.qweight, self.scales)
            y = y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:  # dequantised; fp32 activations go through bf16 where bf16 is native (prefill)
            fast = torch.bfloat16 if x.dtype == torch.float32 and x.device.type == "cpu" and native_bf16() else x.dtype
            w = self.qweight.to(fast) * self.scales[:, None].to(fast)
            y = F.linear(x.to(fast), w).to(x.dtype)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every nn.Linear under `model` by an Int8Linear (a tied lm_head gets its own
    copy; the embedding it shared stays as it is); returns how many were replaced."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child, dtype))
    return len(targets)


def apply(model: nn.Module, precision: str) -> nn.Module:
    """Cast or quantise a loaded fp32 model in place for serving at `precision`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return model.float()
    if precision == "int8":
        quantize_int8(model, torch.bfloat16)  # from the fp32 weights, before they are rounded
        if next(model.parameters()).device.type == "cpu":
            # on a CPU everything but the int8 products stays fp32 (biases too): faster than
            # bf16 around them at every batch size measured, native bf16 or not (module notes)
            for module in model.modules():
                if isinstance(module, Int8Linear) and module.bias is not None:
                    module.bias.data = module.bias.data.float()
            return model
    for p in model.parameters():  # parameters only: the rotary frequencies stay fp32
        p.data = p.data.to(torch.bfloat16)
    if next(model.parameters()).device.type == "cpu" and not native_bf16():
        log.warning("this CPU has no native bf16 kernels: %s will be slower than fp32 here", precision)
    return model
