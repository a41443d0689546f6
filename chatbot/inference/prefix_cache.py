"""Which KV-cache slot a new sequence gets, and how much of its prompt is already there.

Design notes
- The engine's KV cache is a pool of slots, each the whole context window of one sequence
  (kv_cache.py). A slot that finished generating keeps its keys and values: `tokens[slot]`
  lists the token ids whose entries are valid, position by position (the prompt, then
  every generated token that was fed back; the last sampled token never was). Idle slots
  with content form an LRU list; the pool has more slots than the decode batch
  (`Engine(kv_cache_bytes=...)`), so the idle ones are the prefix cache.
- A conversation's next turn is its previous prompt and reply followed by the new user
  message, so its longest cached prefix is usually the slot its previous turn used: that
  slot is taken over in place and only the new tokens are prefilled (vLLM's automatic
  prefix caching and SGLang's RadixAttention, at slot granularity). A new conversation of a
  persona shares at least the system prompt with every other conversation of it: that
  prefix is copied from whichever slot holds it (idle or still generating) into a fresh
  slot, ~23 KB per token for SmolLM2 in bf16, far cheaper than computing it.
- Lookup: every slot's tokens are indexed by chained hashes of their full blocks of
  `BLOCK` tokens (hash of block k covers blocks 0..k), so the longest cached prefix is
  found by walking the prompt's block hashes, without comparing against every slot; the
  match is then checked token by token (a hash collision costs a miss, never a wrong
  cache) and extended past the last full block.
- At most `len(prompt) - 1` tokens are reused: the last prompt token is always computed,
  because its logits give the first generated token.
- In place or copy: an idle slot is taken over in place when the match covers at least
  half of what it holds (the same conversation, perhaps re-tokenised a little differently
  near the end); otherwise its content is worth more to its own conversation than a short
  shared prefix is, so the prefix is copied to an empty slot or the least recently used
  idle one, which is evicted.
- Pure bookkeeping, no tensors: the engine does the copying. Used by the engine thread
  only, so nothing here locks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

BLOCK = 16


@dataclass(frozen=True)
class Placement:
    slot: int  # the slot the new sequence owns from now on
    reused: int  # leading prompt tokens whose KV entries are valid in `slot` once copied
    copy_from: int | None  # copy positions [0, reused) from this slot first; None: in place


def _block_hashes(tokens: list[int], limit: int) -> list[int]:
    """Chained hashes of the full blocks of tokens[:limit]."""
    hashes, h = [], 0
    for start in range(0, limit - BLOCK + 1, BLOCK):
        h = hash((h, tuple(tokens[start:start + BLOCK])))
        hashes.append(h)
    return hashes


class SlotPool:
    def __init__(self, num_slots: int, reuse: bool = True) -> None:
        assert num_slots >= 1, "a slot pool needs at least one slot"
        self.num_slots = num_slots
        self.reuse = reuse  # False: every prompt is prefilled in full (benchmarks, diagnosis)
        self.tokens: list[list[int]] = [[] for _ in range(num_slots)]
        self._hashes: list[list[int]] = [[] for _ in range(num_slots)]  # chained block hashes of tokens
        self._index: dict[int, set[int]] = {}  # block-prefix hash -> slots holding that prefix
        self._active: set[int] = set()
        self._idle: OrderedDict[int, None] = OrderedDict()  # idle slots with content, oldest first
        self._empty: list[int] = list(range(num_slots - 1, -1, -1))  # pop() takes slot 0 first

    @property
    def active(self) -> int:
        return len(self._active)

    @property
    def cached_tokens(self) -> int:
        """Tokens held by idle slots: what the prefix cache keeps right now."""
        return sum(len(self.tokens[s]) for s in self._idle)

    def acquire(self, prompt: list[int]) -> Placement:
        """A slot for a new sequence with this prompt; raises if every slot is active."""
        if len(self._active) >= self.num_slots:
            raise RuntimeError("every KV-cache slot is in use")
        source, reused = self._longest_prefix(prompt)
        if source is not None and source in self._idle and 2 * reused >= len(self.tokens[source]):
            del self._idle[source]
            self._truncate(source, reused)
            self._active.add(source)
            return Placement(source, reused, None)
        slot = self._empty.pop() if self._empty else self._evict()
        if slot == source:  # the only slot left was the source itself: reuse it in place
            self._truncate(slot, reused)
            self._active.add(slot)
            return Placement(slot, reused, None)
        self._truncate(slot, 0)
        self._active.add(slot)
        if source is None or reused == 0:
            return Placement(slot, 0, None)
        self.extend(slot, self.tokens[source][:reused])
        return Placement(slot, reused, source)

    def extend(self, slot: int, tokens: list[int]) -> None:
        """`tokens` now have valid KV entries in `slot`, after those it already had."""
        held = self.tokens[slot]
        held.extend(tokens)
        hashes = self._hashes[slot]
        h = hashes[-1] if hashes else 0
        for start in range(len(hashes) * BLOCK, len(held) - BLOCK + 1, BLOCK):
            h = hash((h, tuple(held[start:start + BLOCK])))
            hashes.append(h)
            self._index.setdefault(h, set()).add(slot)

    def release(self, slot: int) -> None:
        """The sequence in `slot` ended: keep its content as the most recently used."""
        self._active.discard(slot)
        if self.tokens[slot]:
            self._idle[slot] = None
        else:
            self._empty.append(slot)

    def forget(self, slot: int) -> None:
        """Drop what `slot` holds (its entries can no longer be trusted) and free it."""
        self._truncate(slot, 0)
        self._active.discard(slot)
        self._idle.pop(slot, None)
        if slot not in self._empty:
            self._empty.append(slot)

    # ---- internals ----------------------------------------------------------------------

    def _longest_prefix(self, prompt: list[int]) -> tuple[int | None, int]:
        if not self.reuse:
            return None, 0
        limit = len(prompt) - 1  # the last prompt token is always computed
        best: int | None = None
        blocks = 0
        for k, h in enumerate(_block_hashes(prompt, limit)):
            holders = self._index.get(h)
            if not holders:
                break
            # prefer an idle holder (taken over in place, no copy), then the lowest slot
            best = min(holders, key=lambda s: (s not in self._idle, s))
            blocks = k + 1
        if best is None:
            return None, 0
        held = self.tokens[best]
        reused = 0
        for a, b in zip(prompt[:limit], held):  # verify (hash collisions) and extend past the blocks
            if a != b:
                break
            reused += 1
        if reused < blocks * BLOCK:  # a collision: the hashes lied
            return None, 0
        return best, reused

    def _evict(self) -> int:
        slot, _ = self._idle.popitem(last=False)
        return slot

    def _truncate(self, slot: int, n: int) -> None:
        held, hashes = self.tokens[slot], self._hashes[slot]
        keep = n // BLOCK
        for h in hashes[keep:]:
            holders = self._index.get(h)
            if holders is not None:
                holders.discard(slot)
                if not holders:
                    del self._index[h]
        del hashes[keep:]
        del held[n:]
