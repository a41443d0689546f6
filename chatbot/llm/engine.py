"""Inference engine: one thread owns the model and runs continuous batching.

Design notes
- `submit()` runs in the caller's thread: it validates, renders the chat template,
  tokenizes and checks the context window, so bad requests fail synchronously with a
  clear `ValueError` ("prompt has N tokens, the context window is M") and never reach
  the engine thread. Accepted requests go through a thread-safe admission queue.
- The engine thread loops: (1) drop cancelled sequences, (2) admit queued requests while
  KV slots are free, prefilling each (one forward over its prompt, batch of one), then
  (3) one batched decode step: a single forward of [B, 1] over *all* active sequences,
  each reading/writing its own KV-cache slot, ragged lengths handled by the model's
  position-based mask. A new request therefore waits at most one decode step plus the
  prefills admitted before it; a long prompt does stall the others for its prefill
  (no chunked prefill yet).
- Output flows through a per-request callback, called from the engine thread: zero or
  more events with text deltas, then exactly one final event with `finish_reason` in
  {"stop", "length", "cancelled", "error"} and the token counts. Callbacks must be quick
  and must not block (adapters hand the event to their own thread/queue).
- Cancellation is a flag on the `RequestHandle`, checked before every step: a cancelled
  sequence stops within one step and gets finish_reason "cancelled".
- `completion_tokens` counts generated tokens excluding the EOS token that ended it.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from chatbot.llm.generate import SamplingParams, StopMatcher, make_generator, sample_token
from chatbot.llm.model import KVCache, LlamaForCausalLM
from chatbot.llm.tokenizer import ChatTokenizer, StreamDecoder

log = logging.getLogger(__name__)

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
    slot: int = -1
    out_ids: list[int] = field(default_factory=list)
    pos: int = 0  # position of the next token fed to the model == tokens in the cache


def validate_messages(messages: object) -> list[dict[str, str]]:
    """Check the chat shape; raise ValueError with a client-facing message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty JSON list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be {{\"role\": one of {list(ROLES)}, \"content\": string}}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


class Engine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: ChatTokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.cache = KVCache(model.config, max_batch_size, self.max_seq_len, self.device, self.dtype)
        eos = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        assert eos, "the model has no EOS token: generation could only end by length"
        self.eos_ids = eos
        self._queue: queue.Queue[_Sequence | None] = queue.Queue()
        self._active: list[_Sequence] = []
        self._free_slots = list(range(max_batch_size))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs: int,
    ) -> Engine:
        model = LlamaForCausalLM.from_pretrained(model_dir, device=device, dtype=dtype)
        return cls(model, ChatTokenizer.from_pretrained(model_dir), **kwargs)

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        assert self._thread is None, "engine already started"
        self._thread = threading.Thread(target=self._run, name="llm-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; unfinished requests end with finish_reason "error"."""
        self._stopping.set()
        self._queue.put(None)  # wake the loop if it waits for work
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- client side (any thread) -------------------------------------------------------

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(validate_messages(messages)))

    def submit(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        on_event: Callable[[EngineEvent], None],
        request_id: str | None = None,
    ) -> RequestHandle:
        """Queue a chat completion. Raises ValueError (incl. PromptTooLongError) at once."""
        assert self._thread is not None and not self._stopping.is_set(), "engine is not running"
        params.validate()
        prompt_ids = self.count_prompt_tokens(messages)
        # at least one token must fit after the prompt
        if len(prompt_ids) >= self.max_seq_len:
            raise PromptTooLongError(len(prompt_ids), self.max_seq_len)
        handle = RequestHandle(request_id or uuid.uuid4().hex, len(prompt_ids))
        seq = _Sequence(
            handle=handle,
            params=params,
            on_event=on_event,
            prompt_ids=prompt_ids,
            max_new=min(params.max_tokens, self.max_seq_len - len(prompt_ids)),
            generator=make_generator(params.seed),
            decoder=self.tokenizer.stream_decoder(),
            stop=StopMatcher(tuple(params.stop)),
        )
        self._queue.put(seq)
        return handle

    # ---- engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping.is_set():
                try:
                    self._step()
                except Exception as exc:  # a model failure must not kill the engine thread
                    log.exception("engine step failed")
                    for seq in list(self._active):
                        self._finish(seq, "error", error=f"inference failed: {exc}")
            for seq in list(self._active):
                self._finish(seq, "error", error="the inference engine is shutting down")
            while True:
                try:
                    seq = self._queue.get_nowait()
                except queue.Empty:
                    break
                if seq is not None:  # never admitted: it holds no slot
                    self._emit_final(seq, "error", error="the inference engine is shutting down")

    def _step(self) -> None:
        for seq in [s for s in self._active if s.handle.cancelled]:
            self._finish(seq, "cancelled")
        self._admit()
        if self._active:
            self._decode()

    def _admit(self) -> None:
        while self._free_slots:
            try:
                # block only when idle; with active sequences just take what is there
                seq = self._queue.get(timeout=0.1) if not self._active else self._queue.get_nowait()
            except queue.Empty:
                return
            if seq is None:  # stop() sentinel
                return
            if seq.handle.cancelled:
                self._emit_final(seq, "cancelled")
                continue
            seq.slot = self._free_slots.pop()
            self._active.append(seq)
            try:
                self._prefill(seq)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(seq, "error", error=f"inference failed: {exc}")

    def _prefill(self, seq: _Sequence) -> None:
        n = len(seq.prompt_ids)
        ids = torch.tensor([seq.prompt_ids], device=self.device)  # [1, n]
        positions = torch.arange(n, device=self.device)[None]  # [1, n]
        slots = torch.tensor([seq.slot], device=self.device)  # [1]
        logits = self.model(ids, positions, self.cache, slots, last_only=True)  # [1, 1, V]
        seq.pos = n
        self._accept(seq, self._sample(seq, logits[0, -1]))

    def _sample(self, seq: _Sequence, logits: torch.Tensor) -> int:
        if len(seq.out_ids) < seq.params.min_tokens:
            logits = logits.clone()
            logits[list(self.eos_ids)] = float("-inf")  # too early to end
        return sample_token(logits, seq.params, seq.generator)

    def _decode(self) -> None:
        batch = list(self._active)
        ids = torch.tensor([[s.out_ids[-1]] for s in batch], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.pos] for s in batch], device=self.device)  # [B, 1]
        slots = torch.tensor([s.slot for s in batch], device=self.device)  # [B]
        logits = self.model(ids, positions, self.cache, slots)[:, -1]  # [B, V]
        logits = logits.cpu()  # one device->host copy for the whole batch
        for i, seq in enumerate(batch):
            seq.pos += 1
            self._accept(seq, self._sample(seq, logits[i]))

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Take one sampled token: emit text, or finish the sequence."""
        if token in self.eos_ids:
            self._finish(seq, "stop")
            return
        seq.out_ids.append(token)
        text, stopped = seq.stop.feed(seq.decoder.push(token))
        if stopped:
            self._finish(seq, "stop", text=text, flush=False)
            return
        if len(seq.out_ids) >= seq.max_new:
            self._finish(seq, "length", text=text)
            return
        if text:
            self._deliver(seq, EngineEvent(seq.handle.request_id, text, None, len(seq.prompt_ids), len(seq.out_ids)))

    def _finish(self, seq: _Sequence, reason: str, *, text: str = "", error: str | None = None, flush: bool = True) -> None:
        assert reason in FINISH_REASONS, f"unknown finish reason {reason!r}"
        if flush and reason in ("stop", "length"):
            # the stream is complete: emit held-back bytes, then text held for stop strings
            text += seq.stop.feed(seq.decoder.flush())[0] + seq.stop.flush()
        self._active.remove(seq)
        self._free_slots.append(seq.slot)
        self._emit_final(seq, reason, text=text, error=error)

    def _emit_final(self, seq: _Sequence, reason: str, *, text: str = "", error: str | None = None) -> None:
        event = EngineEvent(seq.handle.request_id, text, reason, len(seq.prompt_ids), len(seq.out_ids), error)
        self._deliver(seq, event)
        seq.handle.done.set()

    def _deliver(self, seq: _Sequence, event: EngineEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("event callback of request %s failed", seq.handle.request_id)


def generate_text(
    engine: Engine, messages: list[dict[str, str]], params: SamplingParams, timeout: float = 120.0
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
