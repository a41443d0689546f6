"""Our Llama against the reference implementation: `transformers.LlamaForCausalLM`.

`tests/unit/inference/test_llm.py` checks the model against the HF math written out by hand; this
file checks it against the real thing, through the checkpoint format in both directions:
tiny random weights saved by one implementation are loaded by the other and both must
produce the same logits (fp32, atol 1e-4). The incremental paths the engine relies on
(prefill into a KV-cache slot, chunked prefill, right-padded batched prefill, batched
ragged decode) are compared against a plain full forward of `transformers`, which has no
cache in play. HF runs with `attn_implementation="eager"` so the reference is its
explicit softmax attention, not the same SDPA kernel we call.

Everything is tiny (2 layers, hidden 64, vocab 128) and CPU-only; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers.utils import logging as hf_logging

from chatbot.inference.kv_cache import KVCache
from chatbot.inference.llama_config import LlamaConfig
from chatbot.inference.model import LlamaForCausalLM
from tests.fakes import tiny_config, tiny_model

# transformers prints load reports and progress bars; they only clutter a failing test's output
hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

VOCAB = 128
ATOL = 1e-4

# Config variants both directions must agree on. Tied and untied heads differ in what the
# checkpoint holds (tied ones omit lm_head.weight); rope_theta != 10000 and llama3 scaling
# are where config-key conventions differ between transformers versions.
LLAMA3_SCALING: dict[str, Any] = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,  # small, so the 96-token inputs reach the scaled band
}
VARIANTS: dict[str, dict[str, Any]] = {
    "tied": {"tie_word_embeddings": True},
    "untied": {"tie_word_embeddings": False},
    "rope theta 500000": {"rope_theta": 500000.0, "tie_word_embeddings": False},
    "head_dim 32 with biases": {"head_dim": 32, "attention_bias": True, "mlp_bias": True},
    "llama3 rope scaling": {"rope_theta": 500000.0, "rope_scaling": LLAMA3_SCALING},
}



# tests.fakes' tiny Llama, with a smaller vocabulary and a longer context
SIZES: dict[str, Any] = {"vocab_size": VOCAB, "max_position_embeddings": 256}


def reference_config(**kw: Any) -> LlamaConfig:
    return tiny_config(**{**SIZES, **kw})


def our_random_model(seed: int = 0, **kw: Any) -> LlamaForCausalLM:
    # weights of std 0.2, larger than a training init: logits that vary by several units, so a
    # wrong rotary table or a transposed head shows up far above the tolerance
    return tiny_model(seed, **{**SIZES, **kw})


def hf_from_pretrained(model_dir: Path) -> transformers.LlamaForCausalLM:
    model = transformers.LlamaForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32,
    )
    return model.eval()


def hf_random_model(seed: int = 0, **kw: Any) -> transformers.LlamaForCausalLM:
    """A transformers model with random weights, built from our config's HF dict."""
    cfg = reference_config(**kw).to_dict()
    hf_config = transformers.LlamaConfig(**cfg, attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(hf_config)
    # HF's own init (std 0.02, norms at 1) gives near-uniform logits; widen like ours
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_logits(model: transformers.LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=0)


# ---- checkpoints, both directions -----------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_loads_our_checkpoint_and_computes_the_same_logits(variant: str, tmp_path: Path) -> None:
    ours = our_random_model(**VARIANTS[variant])
    ours.save_pretrained(tmp_path)
    reference = hf_from_pretrained(tmp_path)
    ids = random_ids(2, 96)
    with torch.no_grad():
        assert_close(ours(ids), hf_logits(reference, ids))


@pytest.mark.parametrize(
    "variant", list(VARIANTS),
)
def test_we_load_a_transformers_checkpoint_and_compute_the_same_logits(variant: str, tmp_path: Path) -> None:
    reference = hf_random_model(**VARIANTS[variant])
    reference.save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    ids = random_ids(2, 96)
    with torch.no_grad():
        assert_close(ours(ids), hf_logits(reference, ids))


def test_a_tied_checkpoint_from_transformers_keeps_the_head_tied_to_the_embedding(tmp_path: Path) -> None:
    hf_random_model(tie_word_embeddings=True).save_pretrained(tmp_path)
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


# ---- the KV-cache paths against a full forward ----------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, transformers.LlamaForCausalLM]:
    """Our model and transformers' on the same (untied, theta 500000) weights."""
    model_dir = tmp_path_factory.mktemp("pair")
    ours = our_random_model(seed=3, tie_word_embeddings=False, rope_theta=500000.0)
    ours.save_pretrained(model_dir)
    return ours, hf_from_pretrained(model_dir)


def test_token_by_token_decoding_with_our_kv_cache_matches_a_full_transformers_forward(
    pair: tuple[LlamaForCausalLM, transformers.LlamaForCausalLM],
) -> None:
    ours, reference = pair
    ids = random_ids(1, 48, seed=5)
    expected = hf_logits(reference, ids)[0]  # [48, V]
    cache = KVCache(ours.config, num_slots=4, max_len=64)
    slot = torch.tensor([2])  # not slot 0: the slot index must actually be honoured
    prompt = 16
    with torch.no_grad():
        got = [ours(ids[:, :prompt], kv_cache=cache, slots=slot)[0]]  # prefill: [16, V]
        for pos in range(prompt, ids.shape[1]):
            step = ours(ids[:, pos : pos + 1], positions=torch.tensor([[pos]]), kv_cache=cache, slots=slot)
            got.append(step[0])
    assert_close(torch.cat(got), expected)


def test_chunked_prefill_into_the_kv_cache_matches_a_full_transformers_forward(
    pair: tuple[LlamaForCausalLM, transformers.LlamaForCausalLM],
) -> None:
    ours, reference = pair
    ids = random_ids(1, 40, seed=6)
    cache = KVCache(ours.config, num_slots=1, max_len=40)
    slot = torch.tensor([0])
    chunks = [(0, 13), (13, 29), (29, 40)]
    with torch.no_grad():
        got = [
            ours(ids[:, a:b], positions=torch.arange(a, b)[None], kv_cache=cache, slots=slot)[0] for a, b in chunks
        ]
    assert_close(torch.cat(got), hf_logits(reference, ids)[0])


def test_batched_ragged_prefill_and_decode_with_our_kv_cache_match_transformers_per_sequence(
    pair: tuple[LlamaForCausalLM, transformers.LlamaForCausalLM],
) -> None:
    """Two sequences of different lengths in one batch, as the engine runs them: one
    right-padded prefill forward, then [2, 1] decode steps at different positions. The
    padding writes junk keys past each short prompt; the position mask must hide them
    until the decode steps overwrite those positions."""
    ours, reference = pair
    lengths, new = (9, 21), 12
    full = [random_ids(1, n + new, seed=10 + i)[0] for i, n in enumerate(lengths)]
    expected = [hf_logits(reference, seq[None])[0] for seq in full]
    cache = KVCache(ours.config, num_slots=3, max_len=64)
    slots = torch.tensor([2, 0])
    width = max(lengths)
    prompt_ids = torch.stack([torch.cat([s[:n], torch.zeros(width - n, dtype=torch.long)]) for s, n in zip(full, lengths)])
    positions = torch.arange(width).expand(2, width)
    with torch.no_grad():
        prefill = ours(prompt_ids, positions=positions, kv_cache=cache, slots=slots)
        for row, n in enumerate(lengths):
            assert_close(prefill[row, :n], expected[row][:n])
        for step in range(new):
            pos = torch.tensor([[n + step] for n in lengths])
            tokens = torch.stack([full[row][n + step] for row, n in enumerate(lengths)])[:, None]
            logits = ours(tokens, positions=pos, kv_cache=cache, slots=slots)
            for row, n in enumerate(lengths):
                assert_close(logits[row, 0], expected[row][n + step])


def test_greedy_decoding_with_our_kv_cache_produces_the_tokens_of_transformers_generate(tmp_path: Path) -> None:
    ours = our_random_model(seed=4, eos_token_id=None)  # no EOS: both run the full length
    ours.save_pretrained(tmp_path)
    reference = hf_from_pretrained(tmp_path)
    prompt, new = random_ids(1, 12, seed=7), 24
    with torch.no_grad():
        hf_tokens = reference.generate(
            prompt, max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None,
        )[0, prompt.shape[1] :].tolist()
        cache = KVCache(ours.config, num_slots=1, max_len=64)
        slot = torch.tensor([0])
        logits = ours(prompt, kv_cache=cache, slots=slot, last_only=True)
        tokens: list[int] = []
        for pos in range(prompt.shape[1], prompt.shape[1] + new):
            tokens.append(int(logits[0, -1].argmax()))
            logits = ours(torch.tensor([[tokens[-1]]]), positions=torch.tensor([[pos]]), kv_cache=cache, slots=slot)
    assert tokens == hf_tokens
