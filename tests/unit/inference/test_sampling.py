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


def full_sort_draw(logits: torch.Tensor, params: SamplingParams, u: float) -> int:
    """What a row draws by sorting its whole vocabulary (the reference `sample_batch`'s
    candidate shortcut must agree with)."""
    scaled = logits / params.temperature
    sorted_logits, order = torch.sort(scaled, descending=True)
    if 0 < params.top_k < len(scaled):
        sorted_logits[params.top_k:] = float("-inf")
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = (probs.cumsum(-1) - probs) >= params.top_p
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    return int(order[int(torch.searchsorted(probs.cumsum(-1), torch.tensor([u])).clamp(max=len(scaled) - 1))])


def test_the_candidate_shortcut_draws_what_a_full_sort_draws() -> None:
    """Peaked rows (the nucleus inside the 64 candidates), flat ones (past them: sorted in
    full) and top-k rows, over a vocabulary of SmolLM2's size, each against a full sort."""
    torch.manual_seed(1)
    V = 49152
    logits = torch.randn(12, V) * 2
    logits[:6, :5] += torch.tensor([16.0, 15.0, 14.5, 14.0, 13.0])  # peaked
    params = [SamplingParams(temperature=t, top_p=p, top_k=k) for t, p, k in
              [(0.8, 0.95, 0), (1.0, 0.5, 0), (0.7, 0.99, 20), (1.2, 0.9, 0), (0.8, 0.95, 3), (1.0, 0.999, 0),
               (0.8, 0.95, 0), (1.0, 0.5, 0), (0.7, 0.9, 40), (1.0, 0.3, 100), (1.5, 0.95, 0), (0.8, 0.95, 5000)]]
    for seed in range(20):
        got = sample_batch(logits, params, [make_generator(seed * 100 + i) for i in range(12)])
        draws = [float(torch.rand((), generator=make_generator(seed * 100 + i))) for i in range(12)]
        assert got == [full_sort_draw(logits[i], params[i], draws[i]) for i in range(12)], f"seed {seed}"


def test_a_row_without_top_k_or_top_p_draws_from_the_whole_distribution() -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4] + [0.0] * 96)
    logits = probs.clamp(min=1e-12).log()[None].repeat(8000, 1)
    gens = [make_generator(i) for i in range(8000)]
    picked = sample_batch(logits, [SamplingParams(temperature=1.0, top_p=1.0)] * 8000, gens)
    assert torch.allclose(torch.bincount(torch.tensor(picked), minlength=100)[:4] / 8000.0, probs[:4], atol=0.02)
