"""Sampling: per-request parameters, per-request RNG, stop strings.

Design notes
- Every request owns a `torch.Generator` seeded from its `seed` (or from OS entropy), so
  a seeded request reproduces its tokens no matter which other requests share the batch.
- Sampling runs on CPU in fp32 over one row of logits at a time: the row is tiny next to
  the forward pass, and a CPU generator behaves identically whatever device the model
  is on (CUDA generators would tie reproducibility to the GPU).
- Order of filters: temperature, then top-k, then top-p (nucleus) on the renormalised
  distribution, as in HF `transformers` and vLLM. temperature == 0 means greedy.
- Stop strings are matched on *text*, not tokens (a stop string may span tokens). The
  matcher holds back the tail of the text that could still become a stop string, so a
  client never sees a partial stop string that is later retracted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    stop: tuple[str, ...] = ()
    min_tokens: int = 0  # end-of-sequence tokens are masked out until this many are out

    def validate(self) -> None:
        """Raise ValueError with a message fit for an API client."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def make_generator(seed: int | None) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    if seed is None:
        gen.seed()  # nondeterministic, from OS entropy
    else:
        gen.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)  # negative int64 seeds map into range
    return gen


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token id from a row of logits [V]."""
    assert logits.dim() == 1, f"expected one row of logits [V], got shape {tuple(logits.shape)}"
    return sample_batch(logits[None], [params], [generator])[0]


# Candidates taken per row before the nucleus is looked for: the top-p set almost always
# lies inside them, and then nothing else of the vocabulary is sorted (`sample_batch`).
CANDIDATES = 64


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    banned: torch.Tensor | None = None,
) -> list[int]:
    """Draw one token per row of logits [B, V], each row with its own parameters and RNG.

    The top-p (and top-k) set is looked for among each row's `CANDIDATES` most likely
    tokens (`topk`): when they already cover top_p, or top_k is no larger, no token beyond
    them can be kept, so the draw is the one a full sort would give. A row with neither
    top-k nor top-p draws from its whole distribution in vocabulary order, unsorted. Only
    other rows (a flat distribution cut by top_p) sort the whole vocabulary: a full sort of
    32 rows of SmolLM2's 49,152 tokens took 90 ms on 2 cores, more than the decode step. Each row
    draws a single uniform number from its own generator and picks by inverse CDF, so a
    seeded request draws the same numbers whatever else is in the batch. `banned` [B, V]
    bool masks tokens a row may not pick (EOS before min_tokens)."""
    assert logits.dim() == 2 and logits.shape[0] == len(params) == len(generators), "one row per request"
    logits = logits.detach().float().cpu()
    if banned is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    B, V = logits.shape
    temps = torch.tensor([p.temperature for p in params])
    greedy = temps == 0.0
    best = torch.argmax(logits, dim=-1)  # [B]
    if bool(greedy.all()):
        return best.tolist()
    scaled = logits / torch.where(greedy, torch.ones_like(temps), temps)[:, None]
    top_k = torch.tensor([p.top_k if 0 < p.top_k < V else V for p in params])
    top_p = torch.tensor([p.top_p for p in params])
    u = torch.stack([torch.rand((), generator=g) for g in generators])  # [B]
    k = min(CANDIDATES, V)
    cand_logits, cand_ids = torch.topk(scaled, k, dim=-1)  # [B, k], sorted descending
    within_k = top_k <= k
    # what the probabilities are normalised over: the top_k set where it lies inside the
    # candidates, else (no top-k) the whole vocabulary; a top_k beyond the candidates is
    # left to the full sort
    in_top_k = cand_logits.masked_fill(torch.arange(k)[None, :] >= top_k[:, None], float("-inf"))
    lse = torch.where(within_k, torch.logsumexp(in_top_k, dim=-1), torch.logsumexp(scaled, dim=-1))
    exact = within_k | ((top_k >= V) & (torch.exp(cand_logits - lse[:, None]).sum(-1) >= top_p))
    sampled = _nucleus(cand_logits, cand_ids, top_k, top_p, u, lse)
    plain = ~exact & (top_p >= 1.0) & (top_k >= V)  # neither top-k nor top-p: the whole distribution
    if bool(plain.any()):
        rows = plain.nonzero().squeeze(1)
        cdf = torch.softmax(scaled[rows], dim=-1).cumsum(-1)
        sampled[rows] = torch.searchsorted(cdf, u[rows, None]).clamp_(max=V - 1).squeeze(1)
    rest = ~(exact | plain)
    if bool(rest.any()):  # these rows' nucleus reaches past the candidates: sort them all
        rows = rest.nonzero().squeeze(1)
        sorted_logits, order = torch.sort(scaled[rows], dim=-1, descending=True)
        sampled[rows] = _nucleus(sorted_logits, order, top_k[rows], top_p[rows], u[rows])
    return torch.where(greedy, best, sampled).tolist()


def _nucleus(sorted_logits: torch.Tensor, ids: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
             u: torch.Tensor, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Draw by inverse CDF from logits sorted descending (ids: their tokens), after top-k and
    then top-p on the renormalised distribution; `lse`: the log of what the top-k set's
    probabilities are normalised by, when `sorted_logits` are only the first candidates."""
    n = sorted_logits.shape[1]
    sorted_logits = sorted_logits.masked_fill(torch.arange(n)[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1) if lse is None else torch.exp(sorted_logits - lse[:, None])
    # drop a token when the tokens before it already cover top_p (the first always stays)
    drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    pick = torch.searchsorted(probs.cumsum(-1), u[:, None]).clamp_(max=n - 1)  # [B, 1]
    return ids.gather(1, pick).squeeze(1)


class StopMatcher:
    """Feed text deltas; get back the text safe to emit and whether a stop string hit."""

    def __init__(self, stop: tuple[str, ...]) -> None:
        self.stop = stop
        self.buffer = ""  # text received but not yet emitted

    def feed(self, delta: str) -> tuple[str, bool]:
        if not self.stop:
            return delta, False
        self.buffer += delta
        hits = [i for i in (self.buffer.find(s) for s in self.stop) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        # hold back the longest tail that is a prefix of some stop string
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.buffer)), hold, -1):
                if self.buffer.endswith(s[:n]):
                    hold = n
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out
