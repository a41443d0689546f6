"""Batched sampling: each row behaves as if it were sampled alone."""

from __future__ import annotations

import torch

from chatbot.inference.generate import SamplingParams, make_generator, sample_batch


def test_a_row_draws_the_same_token_alone_or_in_a_batch_with_its_own_seed() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 4096)
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t, p, k in
              [(0.7, 0.9, 0), (1.0, 1.0, 0), (0.0, 1.0, 0), (1.3, 0.5, 50), (0.8, 0.95, 5), (0.5, 1.0, 1)]]
    for step in range(5):
        together = sample_batch(logits, params, [make_generator(100 + i + step) for i in range(6)])
        alone = [sample_batch(logits[i:i + 1], [params[i]], [make_generator(100 + i + step)])[0] for i in range(6)]
        assert together == alone


def test_greedy_top_k_one_and_tiny_top_p_pick_the_best_token_and_bans_hold() -> None:
    logits = torch.randn(3, 100)
    best = logits.argmax(-1).tolist()
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(top_p=1e-6)]
    gens = [make_generator(i) for i in range(3)]
    assert sample_batch(logits, params, gens) == best
    banned = torch.zeros(3, 100, dtype=torch.bool)
    banned[:, best[0]] = banned[1, best[1]] = banned[2, best[2]] = True
    picked = sample_batch(logits, params, gens, banned)
    assert all(not banned[i, t] for i, t in enumerate(picked))


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = probs.log()[None].repeat(4000, 1)
    gens = [make_generator(i) for i in range(4000)]
    counts = torch.bincount(torch.tensor(sample_batch(logits, [SamplingParams(temperature=1.0, top_p=1.0)] * 4000, gens)), minlength=3)
    assert torch.allclose(counts / 4000.0, probs, atol=0.03)
