"""A chat request as the engine's callers see it: its messages, its handle, the events it
gets, the engine's per-sequence state, and the engine's stats snapshot.

Design notes
- `validate_messages` checks the chat shape (a non-empty list of {role, content}, roles
  in `ROLES`) with a client-facing ValueError; `Engine.submit()` calls it in the
  caller's thread, as does the Triton model before it builds sampling parameters.
- Output flows through a per-request callback, called from the engine thread: zero or
  more events with text deltas, then exactly one final event with `finish_reason` in
  {"stop", "length", "cancelled", "error"} and the token counts. Callbacks must be quick
  and must not block (adapters hand the event to their own thread/queue).
- `completion_tokens` counts generated tokens excluding the EOS token that ended it.
- `Engine.stats()` returns an `EngineStats`: cumulative counters (time to first token,
  time per output token, finished requests by reason) and the current gauges (active,
  queued) for an adapter to export; the engine itself knows nothing about Triton or
  Prometheus. Time to first token runs from `submit()` to the first sampled token
  (queueing included); time per output token sums, per generated token after the first,
  the gap since the previous token of the same sequence, so total / count is the mean
  inter-token latency.
- `_Sequence` is the engine thread's state of one admitted request (its slot, its
  position, its output so far); only the engine thread touches it.
- `generate_text` is the blocking helper (tests, CLI): submit to an `Engine`, wait for the
  final event.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chatbot.inference.generate import SamplingParams, StopMatcher
from chatbot.inference.tokenizer import StreamDecoder

ROLES = ("system", "user", "assistant")
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class PromptTooLongError(ValueError):
    def __init__(self, prompt_tokens: int, context_window: int) -> None:
        super().__init__(f"prompt has {prompt_tokens} tokens, the context window is {context_window}")
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window


@dataclass(frozen=True)
class EngineEvent:
    request_id: str
    text: str  # UTF-8-safe delta; may be "" on the final event
    finish_reason: str | None  # None until the final event
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # set when finish_reason == "error"

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class RequestHandle:
    def __init__(self, request_id: str, prompt_tokens: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self._cancelled = threading.Event()
        self.done = threading.Event()  # set after the final event was delivered

    def cancel(self) -> None:
        """Thread-safe; the sequence stops within one engine step."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


@dataclass(frozen=True)
class EngineStats:
    """A consistent snapshot: counters are cumulative since the engine was created."""

    ttft_ms_total: float  # sum over requests of submit -> first sampled token
    first_tokens_total: int  # requests that got their first token (the TTFT denominator)
    tpot_ms_total: float  # sum of gaps between consecutive output tokens of a sequence
    output_tokens_total: int  # output tokens after the first of each request (the TPOT denominator)
    prefill_batches_total: int  # prefill forwards run (one chunk of one or more prompts each)
    prefill_tokens_total: int  # real (unpadded) prompt tokens prefilled
    prefix_reused_tokens_total: int  # prompt tokens whose KV entries came from the prefix cache
    requests_total: dict[str, int]  # finished requests by finish_reason (all of FINISH_REASONS present)
    active_sequences: int  # sequences holding a KV slot now
    cached_tokens: int  # tokens held by idle KV slots (the prefix cache)
    queue_length: int  # accepted requests waiting for a slot (or for the prefill budget)


@dataclass
class _Sequence:
    handle: RequestHandle
    params: SamplingParams
    on_event: Callable[[EngineEvent], None]
    prompt_ids: list[int]
    max_new: int  # params.max_tokens clamped to what fits in the context window
    generator: torch.Generator
    decoder: StreamDecoder
    stop: StopMatcher
    submitted_at: float = 0.0  # time.monotonic() at submit()
    last_token_at: float | None = None  # when the previous token was sampled; None before the first
    slot: int = -1
    out_ids: list[int] = field(default_factory=list)
    pos: int = 0  # position of the next token fed to the model == tokens in the cache
    background: bool = False  # yields to interactive requests (see engine.py's notes)

    @property
    def prefilling(self) -> bool:
        return self.pos < len(self.prompt_ids)


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check the chat shape; raise ValueError with a client-facing message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty JSON list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": string}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Submits(Protocol):
    """What `generate_text` needs of an engine (`Engine` has it)."""

    def submit(
        self, messages: list[dict[str, str]], params: SamplingParams, on_event: Callable[[EngineEvent], None]
    ) -> RequestHandle: ...


def generate_text(
    engine: Submits, messages: list[dict[str, str]], params: SamplingParams, timeout: float = 120.0
) -> tuple[str, EngineEvent]:
    """Blocking helper (tests, CLI): the full reply and the final event."""
    parts: list[str] = []
    final: list[EngineEvent] = []

    def on_event(ev: EngineEvent) -> None:
        parts.append(ev.text)
        if ev.final:
            final.append(ev)

    handle = engine.submit(messages, params, on_event)
    deadline = time.time() + timeout
    assert handle.done.wait(max(0.0, deadline - time.time())), "generation timed out"
    return "".join(parts), final[0]
