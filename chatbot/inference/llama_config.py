"""What a Hugging Face `config.json` means for the Llama decoder: `LlamaConfig`.

Design notes
- One decoder (model.py) serves three transformers families, because they are this math
  with different flags and the same tensor names: `llama`, `mistral` (Llama without
  biases, plus a sliding window) and `qwen2` (biases on q/k/v_proj but not on o_proj:
  the `qkv_bias` flag, derived from model_type, never read from the config). Optional
  keys real checkpoints use are honoured: `head_dim`, `attention_bias`, `mlp_bias`,
  `tie_word_embeddings` either way, `rope_theta`, and `rope_scaling` of type "llama3"
  (Llama 3.1/3.2) or "linear" (positions divided by `factor`; rope.py), in the old
  top-level spelling or transformers 5's `rope_parameters`.
- Refuse, never approximate: `LlamaConfig.from_dict` raises `UnsupportedCheckpoint` (a
  ValueError, not an assert, so `python -O` keeps it) for any config transformers would
  compute differently: another model_type or a head other than the causal LM, an
  activation other than SiLU, rope scaling we do not implement ("dynamic", "yarn",
  "longrope", ...: they depend on the sequence length or rescale the attention), and keys
  of other families that change the math (`_NEUTRAL_VALUES`: logit soft-capping,
  query_pre_attn_scalar, partial rotary, q/k norms, ...).
- Sliding-window attention is not implemented. A window only changes anything when a
  query can be farther than `sliding_window` tokens from a key; transformers masks keys
  at distance >= window, and positions never exceed max_position_embeddings - 1, so a
  checkpoint whose window is null (or, for Qwen2, switched off by use_sliding_window /
  layer_types) or >= max_position_embeddings is served exactly. Anything else is
  refused rather than clamped: the served context is max_position_embeddings in
  config.json, which other components read on their own (the worker's prompt budget),
  so silently shrinking it here would make them disagree; the error says how to serve
  such a checkpoint with the window as its context (edit config.json). Llama has no
  window in transformers, so a `sliding_window` key there is ignored like transformers
  ignores it.
- Keys a config.json omits take transformers' defaults (`_HF_DEFAULTS`: untied head, eps
  1e-6, theta 10000), not the training defaults of the dataclass.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from chatbot.inference.checkpoint import UnsupportedCheckpoint
from chatbot.inference.rope import rope_type

__all__ = ["LlamaConfig", "SUPPORTED_ARCHITECTURES"]


# Families served, by `model_type`, with the `architectures` entries each may name. All three
# are the Llama math with the same tensor names; they differ only in the config flags below.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
}
# Keys that other families put in a config to change the math, and the values at which
# they change nothing. Any other value is refused: we would compute something else.
_NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "attn_logit_softcapping": (None,),  # gemma 2: tanh-capped attention scores
    "final_logit_softcapping": (None,),  # gemma 2: tanh-capped logits
    "query_pre_attn_scalar": (None,),  # gemma 2/3: scores scaled by another 1/sqrt(d)
    "attention_multiplier": (None,),  # granite: replaces 1/sqrt(head_dim)
    "partial_rotary_factor": (None, 1.0),  # phi / stablelm: rotary on part of head_dim only
    "rotary_pct": (None, 1.0),  # gpt-neox spelling of the same
    "qk_norm": (None, False),  # olmo2 / qwen3: RMSNorm on queries and keys
    "use_qk_norm": (None, False),
    "qk_layernorm": (None, False),
    "embedding_multiplier": (None, 1.0),  # granite: scaled embeddings, residuals, logits
    "residual_multiplier": (None, 1.0),
    "logits_scaling": (None, 1.0),
    "logit_scale": (None, 1.0),  # cohere
    "scale_embedding": (None, False),
    "clip_qkv": (None,),  # olmo / dbrx: clamped projections
    "use_parallel_residual": (None, False),  # attention and MLP side by side
    "parallel_attn": (None, False),
    "attention_chunk_size": (None,),  # llama 4: chunked local attention
    "num_local_experts": (None, 0, 1),  # mixture-of-experts MLPs
    "num_experts": (None, 0, 1),
}
# Hugging Face's own defaults (the same for the three families) where a config.json omits
# the key: our dataclass defaults are for training from scratch, not for reading configs.
_HF_DEFAULTS: dict[str, Any] = {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_REQUIRED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "max_position_embeddings",
)

def _family(d: dict[str, Any]) -> str:
    """The config's `model_type`, once it and `architectures` are both ones we serve."""
    model_type = d.get("model_type")
    archs = d.get("architectures") or []
    if not isinstance(archs, list):
        raise UnsupportedCheckpoint(f"config.json: architectures must be a list, got {archs!r}")
    supported = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
    if model_type is None:
        # no model_type: name the family by its (single) architecture
        found = [f for f, names in SUPPORTED_ARCHITECTURES.items() if archs and all(a in names for a in archs)]
        if not found:
            raise UnsupportedCheckpoint(
                f"config.json has no model_type and architectures {archs!r} name no supported family "
                f"(supported model_type: {supported})"
            )
        return found[0]
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedCheckpoint(
            f"model_type {model_type!r} is not implemented (supported: {supported}); "
            f"its architecture {', '.join(archs) or '(not named)'} differs from the Llama decoder"
        )
    wrong = [a for a in archs if a not in SUPPORTED_ARCHITECTURES[model_type]]
    if wrong:
        raise UnsupportedCheckpoint(
            f"architectures {wrong!r} are not implemented for model_type {model_type!r} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES[model_type])}: a causal LM head)"
        )
    return model_type


def _sliding_window_in_use(family: str, d: dict[str, Any]) -> int | None:
    """The attention window some layer of this checkpoint uses, as transformers reads the
    config; None where every layer attends to the whole sequence."""
    window = d.get("sliding_window")
    if window is None or family == "llama":  # LlamaAttention has no window, whatever the key says
        return None
    if family == "qwen2":
        # Qwen2Config: the window exists only with use_sliding_window, and then only on the
        # layers `layer_types` marks (default: layer index >= max_window_layers)
        if not d.get("use_sliding_window", False):
            return None
        layer_types = d.get("layer_types")
        if layer_types is not None:
            unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
            if unknown:
                raise UnsupportedCheckpoint(f"layer_types {unknown} are not implemented")
            used = "sliding_attention" in layer_types
        else:
            used = d.get("max_window_layers", 28) < d["num_hidden_layers"]
        return int(window) if used else None
    return int(window)  # mistral: every layer


@dataclass
class LlamaConfig:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    attention_bias: bool = False  # Llama: a bias on q/k/v/o_proj
    mlp_bias: bool = False
    qkv_bias: bool = False  # Qwen2: a bias on q/k/v_proj only (not o_proj); set by model_type
    rope_scaling: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for saving

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise UnsupportedCheckpoint(
                    f"hidden_size ({self.hidden_size}) does not divide into {self.num_attention_heads} heads "
                    "and the config has no head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise UnsupportedCheckpoint(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2 != 0:
            raise UnsupportedCheckpoint(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        rope_type(self.rope_scaling)  # refuse scaling we do not implement now, not at first use

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face `config.json` dict; `UnsupportedCheckpoint` for anything the
        model here would compute differently from transformers."""
        d = dict(d)
        family = _family(d)
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # the same function in transformers' ACT2FN
            raise UnsupportedCheckpoint(f"only SwiGLU (hidden_act silu) is implemented, the config says {act!r}")
        absent = [k for k in _REQUIRED_KEYS if k not in d]
        if absent:
            raise UnsupportedCheckpoint(f"config.json lacks {', '.join(absent)}")
        rope = d.pop("rope_parameters", None)
        if isinstance(rope, dict):
            if "rope_type" not in rope and "rope_theta" not in rope:
                # gemma 3 style: one rope_parameters dict per layer type
                raise UnsupportedCheckpoint(f"per-layer-type rope_parameters ({', '.join(rope)}) are not implemented")
            # transformers 5 writes RoPE settings as rope_parameters {rope_theta, rope_type, ...}
            # instead of the top-level rope_theta / rope_scaling keys of earlier checkpoints.
            d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if "partial_rotary_factor" in rope:
                d.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        changed = [f"{k}={d[k]!r}" for k, neutral in _NEUTRAL_VALUES.items() if k in d and d[k] not in neutral]
        if changed:
            raise UnsupportedCheckpoint(f"config keys that change the math are not implemented: {', '.join(changed)}")
        window = _sliding_window_in_use(family, d)
        context = int(d["max_position_embeddings"])
        if window is not None and window < context:
            raise UnsupportedCheckpoint(
                f"sliding-window attention (sliding_window {window} < max_position_embeddings {context}) is not "
                f"implemented; to serve this checkpoint with a {window}-token context, where full attention "
                f"computes the same thing, set max_position_embeddings to {window} in its config.json"
            )
        d.pop("qkv_bias", None)  # ours to derive from the family, never read
        if family == "qwen2":  # Qwen2Attention: bias=True on q/k/v, False on o; no MLP bias
            d.update(qkv_bias=True, attention_bias=False, mlp_bias=False)
        elif family == "mistral":  # MistralAttention / MistralMLP: no biases at all
            d.update(attention_bias=False, mlp_bias=False)
        for k, v in _HF_DEFAULTS.items():
            d.setdefault(k, v)
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if kwargs.get("num_key_value_heads") is None:  # old configs: plain multi-head attention
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> LlamaConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        qkv_bias = d.pop("qkv_bias")  # implied by model_type, not a transformers key
        d = {**extra, **d}
        qwen2 = qkv_bias and not self.attention_bias
        model_type = d.setdefault("model_type", "qwen2" if qwen2 else "llama")
        if (model_type == "qwen2") != qwen2 or (qwen2 and self.mlp_bias):
            raise ValueError(
                "biases on q/k/v_proj only (qkv_bias), and no MLP bias, is what model_type qwen2 means: "
                f"model_type {model_type!r} with qkv_bias={qkv_bias}, attention_bias={self.attention_bias}, "
                f"mlp_bias={self.mlp_bias} has no transformers equivalent"
            )
        d.setdefault("architectures", list(SUPPORTED_ARCHITECTURES.get(model_type, ("LlamaForCausalLM",))[:1]))
        d.setdefault("hidden_act", "silu")
        return d
