"""The native decode step (chatbot/inference/native.py, native_decode.cpp) against model.py:
the same logits and the same KV-cache entries, fp32 and int8, with biases, ragged positions
and scattered slots; each row's numbers independent of what else is in the batch; refusals
where it cannot run a model, and clear errors for bad input. Built here if `make install`
has not built it (g++ and ninja, as the install needs)."""

from __future__ import annotations

import copy

import pytest
import torch

from chatbot.inference import KVCache, native
from chatbot.inference.engine import Engine
from chatbot.inference.generate import SamplingParams
from chatbot.inference.precision import Int8Linear, apply
from chatbot.inference.request import generate_text
from tests.fakes import tiny_model, tokenizer  # noqa: F401 - fixture

CHAT = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "hello there how are you"}]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    native.build()
    native.available.cache_clear()
    assert native.available(), "the native decode step was built but does not load"


def served(seed: int = 0, precision: str = "fp32", **kw: object) -> torch.nn.Module:
    model = tiny_model(seed=seed, **kw)
    if kw:  # random biases, so that a bias in the wrong place would show
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.5)
    return apply(model.fuse_projections(), precision)


def prefilled(model: torch.nn.Module, lengths: list[int], slots: list[int]) -> tuple[KVCache, torch.Tensor]:
    """A KV cache holding a random prompt of each length in its slot, and the next ids."""
    cache = KVCache(model.config, 6, 64)
    with torch.inference_mode():
        for n, slot in zip(lengths, slots):
            model(torch.randint(3, 300, (1, n)), kv_cache=cache, slots=torch.tensor([slot]))
    return cache, torch.randint(3, 300, (len(lengths), 1))


def python_step(model: torch.nn.Module, cache: KVCache, ids: torch.Tensor, positions: torch.Tensor,
                slots: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids, positions[:, None], cache, slots)[:, -1]


@pytest.mark.parametrize("shape", [
    {}, {"qkv_bias": True}, {"attention_bias": True, "mlp_bias": True},
    {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1},  # heads of 64: in registers
])
def test_fp32_decode_step_matches_model_py(shape: dict[str, object]) -> None:
    model = served(seed=1, **shape)
    lengths, slots = [5, 17, 1], [4, 0, 2]  # ragged, scattered, one of them out of order
    cache, ids = prefilled(model, lengths, slots)
    positions, slot_t = torch.tensor(lengths), torch.tensor(slots)
    theirs = copy.deepcopy(cache)
    expected = python_step(model, theirs, ids, positions, slot_t)
    decoder = native.decoder_for(model, cache.data)
    assert decoder is not None
    got = decoder(ids, positions, slot_t)
    assert got.shape == (3, 300) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # the step's keys and values were written where model.py writes them, and nothing else
    torch.testing.assert_close(cache.data, theirs.data, rtol=1e-5, atol=1e-5)
    assert cache.data[:, :, 0, 18:].abs().sum() == 0  # past slot 0's new position: untouched


class Int8Reference(torch.nn.Module):
    """An int8 product as the native step computes it, written in PyTorch: the weights
    dequantised to fp32, and where the CPU has VNNI (and the input size is a multiple of 64)
    the activations rounded to int8 in blocks of 16 first, one scale (absmax / 127) each."""

    def __init__(self, child: Int8Linear) -> None:
        super().__init__()
        self.weight = child.qweight.float() * child.scales.float()[:, None]
        self.bias = None if child.bias is None else child.bias.float()
        self.blocks = torch.ops.chatbot.int8_activations() and child.in_features % 64 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks:
            b = x.reshape(*x.shape[:-1], -1, 16)
            scale = b.abs().amax(-1, keepdim=True) / 127
            x = (torch.round(b / scale) * scale).reshape(x.shape)
        return torch.nn.functional.linear(x, self.weight, self.bias)


def test_int8_decode_step_computes_what_its_pytorch_reference_does() -> None:
    model = served(seed=2, precision="int8", attention_bias=True, mlp_bias=True)
    reference = copy.deepcopy(model)
    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                setattr(parent, name, Int8Reference(child))
    cache, ids = prefilled(reference, [9, 3], [1, 3])
    positions, slots = torch.tensor([9, 3]), torch.tensor([1, 3])
    theirs = copy.deepcopy(cache)
    expected = python_step(reference, theirs, ids, positions, slots)
    decoder = native.decoder_for(model, cache.data)
    assert decoder is not None and isinstance(model.lm_head, Int8Linear)
    torch.testing.assert_close(decoder(ids, positions, slots), expected, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(cache.data, theirs.data, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [8, 7, 1])  # whole blocks of 4 weight rows, and the rows after them
@pytest.mark.parametrize("rows", [1, 3, 6])
def test_one_product_computes_x_times_the_weight(n: int, rows: int) -> None:
    """`chatbot::linear`, the product every step runs: fp32 weights, and int8 ones (with
    int8 activations where the CPU has VNNI, so there the reference rounds them too)."""
    torch.manual_seed(n * 10 + rows)
    x, w, bias, empty = torch.randn(rows, 128), torch.randn(n, 128), torch.randn(n), torch.empty(0)
    torch.testing.assert_close(torch.ops.chatbot.linear(x, w, empty, bias), x @ w.T + bias, rtol=1e-5, atol=1e-5)
    linear = torch.nn.Linear(128, n)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(bias)
    q = Int8Linear(linear)
    expected = Int8Reference(q)(x)
    weight = native.pack_int8(q.qweight) if torch.ops.chatbot.int8_activations() and n % 4 == 0 else q.qweight
    got = torch.ops.chatbot.linear(x, weight, q.scales.float(), q.bias.float())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_rows_logits_do_not_depend_on_the_rest_of_the_batch(precision: str) -> None:
    model = served(seed=3, precision=precision)
    lengths, slots = [7, 12, 4, 30, 2], [0, 1, 2, 3, 5]
    cache, ids = prefilled(model, lengths, slots)
    decoder = native.decoder_for(model, cache.data)
    assert decoder is not None
    before = cache.data.clone()
    together = decoder(ids, torch.tensor(lengths), torch.tensor(slots))
    for row in range(len(lengths)):
        cache.data.copy_(before)
        alone = decoder(ids[row:row + 1], torch.tensor(lengths[row:row + 1]), torch.tensor(slots[row:row + 1]))
        assert torch.equal(alone[0], together[row]), f"row {row} changed with the batch"


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_prefill_computes_what_decoding_token_by_token_does(precision: str) -> None:
    """Prompts packed into one call (every token a row) give exactly the logits and KV entries
    of feeding their tokens one decode step at a time: a retried reply, a chunked prompt and
    a prompt taken from the prefix cache all see the same numbers."""
    model = served(seed=6, precision=precision)
    prompts = [(torch.randint(3, 300, (n,)).tolist(), start, slot) for n, start, slot in [(11, 0, 2), (1, 0, 0), (6, 4, 5)]]
    cache = KVCache(model.config, 6, 64)
    decoder = native.decoder_for(model, cache.data)
    assert decoder is not None
    decoder(torch.tensor([7, 8, 9, 10]), torch.arange(4), torch.full((4,), 5))  # slot 5's first 4 positions
    before = cache.data.clone()
    packed = decoder.prefill(prompts)
    packed_cache = cache.data.clone()
    cache.data.copy_(before)
    for i, (tokens, start, slot) in enumerate(prompts):
        for j, token in enumerate(tokens):
            one = decoder(torch.tensor([token]), torch.tensor([start + j]), torch.tensor([slot]))
        assert torch.equal(one[0], packed[i]), f"prompt {i}: packed prefill and step-by-step decoding differ"
    assert torch.equal(cache.data, packed_cache)
    if precision == "fp32":  # and the same as model.py's padded prefill
        with torch.inference_mode():
            theirs = KVCache(model.config, 6, 64)
            theirs.data.copy_(before)
            tokens, start, slot = prompts[2]
            expected = model(torch.tensor([tokens]), torch.arange(start, start + 6)[None], theirs, torch.tensor([slot]),
                             last_only=True)[0, -1]
        torch.testing.assert_close(packed[2], expected, rtol=1e-4, atol=1e-4)


def test_models_it_cannot_run_get_none() -> None:
    cache = KVCache(tiny_model().config, 2, 16)
    assert native.decoder_for(tiny_model(), cache.data) is None  # projections not fused
    assert native.decoder_for(apply(tiny_model().fuse_projections(), "bf16"), cache.data) is None
    bf16_cache = KVCache(tiny_model().config, 2, 16, dtype=torch.bfloat16)
    assert native.decoder_for(served(), bf16_cache.data) is None
    odd = served(hidden_size=72, num_attention_heads=4, num_key_value_heads=2)  # head_dim 18
    assert native.decoder_for(odd, KVCache(odd.config, 2, 16).data) is None


def test_bad_input_is_refused_clearly_and_writes_nothing() -> None:
    model = served(seed=4)
    cache, ids = prefilled(model, [3], [0])
    decoder = native.decoder_for(model, cache.data)
    assert decoder is not None
    before = cache.data.clone()
    with pytest.raises(RuntimeError, match="beyond the KV cache"):
        decoder(ids, torch.tensor([64]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="not in the KV cache"):
        decoder(ids, torch.tensor([3]), torch.tensor([6]))
    with pytest.raises(RuntimeError, match="out of the vocabulary"):
        decoder(torch.tensor([[300]]), torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="one each per row"):
        decoder(ids, torch.tensor([3, 4]), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="is not one of the 1 rows"):
        decoder(ids, torch.tensor([3]), torch.tensor([0]), torch.tensor([1]))
    assert torch.equal(cache.data, before)


def test_the_engine_decodes_natively_with_the_same_reply(tokenizer) -> None:  # noqa: F811
    replies = {}
    for flag in (True, False):
        engine = Engine(served(seed=5), tokenizer, max_batch_size=2, max_seq_len=128, native_decode=flag)
        assert engine.decode_path == ("native" if flag else "python")
        engine.start()
        try:
            replies[flag] = generate_text(engine, CHAT, SamplingParams(max_tokens=24, temperature=0.0), timeout=30)
        finally:
            engine.stop()
    (text, final), (python_text, _) = replies[True], replies[False]
    assert final.completion_tokens > 1 and text == python_text


def test_an_int8_engine_prefills_everything_natively_and_repeats_a_seeded_reply_exactly(tokenizer) -> None:  # noqa: F811
    """A retried reply must repeat its text: with an int8 model every prefill, however long,
    runs natively, and a seeded reply comes out the same alone and beside other prompts."""
    model = served(seed=7, precision="int8", max_position_embeddings=512)
    engine = Engine(model, tokenizer, max_batch_size=4, max_seq_len=512, max_prefill_tokens=512)
    assert engine._native is not None and engine._native.prefills(10_000)
    assert not native.decoder_for(served(seed=7), KVCache(model.config, 2, 16).data).prefills(129)  # type: ignore[union-attr]
    long_chat = [{"role": "user", "content": "hello there how are you doing today " * 20}]
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11, min_tokens=20)
    engine.start()
    try:
        alone, _ = generate_text(engine, long_chat, params, timeout=60)
        others = [engine.submit([{"role": "user", "content": "i am fine thanks " * (4 + i)}],
                                SamplingParams(max_tokens=20, seed=i), lambda e: None) for i in range(3)]
        beside, _ = generate_text(engine, long_chat, params, timeout=60)
        for handle in others:
            assert handle.done.wait(60)
    finally:
        engine.stop()
    assert len(engine.count_prompt_tokens(long_chat)) > native.PREFILL_MAX_TOKENS
    assert alone == beside and alone
