"""A Llama-architecture decoder in plain PyTorch, with an external KV cache.

Design notes
- Architecture = Hugging Face `LlamaForCausalLM`: pre-norm RMSNorm, rotary embeddings in
  the "rotate_half" layout (rope.py; HF checkpoints have q/k weights permuted for that
  layout), grouped-query attention, SwiGLU MLP, optional tied lm_head. Parameter names
  match the HF state dict exactly, so `model.safetensors` files of real Llama checkpoints
  load with a plain `load_state_dict` (rotary tables are non-persistent buffers).
- One module serves three transformers families (`llama`, `mistral`, `qwen2`): the same
  math with different flags and the same tensor names. What a config.json means, and
  which configs are refused, is llama_config.py.
- Refuse, never approximate: `from_pretrained` raises `UnsupportedCheckpoint` (a
  ValueError, not an assert, so `python -O` keeps it) for a config `LlamaConfig` refuses
  and for weights that do not match the config tensor for tensor (missing, unexpected,
  wrong shape).
- Weights: the shards named by `model.safetensors.index.json`, else `model.safetensors`,
  else every `*.safetensors` (never Mistral's `consolidated.safetensors` next to HF
  shards).
- The KV cache (kv_cache.py) is a pool of slots owned by the caller (the engine); a
  forward call names, per batch row, the slot it reads and writes and the absolute
  position of every token, and a causal rule by position masks both the future and the
  stale entries of shorter sequences sharing a batch. Right-padded ragged prefill
  (kv_cache.py) uses `last_index` to pick each row's last real token for the logits.
- Attention is `F.scaled_dot_product_attention` with `enable_gqa` so the K/V heads are
  never materialised per query head.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from chatbot.inference.checkpoint import UnsupportedCheckpoint
from chatbot.inference.kv_cache import CacheAccess, KVCache
from chatbot.inference.llama_config import LlamaConfig
from chatbot.inference.rope import rope_inv_freq, rotate_half

__all__ = ["LlamaForCausalLM", "UnsupportedCheckpoint"]


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


def _inv_freq(config: LlamaConfig) -> torch.Tensor:
    assert config.head_dim is not None
    return rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)


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
        self.qkv_proj: nn.Linear | None = None  # q, k and v in one product, once fused
        self.qkv_sizes = [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim]

    def fuse(self) -> None:
        """One product for q, k and v: a decode step of one row pays per product call."""
        parts = [self.q_proj, self.k_proj, self.v_proj]
        self.qkv_proj = fused_linear(parts)
        del self.q_proj, self.k_proj, self.v_proj

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
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.reshape(B, T, self.n_heads, self.head_dim)
        k = k.reshape(B, T, self.n_kv, self.head_dim)
        v = v.reshape(B, T, self.n_kv, self.head_dim)
        c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # [B, T, 1, head_dim]: broadcast over heads
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s

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
        self.gate_up_proj: nn.Linear | None = None  # gate and up in one product, once fused

    def fuse(self) -> None:
        self.gate_up_proj = fused_linear([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the outputs of `parts` side by side (same input)."""
    first = parts[0]
    fused = nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))  # type: ignore[misc]
    return fused


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
        self.register_buffer("inv_freq", _inv_freq(config), persistent=False)

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
        model.inv_freq = _inv_freq(config)  # the meta buffer has no data
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

    def fuse_projections(self) -> LlamaForCausalLM:
        """For serving: each layer's q, k and v become one product, and so do gate and up
        (the same numbers: the rows of the fused weight are the parts' rows). A decode step
        of a few rows is bound by the number of calls, not by the arithmetic; this takes
        three of seven products per layer away. The state dict's names change with it, so
        fuse after loading and never save a fused model (LoRA and training use the parts)."""
        for layer in self.model.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

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
