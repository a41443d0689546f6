"""Serving fuses each layer's q, k and v products into one and gate and up into one
(`LlamaForCausalLM.fuse_projections`, chatbot/inference/model.py): the same numbers as the
parts, with biases (Qwen2's q/k/v, Llama's attention and MLP biases), through a KV cache,
and after int8 quantisation."""

from __future__ import annotations

import copy

import pytest
import torch

from chatbot.inference import KVCache
from chatbot.inference.precision import Int8Linear, quantize_int8
from tests.fakes import tiny_model


def cached_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Prefill all but the last token into a KV cache, then decode the last one."""
    cache = KVCache(model.config, 2, 64, "cpu", torch.float32)
    slots = torch.arange(ids.shape[0])
    with torch.inference_mode():
        model(ids[:, :-1], kv_cache=cache, slots=slots)
        positions = torch.full((ids.shape[0], 1), ids.shape[1] - 1)
        return model(ids[:, -1:], positions, cache, slots)


@pytest.mark.parametrize("bias", [{}, {"qkv_bias": True}, {"attention_bias": True, "mlp_bias": True}])
def test_a_fused_model_computes_what_the_parts_did(bias: dict[str, bool]) -> None:
    model = tiny_model(seed=3, **bias)
    if bias:  # random biases, so that a bias in the wrong place would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    fused = copy.deepcopy(model).fuse_projections()
    layer = fused.model.layers[0]
    assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    assert layer.mlp.gate_up_proj is not None and not hasattr(layer.mlp, "up_proj")
    ids = torch.randint(3, 300, (2, 9))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached_logits(fused, ids), cached_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_int8_quantises_the_fused_products_row_by_row_as_it_did_the_parts() -> None:
    model = tiny_model(seed=4)
    fused = copy.deepcopy(model).fuse_projections()
    quantize_int8(model, torch.float32)
    quantize_int8(fused, torch.float32)
    parts, whole = model.model.layers[1], fused.model.layers[1]
    assert isinstance(whole.self_attn.qkv_proj, Int8Linear)
    # per-output-row scales: the fused weight's rows are the parts' rows, quantised alike
    torch.testing.assert_close(whole.mlp.gate_up_proj.qweight,
                               torch.cat([parts.mlp.gate_proj.qweight, parts.mlp.up_proj.qweight]))
    torch.testing.assert_close(whole.self_attn.qkv_proj.scales, torch.cat(
        [parts.self_attn.q_proj.scales, parts.self_attn.k_proj.scales, parts.self_attn.v_proj.scales]))
    ids = torch.randint(3, 300, (2, 7))
    with torch.inference_mode():
        torch.testing.assert_close(fused(ids), model(ids), rtol=1e-4, atol=1e-4)
