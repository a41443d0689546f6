"""Read a llama.cpp GGUF file of a Llama model: its metadata as a Hugging Face
`config.json` dict, its tensors as an HF state dict of float32 numpy arrays.
gguf_convert.py writes them (and the tokenizer it rebuilds) into an HF layout folder.

Design notes
- Everything comes from the file's metadata (`llama.*`): layer count, widths, heads,
  rope base, norm epsilon, context length, vocabulary size, special token ids. Nothing
  model-specific is hard-coded, so another small llama-architecture GGUF converts too.
  What cannot be converted faithfully is refused with a ValueError naming the missing
  piece (another architecture, rope scaling, an unknown tensor, a tensor of the wrong
  shape, a quant type the `gguf` package cannot dequantize) rather than read subtly wrong.
- GGUF tensor names map to HF ones by a fixed table (`_LAYER_NAMES`, `_GLOBAL_NAMES`);
  the config decides which tensors must be there and their shapes (`_expected_shapes`).
- Weights are dequantized to float32. Dequantization is exact arithmetic on the stored
  blocks, so the converted model computes what llama.cpp computes, up to kernel
  rounding: it is the quantized model, not the original checkpoint. Tied embeddings (no
  `output.weight`) give `tie_word_embeddings` and no `lm_head.weight`, as HF does.

Pitfalls
- Dims order: GGUF lists a tensor's dims fastest-varying first (ggml's ne[0] is the row
  length), the reverse of numpy/torch. `tensor.shape` of the reader is in that order; the
  torch shape is `reversed(tensor.shape)`.
- q/k permutation: llama.cpp's converter permutes the rows of `attn_q` and `attn_k` so
  that its rope rotates interleaved pairs (x0,x1),(x2,x3)... where HF's "rotate_half"
  rotates (x_i, x_{i+d/2}). Per head it reshaped the rows (heads, 2, d/2) -> (heads, d/2,
  2); undoing it is the reshape (heads, d/2, 2, in) -> swap axes 1,2 -> back. q uses
  n_head, k uses n_head_kv (with GQA they differ; using n_head for k scrambles heads
  silently: the model still runs, it just answers nonsense). Quantization blocks run
  along the input dim, so permuting dequantized rows is exact.
- `llama.rope.dimension_count` < head_dim would be partial rotary, which this model does
  not implement: refused. Float metadata is float32 (1e-5 reads as 9.9999997e-06); it
  is written as the shortest float32 repr.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFMeta", "hf_config", "read_weights", "unpermute_rope_rows"]

# GGUF per-layer tensor name -> HF module path under model.layers.N.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"(\w+)\.(weight|bias)")


class GGUFMeta:
    """Typed access to GGUF key/values, with errors that name the missing key."""

    def __init__(self, reader: Any, path: Path) -> None:
        self.fields = reader.fields
        self.path = path
        self._cache: dict[str, Any] = {}  # contents() of a 49k-string array is not free

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        if field is None:
            return default
        if key in self._cache:
            return self._cache[key]
        value = field.contents()
        if isinstance(value, float):
            # float32 in the file: 1e-5 would read 9.999999747378752e-06
            value = float(str(np.float32(value)))
        self._cache[key] = value
        return value

    def need(self, key: str) -> Any:
        if key not in self.fields:
            raise ValueError(f"{self.path.name}: GGUF metadata key {key!r} is missing")
        return self.get(key)

    def count(self, key: str, default: int | None = None) -> int:
        """An integer hyperparameter; some architectures store per-layer lists instead."""
        value = self.need(key) if default is None else self.get(key, default)
        if not isinstance(value, int):
            raise ValueError(f"{self.path.name}: {key} is {value!r}, not one integer (per-layer values "
                             f"are not supported)")
        return value


def hf_config(meta: GGUFMeta, tensor_names: set[str]) -> dict[str, Any]:
    arch = meta.need("general.architecture")
    if arch != "llama":
        raise ValueError(
            f"{meta.path.name}: general.architecture is {arch!r}; only 'llama' can be converted "
            f"(the model in chatbot/inference/model.py is a Llama)"
        )
    hidden = meta.count("llama.embedding_length")
    heads = meta.count("llama.attention.head_count")
    kv_heads = meta.count("llama.attention.head_count_kv", heads)
    head_dim = meta.count("llama.attention.key_length", hidden // heads)
    value_dim = meta.count("llama.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise ValueError(f"{meta.path.name}: key_length {head_dim} != value_length {value_dim} is not supported")
    rope_dims = meta.count("llama.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(
            f"{meta.path.name}: llama.rope.dimension_count {rope_dims} != head_dim {head_dim} "
            f"(partial rotary) is not supported"
        )
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in tensor_names:
        raise ValueError(
            f"{meta.path.name}: rope scaling ({scaling!r}, rope_freqs tensor: "
            f"{'rope_freqs.weight' in tensor_names}) is not supported by this converter"
        )
    tokens = meta.need("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": meta.count("llama.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": meta.count("llama.feed_forward_length"),
        "num_hidden_layers": meta.count("llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.count("llama.context_length"),
        "rms_norm_eps": float(meta.need("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": any(n.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"))
                              for n in tensor_names),
        "mlp_bias": any(n.endswith(("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")) for n in tensor_names),
    }
    for key in ("bos", "eos", "padding"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    return config


def _hf_name(gguf_name: str, n_layers: int) -> str | None:
    if m := _LAYER_RE.fullmatch(gguf_name):
        layer, part, kind = int(m[1]), m[2], m[3]
        if layer < n_layers and part in _LAYER_NAMES:
            return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
        return None
    if (m := _GLOBAL_RE.fullmatch(gguf_name)) and m[1] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[m[1]]}.{m[2]}"
    return None


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, i, d = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], h)
    layer = {
        "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    if config["attention_bias"]:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                  "self_attn.v_proj.bias": (kv,), "self_attn.o_proj.bias": (h,)}
    if config["mlp_bias"]:
        layer |= {"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)}
    for n in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{n}.{k}": v for k, v in layer.items()}
    return shapes


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of attn_q/attn_k (weights [out, in] or biases [out])."""
    rows = w.shape[0]
    head_dim = rows // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_weights(reader: Any, config: dict[str, Any], path: Path) -> tuple[dict[str, np.ndarray], Counter[str]]:
    from gguf import quants

    n_layers = config["num_hidden_layers"]
    names = {t.name: _hf_name(t.name, n_layers) for t in reader.tensors}
    unknown = sorted(n for n, hf in names.items() if hf is None)
    if unknown:
        raise ValueError(f"{path.name}: unknown tensor names (no HF counterpart): {', '.join(unknown[:10])}"
                         + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""))
    expected = _expected_shapes(config)
    unexpected = sorted(n for n, hf in names.items() if hf not in expected)
    if unexpected:
        raise ValueError(f"{path.name}: tensors this llama config has no place for: {', '.join(unexpected[:10])}")
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise ValueError(f"{path.name}: tensors missing for a {n_layers}-layer llama: {', '.join(missing[:10])}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    weights: dict[str, np.ndarray] = {}
    qtypes: Counter[str] = Counter()
    for t in reader.tensors:
        hf = names[t.name]
        assert hf is not None
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF dims are fastest-first
        if shape != expected[hf]:
            raise ValueError(f"{path.name}: tensor {t.name} has shape {shape}, expected {expected[hf]} for {hf}")
        try:
            w = quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ValueError(f"{path.name}: tensor {t.name} has quantization type {t.tensor_type.name}, "
                             f"which the gguf package cannot dequantize") from e
        w = np.asarray(w, dtype=np.float32).reshape(shape)
        if hf.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_rope_rows(w, config["num_attention_heads"])
        elif hf.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_rope_rows(w, config["num_key_value_heads"])
        w = np.ascontiguousarray(w)
        weights[hf] = w if w.flags.writeable else w.copy()  # F32 tensors are views of the read-only mmap
        qtypes[t.tensor_type.name] += 1
    return weights, qtypes
