"""Unit tests of `chatbot.inference`: model, KV cache, checkpoints, tokenizer streaming, sampling,
engine. Tiny random models and a tokenizer trained in-process keep the file fast on 2
cores; nothing is downloaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chatbot.inference import (
    ChatTokenizer,
    Engine,
    EngineEvent,
    KVCache,
    LlamaForCausalLM,
    PromptTooLongError,
    SamplingParams,
    generate_text,
)
from chatbot.inference.generate import StopMatcher, make_generator, sample_token
from chatbot.training.train import SPECIAL_TOKENS
from tests.fakes import (
    FakeRequest,
    FakeSender,
    chat_model_config,
    load_chat_model,
    make_engine,
    metric_value,
    tiny_model,
)
from tests.waiting import eventually

TEXT = "Hello there 👋🏽! 你好，世界。Ça va? 🎉🎉 naïve café — 日本語のテキスト 🤖"


# ---- model ---------------------------------------------------------------------------


def reference_forward(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """HF Llama math written out from the state dict (rotate_half RoPE, repeat_kv GQA)."""
    c, sd = model.config, model.state_dict()
    T, hd, nh, nkv = ids.shape[1], c.head_dim, c.num_attention_heads, c.num_key_value_heads
    assert hd is not None

    def norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    def rope(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, hd]
        inv = 1.0 / c.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        ang = torch.outer(torch.arange(T).float(), inv)
        cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
        rot = torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    x = sd["model.embed_tokens.weight"][ids]
    causal = torch.ones(T, T).tril().bool()
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(1, T, nh, hd).transpose(1, 2)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(1, T, nkv, hd).transpose(1, 2)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(1, T, nkv, hd).transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        att = (q @ k.transpose(-1, -2) / hd**0.5).masked_fill(~causal, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(1, T, nh * hd) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = h @ sd[p + "mlp.gate_proj.weight"].T, h @ sd[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def test_forward_matches_reference_math() -> None:
    model = tiny_model()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference_forward(model, ids), atol=1e-4, rtol=1e-4)


def test_kv_cache_ragged_batch_matches_full_forward() -> None:
    model = tiny_model()
    cache = KVCache(model.config, num_slots=3, max_len=64)
    a, b = torch.randint(0, 300, (1, 20)), torch.randint(0, 300, (1, 14))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)  # [1, T, V], no cache
        # prefill each prompt into its own slot, different lengths
        pa = model(a[:, :9], torch.arange(9)[None], cache, torch.tensor([2]))
        pb = model(b[:, :3], torch.arange(3)[None], cache, torch.tensor([0]))
        torch.testing.assert_close(pa, full_a[:, :9], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pb, full_b[:, :3], atol=1e-4, rtol=1e-4)
        # then decode both in one batch, one token per step, at their own positions
        for step in range(11):
            ta, tb = 9 + step, 3 + step
            ids = torch.tensor([[a[0, ta]], [b[0, tb]]])  # [2, 1]
            logits = model(ids, torch.tensor([[ta], [tb]]), cache, torch.tensor([2, 0]))  # [2, 1, V]
            torch.testing.assert_close(logits[0, 0], full_a[0, ta], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(logits[1, 0], full_b[0, tb], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_save_and_load_round_trip(tmp_path: Path, tied: bool) -> None:
    from safetensors.torch import load_file

    model = tiny_model(tie_word_embeddings=tied)
    model.save_pretrained(tmp_path)
    names = set(load_file(str(tmp_path / "model.safetensors")))
    assert "model.layers.1.self_attn.k_proj.weight" in names and "model.norm.weight" in names
    assert ("lm_head.weight" in names) == (not tied), "tied checkpoints omit lm_head like HF"
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.to_dict() == model.config.to_dict()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


# ---- tokenizer -----------------------------------------------------------------------


def test_chat_template_and_special_tokens(tokenizer: ChatTokenizer) -> None:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.encode(prompt)
    assert ids[0] == SPECIAL_TOKENS.index("<|im_start|>") and tokenizer.eos_token_id in ids


def test_tokenizer_files_round_trip(tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = ChatTokenizer.from_pretrained(tmp_path)
    assert loaded.eos_token == "<|im_end|>" and loaded.encode(TEXT) == tokenizer.encode(TEXT)


def test_stream_decoder_only_emits_whole_characters(tokenizer: ChatTokenizer) -> None:
    ids = tokenizer.encode(TEXT)
    # the test only means something if some single tokens are partial characters
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = tokenizer.stream_decoder()
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # raises on lone surrogates
    assert "".join(deltas) == TEXT == tokenizer.decode(ids)


# ---- sampling ------------------------------------------------------------------------


def test_sampling_is_reproducible_per_seed() -> None:
    logits = torch.randn(300)
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7)

    def draw(seed: int) -> list[int]:
        gen = make_generator(seed)
        return [sample_token(logits, params, gen) for _ in range(30)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)
    greedy = SamplingParams(temperature=0.0)
    assert sample_token(logits, greedy, make_generator(None)) == int(logits.argmax())
    top1 = SamplingParams(temperature=1.0, top_k=1)
    assert sample_token(logits, top1, make_generator(1)) == int(logits.argmax())
    # top_p keeps only the smallest head of the distribution that covers p
    peaked = torch.tensor([10.0, 9.0, -5.0, -5.0])
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    assert {sample_token(peaked, nucleus, make_generator(s)) for s in range(20)} == {0}


def test_stop_matcher_holds_back_partial_stop_strings() -> None:
    m = StopMatcher(("STOP",))
    assert m.feed("hello S") == ("hello ", False)
    assert m.feed("T") == ("", False)
    assert m.feed("x") == ("STx", False)
    assert m.feed(" and ST") == (" and ", False)
    assert m.feed("OP more") == ("", True)


# ---- engine --------------------------------------------------------------------------


def gate_forward(engine: Engine) -> threading.Event:
    """Make the engine's forwards wait for the returned event: requests submitted meanwhile
    pile up in the queue, so the next iteration admits them together (deterministically)."""
    gate = threading.Event()
    fast_forward = engine.model.forward

    def gated(*args: object, **kwargs: object) -> torch.Tensor:
        assert gate.wait(20), "gate never opened"
        return fast_forward(*args, **kwargs)

    engine.model.forward = gated  # type: ignore[method-assign]
    return gate


def chat_of(n: int) -> list[dict[str, str]]:
    """Chats whose prompts differ in length."""
    return [{"role": "user", "content": "hello there " * (1 + n) + "how are you"}]


def test_batched_prefill_matches_prefill_alone(tokenizer: ChatTokenizer) -> None:
    from chatbot.inference.request import _Sequence

    model = tiny_model(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_token_id)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=128)  # not started: drive _prefill directly
    torch.manual_seed(1)
    engine.cache.data.normal_()  # stale garbage from "earlier" sequences must never be read
    prompts = [torch.randint(3, tokenizer.vocab_size, (n,)).tolist() for n in (5, 17, 1, 11)]

    def seq(ids: list[int], slot: int) -> _Sequence:
        return _Sequence(handle=None, params=SamplingParams(), on_event=print, prompt_ids=ids,  # type: ignore[arg-type]
                         max_new=8, generator=make_generator(0), decoder=None, stop=None, slot=slot)  # type: ignore[arg-type]

    batch = [seq(ids, slot) for slot, ids in zip((3, 0, 2, 1), prompts)]
    with torch.inference_mode():
        lens = [len(p) for p in prompts]
        batched = engine._prefill(batch, lens, max(lens))  # [4, V]: one right-padded forward
        assert batched.shape == (4, tokenizer.vocab_size)
        assert [s.pos for s in batch] == [len(p) for p in prompts]
        for i, ids in enumerate(prompts):
            full = model(torch.tensor([ids]))  # [1, n, V]: no cache at all
            torch.testing.assert_close(batched[i], full[0, -1], atol=1e-4, rtol=1e-4)
        # the pads wrote past the short prompts: decoding must overwrite them before use,
        # so the next tokens of every sequence, decoded together, match the full forward
        extra = [torch.randint(3, tokenizer.vocab_size, (3,)).tolist() for _ in prompts]
        for step in range(3):
            ids = torch.tensor([[e[step]] for e in extra])  # [4, 1]
            positions = torch.tensor([[len(p) + step] for p in prompts])  # [4, 1]
            logits = model(ids, positions, engine.cache, torch.tensor([s.slot for s in batch]))  # [4, 1, V]
            for i, p in enumerate(prompts):
                full = model(torch.tensor([p + extra[i][: step + 1]]))
                torch.testing.assert_close(logits[i, 0], full[0, -1], atol=1e-4, rtol=1e-4)


CHAT = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hello there"}]


def test_engine_concurrent_requests_complete(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True)
    try:
        events: dict[int, list[EngineEvent]] = {0: [], 1: []}
        handles = [engine.submit(CHAT, SamplingParams(max_tokens=12 + i, seed=i), events[i].append) for i in (0, 1)]
        for h in handles:
            assert h.done.wait(20), "request did not finish"
        for i in (0, 1):
            final = events[i][-1]
            assert [e.final for e in events[i]].count(True) == 1 and final.final
            assert final.finish_reason == "length" and final.completion_tokens == 12 + i
            assert final.prompt_tokens == len(engine.count_prompt_tokens(CHAT))
        # batched decode gives the same tokens as running alone (same seed)
        alone, _ = generate_text(engine, CHAT, SamplingParams(max_tokens=12, seed=0))
        assert alone == "".join(e.text for e in events[0])
    finally:
        engine.stop()


def test_engine_eight_concurrent_requests_prefill_together(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True, max_batch_size=8)
    try:
        gate = gate_forward(engine)
        events: dict[int, list[EngineEvent]] = {i: [] for i in range(8)}
        handles = [engine.submit(chat_of(i), SamplingParams(max_tokens=5 + i, seed=i), events[i].append)
                   for i in range(8)]
        eventually(lambda: engine.stats().queue_length + engine.stats().active_sequences >= 8, timeout=10,
                   interval=0.01, what="all eight requests queued or running", fail=False)
        gate.set()
        for h in handles:
            assert h.done.wait(30), "request did not finish"
        for i in range(8):
            finals = [e for e in events[i] if e.final]
            assert len(finals) == 1 and events[i][-1].final, "exactly one final event, last"
            assert finals[0].finish_reason == "length" and finals[0].completion_tokens == 5 + i
            assert finals[0].prompt_tokens == len(engine.count_prompt_tokens(chat_of(i)))
        stats = engine.stats()
        # the first forward may hold one or more; everything queued behind the gate goes in one more
        assert stats.prefill_batches_total <= 2, stats
        # every prompt token is read once, or copied from the prefix cache: the first prompt's
        # KV entries may serve the later ones' shared beginning (a matter of timing)
        assert stats.prefill_tokens_total + stats.prefix_reused_tokens_total == sum(
            len(engine.count_prompt_tokens(chat_of(i))) for i in range(8))
        assert stats.first_tokens_total == 8 and stats.output_tokens_total == sum(4 + i for i in range(8))
        assert stats.requests_total["length"] == 8 and stats.active_sequences == 0 and stats.queue_length == 0
        assert stats.ttft_ms_total > 0 and stats.tpot_ms_total > 0
        # seeded: the same tokens alone as in the batch of 8
        alone, _ = generate_text(engine, chat_of(3), SamplingParams(max_tokens=8, seed=3))
        assert alone == "".join(e.text for e in events[3])
    finally:
        engine.stop()


def test_engine_prefill_budget_splits_a_burst(tokenizer: ChatTokenizer) -> None:
    n = len(tokenizer.encode(tokenizer.apply_chat_template(chat_of(0))))
    # room for two prompts of the burst per prefill (padded to the longer)
    # (no prefix cache: the burst's prompts are the same, each would reuse the first's)
    engine = make_engine(tokenizer, never_eos=True, max_batch_size=8, max_prefill_tokens=2 * n, prefix_cache=False)
    try:
        gate = gate_forward(engine)
        handles = [engine.submit(chat_of(0), SamplingParams(max_tokens=3, seed=i), lambda e: None) for i in range(6)]
        eventually(lambda: engine.stats().queue_length + engine.stats().active_sequences >= 6, timeout=10,
                   interval=0.01, what="all six requests queued or running", fail=False)
        gate.set()
        for h in handles:
            assert h.done.wait(30), "request did not finish"
        stats = engine.stats()
        assert stats.prefill_batches_total >= 3 and stats.requests_total["length"] == 6, stats
        # a prompt above the budget is prefilled in chunks, one forward each
        before = engine.stats()
        text, final = generate_text(engine, chat_of(12), SamplingParams(max_tokens=3, seed=0))
        assert final.finish_reason == "length" and final.completion_tokens == 3
        after = engine.stats()
        computed = after.prefill_tokens_total - before.prefill_tokens_total
        assert computed > 2 * n and after.prefill_batches_total - before.prefill_batches_total >= computed / (2 * n)
    finally:
        engine.stop()


def test_engine_cancellation_stops_within_a_step(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True)
    try:
        events: list[EngineEvent] = []
        got_token = threading.Event()
        handle = engine.submit(CHAT, SamplingParams(max_tokens=100, seed=1),
                               lambda e: (events.append(e), got_token.set()))
        assert got_token.wait(20)
        handle.cancel()
        assert handle.done.wait(20)
        final = events[-1]
        assert final.finish_reason == "cancelled" and final.completion_tokens < 100
    finally:
        engine.stop()


def test_engine_cancels_a_request_still_waiting_for_a_slot(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True, max_batch_size=1)
    try:
        gate = gate_forward(engine)  # closed: the engine holds in the first forward (of `running`)
        running = engine.submit(CHAT, SamplingParams(max_tokens=100, seed=1), lambda e: None)
        events: list[EngineEvent] = []
        waiting = engine.submit(CHAT, SamplingParams(max_tokens=5, seed=2), events.append)
        waiting.cancel()  # the only slot is taken: it is cancelled while waiting
        gate.set()
        assert waiting.done.wait(20) and not running.done.is_set(), "cancelled before it got the slot"
        assert [e.finish_reason for e in events] == ["cancelled"] and events[0].completion_tokens == 0
        running.cancel()
        assert running.done.wait(20)
    finally:
        engine.stop()


def test_engine_background_requests_yield_to_interactive_ones(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, never_eos=True, max_batch_size=4, prefix_cache=False)
    try:
        assert engine.background_slots == 1
        gate = gate_forward(engine)  # closed: the engine holds in the first forward (of `first`)
        order: list[str] = []  # names, in the order of their first event
        background_held: list[int] = []  # background sequences holding a slot, at every event

        def on_event(name: str) -> Callable[[EngineEvent], None]:
            def record(event: EngineEvent) -> None:  # engine thread
                background_held.append(sum(s.background for s in engine._active))
                if name not in order:
                    order.append(name)
            return record

        params = SamplingParams(max_tokens=3, seed=0)
        first = engine.submit(CHAT, params, on_event("first"))
        started = time.monotonic()  # 10 s for this wait and the next together
        eventually(lambda: engine.stats().active_sequences >= 1, timeout=10, interval=0.01,
                   what="the first request running", fail=False)
        # background requests queued before interactive ones, all behind the gate
        handles = [engine.submit(chat_of(i), params, on_event(f"title{i}"), background=True) for i in range(3)]
        handles += [engine.submit(chat_of(i), params, on_event(f"reply{i}")) for i in range(3)]
        eventually(lambda: engine.stats().queue_length >= 6, timeout=max(0.0, 10 - (time.monotonic() - started)),
                   interval=0.01, what="six requests queued", fail=False)
        gate.set()
        for h in [first, *handles]:
            assert h.done.wait(30), "request did not finish"
        replies = [order.index(f"reply{i}") for i in range(3)]
        titles = [order.index(f"title{i}") for i in range(3)]
        assert max(replies) < min(titles), order  # every reply started before any title
        assert max(background_held) == 1, "background requests held more rows than background_slots"
    finally:
        engine.stop()


def test_background_prompts_are_prefilled_only_when_no_interactive_one_is(tokenizer: ChatTokenizer) -> None:
    from chatbot.inference.request import _Sequence

    engine = make_engine(tokenizer, max_batch_size=4)
    engine.stop()  # drive the plan directly

    def seq(n: int, slot: int, background: bool) -> _Sequence:
        return _Sequence(handle=None, params=SamplingParams(), on_event=print, prompt_ids=[5] * n,  # type: ignore[arg-type]
                         max_new=8, generator=make_generator(0), decoder=None, stop=None,  # type: ignore[arg-type]
                         slot=slot, background=background)

    title, reply = seq(30, 0, True), seq(10, 1, False)
    engine._active = [title, reply]
    assert engine._chunk_plan() == ([reply], [10], 10)
    engine._active = [title]
    assert engine._chunk_plan() == ([title], [30], 30)


def test_engine_rejects_bad_requests_clearly(tokenizer: ChatTokenizer) -> None:
    engine = make_engine(tokenizer, max_seq_len=64)
    try:
        long_chat = [{"role": "user", "content": "hello there " * 100}]
        n = len(engine.count_prompt_tokens(long_chat))
        with pytest.raises(PromptTooLongError, match=f"prompt has {n} tokens, the context window is 64"):
            engine.submit(long_chat, SamplingParams(), lambda e: None)
        with pytest.raises(ValueError, match="non-empty"):
            engine.submit([], SamplingParams(), lambda e: None)
        with pytest.raises(ValueError, match="role"):
            engine.submit([{"role": "wizard", "content": "x"}], SamplingParams(), lambda e: None)
        with pytest.raises(ValueError, match="top_p"):
            engine.submit(CHAT, SamplingParams(top_p=0.0), lambda e: None)
        # a prompt that nearly fills the window is clamped to the room left: "length"
        text, final = generate_text(engine, [{"role": "user", "content": "hello " * 20}], SamplingParams(max_tokens=500))
        assert final.finish_reason in ("length", "stop")
        assert final.prompt_tokens + final.completion_tokens <= 64
    finally:
        engine.stop()


def test_shipped_demo_model_replies() -> None:
    demo = Path(__file__).resolve().parents[3] / "triton_models" / "chat" / "1" / "demo"
    if not (demo / "model.safetensors").exists():
        pytest.skip("demo model not trained")
    engine = Engine.from_pretrained(demo, max_batch_size=1)
    engine.start()
    try:
        text, final = generate_text(engine, [{"role": "user", "content": "Hi! How are you?"}],
                                    SamplingParams(max_tokens=40, seed=0))
        assert final.finish_reason in ("stop", "length") and final.completion_tokens > 0 and text.strip()
    finally:
        engine.stop()


# ---- the Triton adapter, against a fake `triton_python_backend_utils` ---------------------


def test_triton_adapter_streams_errors_and_cancels(
    tokenizer: ChatTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    import numpy as np

    model = tiny_model(vocab_size=tokenizer.vocab_size, tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    with torch.no_grad():  # never EOS, as in make_engine
        model.lm_head.weight.mul_(100.0)
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    module = load_chat_model(monkeypatch)

    triton_model = module.TritonPythonModel()  # type: ignore[attr-defined]
    params = {"model_dir": str(tmp_path), "num_threads": str(torch.get_num_threads()), "max_seq_len": "256"}
    triton_model.initialize({
        "model_config": json.dumps(chat_model_config(**params)),
        "model_name": "chat", "model_version": "1",
    })
    engine_model = triton_model.engine.model
    fast_forward = engine_model.forward

    def slow_forward(*args: object, **kwargs: object) -> torch.Tensor:
        time.sleep(0.005)  # a tiny model outruns the 50 ms cancel poll; real ones don't
        return fast_forward(*args, **kwargs)

    engine_model.forward = slow_forward
    try:
        def request(messages: object, sender: FakeSender, **extra: object) -> FakeRequest:
            raw = messages if isinstance(messages, bytes) else json.dumps(messages).encode()
            inputs: dict[str, object] = {"messages": np.array([raw], dtype=np.object_)}
            inputs.update({k: np.array([v]) for k, v in extra.items()})
            return FakeRequest(inputs, sender)

        ok, bad, cancel = FakeSender(), FakeSender(), FakeSender(cancel_after=2)
        assert triton_model.execute([
            request(CHAT, ok, max_tokens=np.int32(5), seed=np.int64(3)),
            request(b"{not json", bad),
            request(CHAT, cancel, max_tokens=np.int32(200)),
        ]) is None
        for sender in (ok, bad, cancel):
            assert sender.closed.wait(20), "every sender must be closed with the final flag"
            assert [flags for _, flags in sender.sent].count(1) == 1 and sender.sent[-1][1] == 1

        last = ok.sent[-1][0].outputs
        assert last["finish_reason"][0] == b"length" and int(last["completion_tokens"][0]) == 5
        assert all(r.outputs["finish_reason"][0] == b"" for r, _ in ok.sent[:-1])
        assert bad.sent[0][0].error is not None and "JSON" in bad.sent[0][0].error.message
        final = cancel.sent[-1][0].outputs
        assert final["finish_reason"][0] == b"cancelled" and int(final["completion_tokens"][0]) < 200

        # stop strings: a JSON list; the reply ends right before the first match
        text = b"".join(r.outputs["text"][0] for r, _ in ok.sent).decode()
        assert len(text) >= 4, f"need some text to cut: {text!r}"
        cut = text[2:4]
        stopped, bad_stops = FakeSender(), [FakeSender() for _ in range(3)]
        stop_json = json.dumps(["never-in-this-text", cut]).encode()
        triton_model.execute([
            request(CHAT, stopped, max_tokens=np.int32(5), seed=np.int64(3), stop=stop_json),
            request(CHAT, bad_stops[0], stop=b"[not json"),
            request(CHAT, bad_stops[1], stop=b'["ok", 3]'),
            request(CHAT, bad_stops[2], stop=b'[""]'),
        ])
        for sender in (stopped, *bad_stops):
            assert sender.closed.wait(20), "every sender must be closed with the final flag"
        got = b"".join(r.outputs["text"][0] for r, _ in stopped.sent).decode()
        assert got == text[: text.index(cut)], (got, text, cut)
        assert stopped.sent[-1][0].outputs["finish_reason"][0] == b"stop"
        for sender in bad_stops:
            error = sender.sent[0][0].error
            assert error is not None and error.message.startswith("invalid request: stop"), error.message

        # metrics: engine counters reach the Triton metric families, labelled by model/version
        eventually(lambda: metric_value("chat_requests_total", finish_reason="stop") >= 1, timeout=10,
                   interval=0.05, what="a request counted as stopped")
        labels = {"model": "chat", "version": "1"}
        assert metric_value("chat_requests_total", finish_reason="length", **labels) == 1
        assert metric_value("chat_requests_total", finish_reason="cancelled", **labels) == 1
        assert metric_value("chat_requests_total", finish_reason="stop", **labels) == 1
        assert metric_value("chat_first_tokens_total", **labels) == 3
        assert metric_value("chat_time_to_first_token_ms_total", **labels) > 0
        assert metric_value("chat_output_tokens_total", **labels) >= 4
        assert metric_value("chat_time_per_output_token_ms_total", **labels) > 0
        assert metric_value("chat_active_sequences", **labels) == 0
        assert metric_value("chat_queue_length", **labels) == 0
    finally:
        triton_model.finalize()


def test_loading_runs_in_a_thread_that_has_ended_and_its_error_reaches_the_caller() -> None:
    import threading

    from chatbot.inference.engine import in_passing_thread

    seen: list[threading.Thread] = []

    def load() -> str:
        seen.append(threading.current_thread())
        return "engine"

    assert in_passing_thread(load) == "engine"
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive(), "its OpenMP pool is gone with it"

    def fail() -> None:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        in_passing_thread(fail)
