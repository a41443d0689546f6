"""Rotary position embeddings as Hugging Face Llama computes them.

Design notes
- The "rotate_half" layout: a head's dimension i is rotated with dimension i + d/2 (HF
  checkpoints have their q/k weights permuted for that layout; llama.cpp's interleaved
  pairs are undone at conversion, gguf_reader.py). The angle of position p in pair i is
  p * inv_freq[i], inv_freq[i] = theta^(-2i/d), computed in float64 then cast to fp32.
- Scaling (`rope_scaling`): "linear" divides every frequency by `factor` (positions /
  factor); "llama3" (Llama 3.1/3.2) divides the low frequencies by `factor`, keeps the
  high ones and interpolates the band between. Every other type is refused
  (`UnsupportedCheckpoint`), as is a type without the parameters it needs.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from chatbot.inference.checkpoint import UnsupportedCheckpoint

__all__ = ["ROPE_TYPES", "rope_inv_freq", "rope_type", "rotate_half"]

ROPE_TYPES = ("default", "linear", "llama3")


def rope_type(scaling: dict[str, Any] | None) -> str:
    """The rope_scaling type, once it is one we implement with the parameters it needs."""
    scaling = scaling or {}
    kind = scaling.get("rope_type", scaling.get("type")) or "default"
    if kind not in ROPE_TYPES:
        raise UnsupportedCheckpoint(
            f"rope_scaling type {kind!r} is not implemented (implemented: {', '.join(ROPE_TYPES)})"
        )
    needs = {"linear": ("factor",), "llama3": ("factor", "original_max_position_embeddings")}.get(kind, ())
    absent = [k for k in needs if scaling.get(k) is None]
    if absent:
        raise UnsupportedCheckpoint(f"rope_scaling type {kind!r} lacks {', '.join(absent)}")
    return kind


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> torch.Tensor:
    """[head_dim / 2] fp32: the inverse frequency of each rotated pair (a config's
    `head_dim`, `rope_theta` and `rope_scaling`)."""
    dim = head_dim
    inv_freq = 1.0 / (rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = rope_scaling or {}
    kind = rope_type(scaling)
    if kind == "linear":
        # position interpolation: every frequency divided by `factor` (positions / factor)
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1 frequency-dependent scaling: low frequencies are divided by `factor`,
        # high frequencies kept, and the band between interpolated smoothly.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return inv_freq.float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
