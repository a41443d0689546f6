"""The KV cache: a pool of per-sequence slots, and where one forward reads and writes it.

Design notes
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
  The model's `last_index` picks each row's last real token for the logits (model.py).
- `CacheAccess` works that out once per forward for every layer: the slots written, the
  slots read (a view when they are consecutive, not a copy), how many keys, the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatbot.inference.llama_config import LlamaConfig

__all__ = ["CacheAccess", "KVCache"]


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
