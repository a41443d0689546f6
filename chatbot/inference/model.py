"""A Llama-architecture decoder in plain PyTorch, with an external KV cache.

Design notes
- Architecture = Hugging Face `LlamaForCausalLM`: pre-norm RMSNorm, rotary embeddings in
  the "rotate_half" layout (HF checkpoints have q/k weights permuted for that layout),
  grouped-query attention, SwiGLU MLP, optional tied lm_head. Parameter names match the
  HF state dict exactly, so `model.safetensors` files of real Llama checkpoints load
  with a plain `load_state_dict` (rotary tables are non-persistent buffers).
- One module serves three transformers families, because they are this math with
  different flags and the same tensor names: `llama`, `mistral` (Llama without
  biases, plus a sliding window) and `qwen2` (biases on q/k/v_proj but not on o_proj:
  the `qkv_bias` flag, derived from model_type, never read from the config). Optional
  keys real checkpoints use are honoured: `head_dim`, `attention_bias`, `mlp_bias`,
  `tie_word_embeddings` either way, `rope_theta`, and `rope_scaling` of type "llama3"
  (Llama 3.1/3.2) or "linear" (positions divided by `factor`), in the old top-level
  spelling or transformers 5's `rope_parameters`.
- Refuse, never approximate: `LlamaConfig.from_dict` and `from_pretrained` raise
  `UnsupportedCheckpoint` (a ValueError, not an assert, so `python -O` keeps it) for any
  checkpoint transformers would compute differently: another model_type or a head other
  than the causal LM, an activation other than SiLU, rope scaling we do not implement
  ("dynamic", "yarn", "longrope", ...: they depend on the sequence length or rescale the
  attention), keys of other families that change the math (`_NEUTRAL_VALUES`: logit
  soft-capping, query_pre_attn_scalar, partial rotary, q/k norms, ...), and weights that
  do not match the config tensor for tensor (missing, unexpected, wrong shape).
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
- Weights: the shards named by `model.safetensors.index.json`, else `model.safetensors`,
  else every `*.safetensors` (never Mistral's `consolidated.safetensors` next to HF
  shards). Keys a config.json omits take transformers' defaults (`_HF_DEFAULTS`: untied
  head, eps 1e-6, theta 10000), not the training defaults of the dataclass.
- The KV cache is a pool of slots owned by the caller (the engine): one preallocated
  tensor [layers, 2, slots, max_len, n_kv_heads, head_dim]. A forward call names, per
  batch row, the slot it reads and writes and the absolute position of every token.
  The key at cache index j *is* the token at position j, so a single causal rule
  (key position <= query position) both masks the future and hides the stale entries
  of shorter sequences sharing a batch: batched decode of ragged sequences needs no
  extra padding mask. Batched *prefill* of ragged prompts right-pads them and gives the
  pad tokens the positions after the prompt: no real query can see them (they are in
  its future), and the cache entries they write lie beyond the prompt, where the
  sequence's own next tokens overwrite them before any query reaches them.
  `last_index` picks each row's last real token for the logits.
- Attention is `F.scaled_dot_product_attention` with `enable_gqa` so the K/V heads are
  never materialised per query head.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from chatbot.inference.checkpoint import UnsupportedCheckpoint

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM", "SUPPORTED_ARCHITECTURES", "UnsupportedCheckpoint"]


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
ROPE_TYPES = ("default", "linear", "llama3")


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
        _rope_type(self.rope_scaling)  # refuse scaling we do not implement now, not at first use

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


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold the model: those of the shard index when there is
    one (Mistral repositories also ship `consolidated.safetensors`, the same weights under
    other names, which must not be read), else `model.safetensors`, else every file."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise UnsupportedCheckpoint(f"{index.name} names shards that are not in {model_dir}: {', '.join(absent)}")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = [p.name for p in model_dir.glob("*.bin")] + [p.name for p in model_dir.glob("*.pt*")]
        raise UnsupportedCheckpoint(
            f"no *.safetensors weights in {model_dir}"
            + (f" (found {', '.join(sorted(other))}: only safetensors are read)" if other else "")
        )
    return files


def _check_tensors(
    model_dir: Path,
    config: LlamaConfig,
    expected: dict[str, tuple[int, ...]],
    found: dict[str, tuple[int, ...]],
) -> None:
    """Refuse weights that do not match the config tensor for tensor: a missing one would
    stay uninitialised, an unexpected one means the checkpoint computes something else."""

    def listing(names: list[str]) -> str:
        return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [f"{k} {found[k]} (expected {expected[k]})" for k in sorted(set(expected) & set(found))
             if found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {listing(unexpected)}")
    if wrong:
        problems.append(f"tensors of the wrong shape: {listing(wrong)}")
    if problems:
        family = config.extra.get("model_type", "llama")
        raise UnsupportedCheckpoint(
            f"the weights in {model_dir} do not fit its config.json (model_type {family!r}, "
            f"{config.num_hidden_layers} layers, attention_bias={config.attention_bias}, "
            f"qkv_bias={config.qkv_bias}, mlp_bias={config.mlp_bias}, "
            f"tie_word_embeddings={config.tie_word_embeddings}): " + "; ".join(problems)
        )


class KVCache:
    """A pool of per-sequence K/V slots: data[layer, 0=k|1=v, slot, position, kv_head, dim].

    The engine allocates a slot to a sequence for its whole life; the model writes the
    keys/values of every token at its absolute position and reads back [0, max_pos].
    """

    def __init__(
        self,
        config: LlamaConfig,
        num_slots: int,
        max_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        assert num_slots >= 1 and max_len >= 1, "KV cache needs at least one slot and one position"
        self.num_slots = num_slots
        self.max_len = max_len
        assert config.head_dim is not None
        self.data = torch.zeros(
            config.num_hidden_layers, 2, num_slots, max_len, config.num_key_value_heads, config.head_dim,
            device=device, dtype=dtype,
        )

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @staticmethod
    def slot_bytes(config: LlamaConfig, max_len: int, dtype: torch.dtype) -> int:
        """What one slot of `max_len` positions takes."""
        assert config.head_dim is not None
        per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
        return per_position * max_len * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class CacheAccess:
    """Where one forward writes and reads the KV cache, worked out once for every layer."""

    slots: torch.Tensor  # [B] the slot each row writes (and reads)
    read: slice | torch.Tensor  # the slots to read: a slice when they are consecutive
    kv_len: int  # keys 0 .. kv_len - 1 are read
    mask: torch.Tensor | None  # [B, 1, T, L] bool, True = may attend; None: every key read may be

    @classmethod
    def of(cls, slots: torch.Tensor, positions: torch.Tensor, max_len: int) -> CacheAccess:
        B, T = positions.shape
        kv_len = int(positions.max()) + 1  # one host sync per forward, not per layer
        assert kv_len <= max_len, f"position {kv_len - 1} is beyond the KV cache length"
        # Reading rows by an index tensor copies them ([B, L, n_kv, D] per layer and per K
        # and V); consecutive slots (one sequence, or a batch that got neighbouring slots)
        # are read as a view instead.
        read: slice | torch.Tensor = slots
        if slots.device.type == "cpu":
            first = int(slots[0])
            if torch.equal(slots, torch.arange(first, first + B)):
                read = slice(first, first + B)
        if B == 1 and T == 1:
            return cls(slots, read, kv_len, None)  # one query at the last position read: it sees them all
        # key j is the token at position j: causal by position, which also hides the stale
        # tail of shorter sequences sharing the batch. Same mask for every layer.
        key_pos = torch.arange(kv_len, device=positions.device)
        return cls(slots, read, kv_len, key_pos[None, None, None, :] <= positions[:, None, :, None])


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in fp32 like HF, then cast back before the weight multiply
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


def _rope_type(scaling: dict[str, Any] | None) -> str:
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


def _rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    assert config.head_dim is not None
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = _rope_type(scaling)
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


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        assert config.head_dim is not None
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        h = config.hidden_size
        qkv_bias = config.attention_bias or config.qkv_bias  # Qwen2: q/k/v only
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, T, head_dim]
        sin: torch.Tensor,  # [B, T, head_dim]
        positions: torch.Tensor,  # [B, T]
        layer_cache: torch.Tensor | None,  # [2, slots, max_len, n_kv, head_dim]
        access: CacheAccess | None,  # where this forward writes and reads the cache
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, head_dim]: broadcast over heads
        q = q * c + _rotate_half(q) * s
        k = k * c + _rotate_half(k) * s

        if layer_cache is None:
            # no cache: a plain causal pass over the given tokens (training, full forward)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
            )  # [B, H, T, D]
        else:
            assert access is not None, "a KV cache needs to know where to write and read"
            # write this step's keys/values at their absolute positions
            layer_cache[0][access.slots[:, None], positions] = k.to(layer_cache.dtype)
            layer_cache[1][access.slots[:, None], positions] = v.to(layer_cache.dtype)
            keys = layer_cache[0][access.read, :access.kv_len].to(q.dtype).transpose(1, 2)  # [B, n_kv, L, D]
            values = layer_cache[1][access.read, :access.kv_len].to(q.dtype).transpose(1, 2)  # [B, n_kv, L, D]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=access.mask, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
        layer_cache: torch.Tensor | None,
        access: CacheAccess | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, layer_cache, access)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The `model.` prefix of the HF state dict: embeddings, layers, final norm."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # non-persistent: not part of the HF state dict; recomputed on load
        self.register_buffer("inv_freq", _rope_inv_freq(config), persistent=False)

    # ---- construction -------------------------------------------------------------

    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (GPT-2 style, scaled residual projections)."""
        n_layers = self.config.num_hidden_layers
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith("o_proj.weight") or name.endswith("down_proj.weight"):
                nn.init.normal_(p, std=std / math.sqrt(2 * n_layers))
            else:
                nn.init.normal_(p, std=std)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> LlamaForCausalLM:
        """Load `config.json` and the safetensors weights of a HF-layout directory.

        Raises `UnsupportedCheckpoint` for a config we would compute differently from
        transformers and for weights that do not fit it exactly: a tensor missing, one
        we have no place for, or one of the wrong shape.
        """
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise UnsupportedCheckpoint(f"no config.json in {model_dir}")
        config = LlamaConfig.from_json(model_dir / "config.json")
        with torch.device("meta"):
            model = cls(config)
        state: dict[str, torch.Tensor] = {}
        for shard in _weight_files(model_dir):
            state.update(load_file(str(shard), device="cpu"))
        # rotary tables some old checkpoints saved; ours are recomputed from the config
        state = {k: v for k, v in state.items() if "rotary_emb" not in k}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            # tied checkpoints usually omit lm_head; if present, transformers ignores it too
            state.pop("lm_head.weight", None)
            expected.pop("lm_head.weight")
        _check_tensors(model_dir, config, expected, {k: tuple(v.shape) for k, v in state.items()})
        state = {k: v.to(dtype) for k, v in state.items()}
        # assign=True adopts the loaded tensors instead of copying into meta tensors
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.inv_freq = _rope_inv_freq(config)  # the meta buffer has no data
        return model.to(device).eval()

    def save_pretrained(self, model_dir: str | Path) -> None:
        """Write `config.json` + a single `model.safetensors` in HF layout."""
        from safetensors.torch import save_file

        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight")  # safetensors refuses shared storage; HF omits it too
        save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})

    # ---- forward --------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        positions: torch.Tensor | None = None,  # [B, T] absolute positions; default 0..T-1
        kv_cache: KVCache | None = None,
        slots: torch.Tensor | None = None,  # [B] cache slot of each row
        last_only: bool = False,  # return logits of the last position only: [B, 1, V]
        last_index: torch.Tensor | None = None,  # [B] per-row index of the token to return logits of: [B, 1, V]
    ) -> torch.Tensor:  # [B, T, V] float logits ([B, 1, V] with last_only / last_index)
        B, T = input_ids.shape
        assert not (last_only and last_index is not None), "pass last_only or last_index, not both"
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        access = None
        if kv_cache is not None:
            assert slots is not None and slots.shape == (B,), "pass one cache slot per batch row"
            access = CacheAccess.of(slots, positions, kv_cache.max_len)
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = kv_cache.data[i] if kv_cache is not None else None
            x = layer(x, cos, sin, positions, layer_cache, access)
        if last_only:
            x = x[:, -1:]
        elif last_index is not None:
            # right-padded ragged batch (engine prefill): each row's last *real* token;
            # the lm_head then runs on B rows instead of B*T
            assert last_index.shape == (B,), f"last_index must be [B]={B}, got {tuple(last_index.shape)}"
            x = x[torch.arange(B, device=x.device), last_index][:, None]  # [B, 1, hidden]
        x = self.model.norm(x)
        return self.lm_head(x).float()
