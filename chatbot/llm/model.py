"""A Llama-architecture decoder in plain PyTorch, with an external KV cache.

Design notes
- Architecture = Hugging Face `LlamaForCausalLM`: pre-norm RMSNorm, rotary embeddings in
  the "rotate_half" layout (HF checkpoints have q/k weights permuted for that layout),
  grouped-query attention, SwiGLU MLP, optional tied lm_head. Parameter names match the
  HF state dict exactly, so `model.safetensors` files of real Llama checkpoints load
  with a plain `load_state_dict` (rotary tables are non-persistent buffers).
- Optional config keys that real checkpoints use are honoured: `head_dim`,
  `attention_bias`, `mlp_bias` and `rope_scaling` of type "llama3" (Llama 3.1/3.2).
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
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept for saving

    def __post_init__(self) -> None:
        if self.head_dim is None:
            assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide into heads"
            self.head_dim = self.hidden_size // self.num_attention_heads
        assert self.num_attention_heads % self.num_key_value_heads == 0, (
            f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({self.num_key_value_heads})"
        )

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list) else [self.eos_token_id]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        act = d.get("hidden_act", "silu")
        assert act == "silu", f"only SwiGLU (hidden_act silu) is implemented, the config says {act!r}"
        known = {f.name for f in fields(cls)} - {"extra"}
        d = dict(d)
        rope = d.pop("rope_parameters", None)
        if isinstance(rope, dict):
            # transformers 5 writes RoPE settings as rope_parameters {rope_theta, rope_type, ...}
            # instead of the top-level rope_theta / rope_scaling keys of earlier checkpoints.
            d.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                d.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        kwargs = {k: v for k, v in d.items() if k in known}
        extra = {k: v for k, v in d.items() if k not in known}
        if "num_key_value_heads" not in d:  # old configs: plain multi-head attention
            kwargs["num_key_value_heads"] = d["num_attention_heads"]
        return cls(**kwargs, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> LlamaConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        d = {**extra, **d}
        d.setdefault("architectures", ["LlamaForCausalLM"])
        d.setdefault("model_type", "llama")
        d.setdefault("hidden_act", "silu")
        return d


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


def _rope_inv_freq(config: LlamaConfig) -> torch.Tensor:
    assert config.head_dim is not None
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
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
    elif kind not in (None, "default"):
        raise NotImplementedError(f"rope_scaling type {kind!r} is not supported")
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
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=bias)

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, T, head_dim]
        sin: torch.Tensor,  # [B, T, head_dim]
        positions: torch.Tensor,  # [B, T]
        layer_cache: torch.Tensor | None,  # [2, slots, max_len, n_kv, head_dim]
        slots: torch.Tensor | None,  # [B]
        mask: torch.Tensor | None,  # [B, 1, T, L] bool, True = may attend (cache only)
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
            assert slots is not None and mask is not None, "a KV cache needs slots and a mask"
            # write this step's keys/values at their absolute positions
            layer_cache[0][slots[:, None], positions] = k.to(layer_cache.dtype)
            layer_cache[1][slots[:, None], positions] = v.to(layer_cache.dtype)
            kv_len = mask.shape[-1]
            keys = layer_cache[0][slots, :kv_len].to(q.dtype).transpose(1, 2)  # [B, n_kv, L, D]
            values = layer_cache[1][slots, :kv_len].to(q.dtype).transpose(1, 2)  # [B, n_kv, L, D]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, enable_gqa=True)
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
        slots: torch.Tensor | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, layer_cache, slots, mask)
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
        """Load `config.json` and every `*.safetensors` shard of a HF-layout directory."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir)
        config = LlamaConfig.from_json(model_dir / "config.json")
        shards = sorted(model_dir.glob("*.safetensors"))
        assert shards, f"no *.safetensors files in {model_dir}"
        with torch.device("meta"):
            model = cls(config)
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(shard), device="cpu"))
        if config.tie_word_embeddings:
            # tied checkpoints usually omit lm_head; if present it equals the embedding
            state.pop("lm_head.weight", None)
        state = {k: v.to(dtype) for k, v in state.items()}
        # assign=True adopts the loaded tensors instead of copying into meta tensors
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        unexpected = [k for k in unexpected if "rotary_emb" not in k]
        assert not missing and not unexpected, f"checkpoint mismatch: missing={missing} unexpected={unexpected}"
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
        mask = None
        if kv_cache is not None:
            assert slots is not None and slots.shape == (B,), "pass one cache slot per batch row"
            kv_len = int(positions.max()) + 1  # one host sync per forward, not per layer
            assert kv_len <= kv_cache.max_len, f"position {kv_len - 1} is beyond the KV cache length"
            # key j is the token at position j: causal by position, which also hides the
            # stale tail of shorter sequences sharing the batch. Same mask for every layer.
            key_pos = torch.arange(kv_len, device=input_ids.device)
            mask = key_pos[None, None, None, :] <= positions[:, None, :, None]  # [B, 1, T, L]
        freqs = positions[..., None].float() * self.inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
        x = self.model.embed_tokens(input_ids)  # [B, T, hidden]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for i, layer in enumerate(self.model.layers):
            layer_cache = kv_cache.data[i] if kv_cache is not None else None
            x = layer(x, cos, sin, positions, layer_cache, slots, mask)
        if last_only:
            x = x[:, -1:]
        elif last_index is not None:
            # right-padded ragged batch (engine prefill): each row's last *real* token;
            # the lm_head then runs on B rows instead of B*T
            assert last_index.shape == (B,), f"last_index must be [B]={B}, got {tuple(last_index.shape)}"
            x = x[torch.arange(B, device=x.device), last_index][:, None]  # [B, 1, hidden]
        x = self.model.norm(x)
        return self.lm_head(x).float()
