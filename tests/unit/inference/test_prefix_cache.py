"""The KV-cache slot pool (chatbot/inference/prefix_cache.py) and the engine's use of it: prefix
reuse across turns and personas, chunked prefill, and that both compute what a fresh,
unchunked prefill computes."""

from __future__ import annotations

import threading

import pytest
import torch

from chatbot.inference.engine import Engine
from chatbot.inference.generate import SamplingParams
from chatbot.inference.prefix_cache import BLOCK, SlotPool
from chatbot.inference.request import generate_text
from chatbot.inference.tokenizer import ChatTokenizer
from tests.fakes import make_engine, tiny_model

# ---- the pool, pure bookkeeping ---------------------------------------------------------


def conversation(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


def test_a_new_prompt_gets_an_empty_slot_and_reuses_nothing() -> None:
    pool = SlotPool(3)
    placement = pool.acquire(conversation(40))
    assert (placement.slot, placement.reused, placement.copy_from) == (0, 0, None)
    assert pool.active == 1


def test_the_next_turn_takes_its_previous_slot_over_in_place() -> None:
    pool = SlotPool(3)
    first = conversation(40)
    p = pool.acquire(first)
    pool.extend(p.slot, first + [7, 8, 9])  # the prompt, then the reply tokens fed back
    pool.release(p.slot)
    assert pool.cached_tokens == 43
    nxt = first + [7, 8, 9, 10] + conversation(20, start=5000)
    again = pool.acquire(nxt)
    assert again == type(again)(p.slot, 43, None)  # in place: no copy, 43 tokens not recomputed
    assert pool.tokens[p.slot] == nxt[:43] and pool.cached_tokens == 0


def test_a_shared_system_prompt_is_copied_not_taken_from_its_conversation() -> None:
    pool = SlotPool(3)
    system = conversation(2 * BLOCK + 5)
    a = system + conversation(60, start=3000)
    pa = pool.acquire(a)
    pool.extend(pa.slot, a)
    b = system + conversation(30, start=7000)
    pb = pool.acquire(b)  # `a` is still generating: its system prompt is copied
    assert (pb.copy_from, pb.reused) == (pa.slot, len(system)) and pb.slot != pa.slot
    assert pool.tokens[pb.slot] == system
    pool.release(pa.slot)
    pool.extend(pb.slot, b[len(system):])
    pool.release(pb.slot)
    c = system + conversation(10, start=9000)
    pc = pool.acquire(c)  # idle holders, but each holds far more than the shared part: copy
    assert pc.copy_from in (pa.slot, pb.slot) and pc.reused == len(system)
    assert pc.slot not in (pa.slot, pb.slot)
    assert pool.tokens[pa.slot] == a, "the other conversation's cache is kept"


def test_the_last_prompt_token_is_always_computed() -> None:
    pool = SlotPool(2)
    prompt = conversation(2 * BLOCK)
    p = pool.acquire(prompt)
    pool.extend(p.slot, prompt)
    pool.release(p.slot)
    again = pool.acquire(prompt)  # the same prompt again (a regenerated reply)
    assert again.reused == len(prompt) - 1


def test_least_recently_used_idle_slot_is_evicted() -> None:
    pool = SlotPool(2)
    a, b, c = conversation(40, 100), conversation(40, 200), conversation(40, 300)
    for prompt in (a, b):
        p = pool.acquire(prompt)
        pool.extend(p.slot, prompt)
        pool.release(p.slot)
    pc = pool.acquire(c)  # no empty slot: the oldest idle one (a's) goes
    assert pc.reused == 0 and pool.tokens[pc.slot] == []
    pool.release(pc.slot)
    assert pool.acquire(b + [1]).reused == 40, "b's cache survived"
    with pytest.raises(RuntimeError, match="in use"):
        pool.acquire(a)
        pool.acquire(a)


def test_forget_drops_a_slot_s_content() -> None:
    pool = SlotPool(2)
    prompt = conversation(40)
    p = pool.acquire(prompt)
    pool.extend(p.slot, prompt)
    pool.forget(p.slot)
    assert pool.acquire(prompt + [1]).reused == 0


def test_a_hash_collision_is_a_miss_not_a_wrong_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    import chatbot.inference.prefix_cache as pc

    pool = pc.SlotPool(2)
    a = conversation(40)
    p = pool.acquire(a)
    monkeypatch.setattr(pc, "hash", lambda _: 42, raising=False)  # every block hashes alike
    pool.extend(p.slot, a)
    pool.release(p.slot)
    other = conversation(40, start=50_000)
    assert pool.acquire(other).reused == 0


# ---- the engine with the pool ------------------------------------------------------------

SYSTEM = {"role": "system", "content": "you are fine thanks " * 12}


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def fresh_reply(tokenizer: ChatTokenizer, chat: list[dict[str, str]], max_tokens: int = 8) -> str:
    """What an engine with an empty cache and no chunking replies (the reference)."""
    engine = make_engine(tokenizer, never_eos=True, max_seq_len=256, max_prefill_tokens=4096)
    try:
        return generate_text(engine, chat, greedy(max_tokens))[0]
    finally:
        engine.stop()


def test_next_turn_reuses_the_conversation_and_replies_as_if_computed_afresh(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True, max_seq_len=256)
    try:
        chat = [SYSTEM, {"role": "user", "content": "hello there how are you"}]
        reply, final = generate_text(engine, chat, greedy())
        first_prompt = final.prompt_tokens
        before = engine.stats()
        assert before.cached_tokens >= first_prompt
        chat = chat + [{"role": "assistant", "content": reply}, {"role": "user", "content": "what do you like"}]
        second, final = generate_text(engine, chat, greedy())
        after = engine.stats()
        reused = after.prefix_reused_tokens_total - before.prefix_reused_tokens_total
        assert reused >= first_prompt, "the first turn's prompt is not prefilled again"
        assert after.prefill_tokens_total - before.prefill_tokens_total == final.prompt_tokens - reused
        assert second == fresh_reply(tokenizer, chat)
    finally:
        engine.stop()


def test_conversations_of_one_persona_share_its_system_prompt(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True, max_seq_len=256)
    try:
        system_tokens = len(engine.count_prompt_tokens([SYSTEM])) - 2  # minus what follows the system turn
        replies = []
        for text in ("hello there", "what do you like doing today"):
            before = engine.stats().prefix_reused_tokens_total
            replies.append(generate_text(engine, [SYSTEM, {"role": "user", "content": text}], greedy())[0])
            reused = engine.stats().prefix_reused_tokens_total - before
        assert reused >= (system_tokens // BLOCK) * BLOCK, "the second conversation reused the system prompt"
        assert replies[1] == fresh_reply(tokenizer, [SYSTEM, {"role": "user", "content": "what do you like doing today"}])
    finally:
        engine.stop()


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_result(tokenizer: ChatTokenizer) -> None:
    chat = [{"role": "user", "content": "hello there how are you doing today " * 6}]
    engine = make_engine(tokenizer, never_eos=True, max_seq_len=256, max_prefill_tokens=16)
    try:
        reply, final = generate_text(engine, chat, greedy())
        stats = engine.stats()
        assert stats.prefill_batches_total >= final.prompt_tokens // 16
        assert reply == fresh_reply(tokenizer, chat)
    finally:
        engine.stop()


def test_a_long_prefill_does_not_stall_streams_in_progress(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True, max_seq_len=256, max_prefill_tokens=16)
    try:
        streaming = threading.Event()
        stream = engine.submit([{"role": "user", "content": "hi"}], greedy(200), lambda e: streaming.set())
        assert streaming.wait(20)
        long_chat = [{"role": "user", "content": "hello there how are you doing today " * 6}]
        # output tokens (only the stream decodes meanwhile) from the long request's arrival
        # to its only event, counted by the engine itself: text deltas may hold tokens back
        before = engine.stats().output_tokens_total
        at_end: list[int] = []
        done = engine.submit(long_chat, greedy(1), lambda e: at_end.append(engine.stats().output_tokens_total))
        assert done.done.wait(30)
        stream.cancel()
        assert stream.done.wait(20)
        chunks = -(-done.prompt_tokens // 16)
        assert chunks >= 3
        # the stream kept getting tokens: one per prefill chunk (but the last, whose step may
        # end first), not none for the whole prefill
        tokens_meanwhile = at_end[0] - before
        assert tokens_meanwhile >= chunks - 1, (tokens_meanwhile, chunks)
    finally:
        engine.stop()


def test_memory_budget_buys_idle_slots(tokenizer: ChatTokenizer) -> None:
    model = tiny_model(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)
    from chatbot.inference.kv_cache import KVCache

    one = KVCache.slot_bytes(model.config, 64, torch.float32)
    engine = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64, kv_cache_bytes=10 * one)
    assert engine.cache.num_slots == 10 and engine.pool.num_slots == 10
    small = Engine(model, tokenizer, max_batch_size=2, max_seq_len=64, kv_cache_bytes=one)
    assert small.cache.num_slots == 3, "never fewer slots than the decode batch and its background row"
