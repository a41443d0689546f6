"""Inference engine: one thread owns the model and runs continuous batching.

Design notes
- `submit()` runs in the caller's thread: it validates, renders the chat template,
  tokenizes and checks the context window, so bad requests fail synchronously with a
  clear `ValueError` ("prompt has N tokens, the context window is M") and never reach
  the engine thread. Accepted requests go through a thread-safe admission queue.
- The engine thread loops: (1) drop cancelled sequences (active or still waiting),
  (2) admit waiting requests (FIFO, background ones last, see below) while the decode
  batch has room: each gets a KV-cache
  slot holding as much of its prompt as the prefix cache has (prefix_cache.py: the
  conversation's previous turn, or its persona's system prompt), (3) one prefill forward
  over the next chunk of the prompts still being read, and (4) one batched decode step:
  a single forward of [B, 1] over every sequence past its prompt, each reading/writing its
  own KV-cache slot, ragged lengths handled by the model's position-based mask.
- Batched prefill right-pads the prompts to the longest one, [B, T_max], rather than
  packing them into one row: the KV cache is addressed per row (slot) and per absolute
  position, so padding needs no model change beyond `last_index` (the logits of each
  row's last real token). Pad tokens get the positions n..T_max-1 after their prompt,
  so (a) no real query attends to them (they are in its causal future), (b) the cache
  entries they write lie past the prompt, where the sequence's own decode steps
  overwrite them before any query can reach them, and (c) no pad query row is ever
  fully masked (no NaNs). T_max < max_seq_len, so pads never write outside the cache.
  The cost is B * T_max tokens of compute instead of sum(n_i): on 2 CPU cores (demo model)
  one padded forward beat a forward per prompt at similar lengths (16 x 100 tokens: 78 vs
  145 ms), lost at ~1.9x padding (495 vs 274 ms), and beat one packed row with a
  block-diagonal mask (589 ms). Packed linears with varlen attention: not done yet.
- Decode steps and prefills (all of an int8 model's, short ones of an fp32 one's: native.py)
  run in one C++ call each, a prefill's tokens packed without pads, where it can run the model.
- Chunked prefill: `max_prefill_tokens` caps the padded size (B * T) of a step's prefill
  forward. A prompt longer than that is read in chunks, one per step, each at its absolute
  positions after what the cache already holds, with a decode step for every other
  sequence in between: one long prompt delays the others' next token by one chunk's
  forward, never by its whole prefill. Several short prompts share a chunk forward, oldest
  first; a row's pads must stay inside the cache (positions < max_seq_len).
- Prefix cache: a finished sequence's slot keeps its entries (the pool has
  `kv_cache_bytes` worth of slots, at least `max_batch_size + background_slots`), and the slot pool hands
  them to the next request whose prompt starts with the same tokens. Reused entries are
  exactly what a prefill would compute (the same tokens at the same positions); only
  float rounding of a different batch shape differs, as with batching itself.
- Background requests (`submit(..., background=True)`: work no one is watching, such as a
  conversation's title) yield to interactive ones: admitted only when no interactive
  request waits, in a prefill only when no interactive prompt is being read, decoded in
  rows of their own beyond `max_batch_size` (`background_slots`, an eighth more), so an
  interactive request never waits for a slot they hold (titles scheduled like replies
  added ~2 s to other users' first tokens, p50, on 2 cores: bench/pipeline.py).
- Output flows through a per-request callback (`EngineEvent`s, from the engine thread);
  `stats()` snapshots the counters as an `EngineStats`: request.py says what each means.
- Cancellation: a flag on the `RequestHandle`, checked before every step (finish_reason "cancelled").
- Seeded requests reproduce their tokens whatever else shares the batch: each owns its
  RNG, and batch composition only changes the logits by float rounding.
- Threads and OpenMP: only the engine thread may compute with torch. PyTorch's CPU
  kernels run on OpenMP, and libgomp gives every thread that starts a parallel region a
  pool of worker threads of its own, kept until that thread exits. Once the process holds
  more of those than it has cores, idle workers likely stop spinning and sleep, so each
  of the ~200 small matmuls of a decode step waits for a worker to wake. On 2 cores
  (SmolLM2, fp32) a decode step took 56 ms in the engine thread with the model loaded on
  the main thread, 32 ms with it loaded in a thread that had exited first; set_num_threads,
  OMP_/MKL_ variables and OMP_WAIT_POLICY did not help. So `from_pretrained` loads the model
  and the KV cache in a short-lived thread, and a host process (the Triton model) must not
  run tensor work on its own threads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from chatbot.inference import native
from chatbot.inference.generate import (
    SamplingParams,
    StopMatcher,
    make_generator,
    sample_batch,
)
from chatbot.inference.kv_cache import KVCache
from chatbot.inference.model import LlamaForCausalLM
from chatbot.inference.precision import apply as apply_precision
from chatbot.inference.precision import resolve as resolve_precision
from chatbot.inference.prefix_cache import SlotPool
from chatbot.inference.request import (
    FINISH_REASONS,
    EngineEvent,
    EngineStats,
    PromptTooLongError,
    RequestHandle,
    _Sequence,
    validate_messages,
)
from chatbot.inference.tokenizer import ChatTokenizer

log = logging.getLogger(__name__)


def in_passing_thread(func: Callable[[], Any]) -> Any:
    """`func()` run in a thread of its own that ends before this returns: its OpenMP pool
    ends with it (see "Threads and OpenMP" above)."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = func()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="llm-load")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class Engine:
    def __init__(
        self,
        model: LlamaForCausalLM,
        tokenizer: ChatTokenizer,
        *,
        max_batch_size: int = 8,
        max_seq_len: int | None = None,
        max_prefill_tokens: int = 512,
        kv_cache_bytes: int = 0,
        prefix_cache: bool = True,
        native_decode: bool = True,
    ) -> None:
        assert max_batch_size >= 1, f"max_batch_size must be >= 1, got {max_batch_size}"
        assert max_prefill_tokens >= 1, f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}"
        self.model = model.eval()
        self.tokenizer = tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.precision = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(self.dtype, str(self.dtype))
        self.max_seq_len = min(max_seq_len or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens  # padded tokens (B * T_max) per prefill forward
        self.background_slots = max(1, max_batch_size // 8)  # rows for background requests, beyond max_batch_size
        # every decoded sequence needs a slot; the memory budget buys idle ones: the prefix cache
        one_slot = KVCache.slot_bytes(model.config, self.max_seq_len, self.dtype)
        num_slots = max(max_batch_size + self.background_slots, kv_cache_bytes // one_slot)
        self.cache = KVCache(model.config, num_slots, self.max_seq_len, self.device, self.dtype)
        self.pool = SlotPool(num_slots, reuse=prefix_cache)
        self._native = native.decoder_for(model, self.cache.data) if native_decode else None
        self.decode_path = "python" if self._native is None else "native"
        eos = set(model.config.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        assert eos, "the model has no EOS token: generation could only end by length"
        self.eos_ids = eos
        self._queue: queue.Queue[_Sequence | None] = queue.Queue()
        # taken off the queue by the engine thread, not yet admitted (FIFO); engine thread only
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []  # holding a slot: prefilling, then decoding
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        # metrics: written by the engine thread, read by stats() from any thread
        self._stats_lock = threading.Lock()
        self._ttft_ms_total = 0.0
        self._first_tokens_total = 0
        self._tpot_ms_total = 0.0
        self._output_tokens_total = 0
        self._prefill_batches_total = 0
        self._prefill_tokens_total = 0
        self._prefix_reused_tokens_total = 0
        self._requests_total = dict.fromkeys(FINISH_REASONS, 0)
        self._cached_tokens = 0

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        **kwargs: Any,
    ) -> Engine:
        """Load the model at `precision` (fp32, bf16, int8 or auto: chatbot/inference/precision.py)
        and make the engine, in a thread that exits before the engine thread starts, so the
        caller's thread keeps no OpenMP pool (see the module notes)."""
        chosen = resolve_precision(precision, device, native_step=native.available())

        def load() -> Engine:
            model = LlamaForCausalLM.from_pretrained(model_dir, device=device).fuse_projections()  # fp32, then cast
            engine = cls(apply_precision(model, chosen), ChatTokenizer.from_pretrained(model_dir), **kwargs)
            engine.precision = chosen
            return engine

        return in_passing_thread(load)

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

    def stats(self) -> EngineStats:
        """Thread-safe snapshot of the counters and gauges (see the module notes)."""
        with self._stats_lock:
            return EngineStats(
                ttft_ms_total=self._ttft_ms_total,
                first_tokens_total=self._first_tokens_total,
                tpot_ms_total=self._tpot_ms_total,
                output_tokens_total=self._output_tokens_total,
                prefill_batches_total=self._prefill_batches_total,
                prefill_tokens_total=self._prefill_tokens_total,
                prefix_reused_tokens_total=self._prefix_reused_tokens_total,
                requests_total=dict(self._requests_total),
                # len() of a list/deque the engine thread mutates is atomic under the GIL;
                # qsize() may count the stop() sentinel: a gauge can live with that
                active_sequences=len(self._active),
                cached_tokens=self._cached_tokens,
                queue_length=len(self._waiting) + self._queue.qsize(),
            )

    def count_prompt_tokens(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.prompt_ids(validate_messages(messages))

    def submit(
        self,
        messages: list[dict[str, str]],
        params: SamplingParams,
        on_event: Callable[[EngineEvent], None],
        request_id: str | None = None,
        background: bool = False,
    ) -> RequestHandle:
        """Queue a chat completion. Raises ValueError (incl. PromptTooLongError) at once.
        A `background` request yields to interactive ones (see the module notes)."""
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
            submitted_at=time.monotonic(),
            background=background,
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
            while self._waiting:  # never admitted: they hold no slot
                self._emit_final(self._waiting.popleft(), "error", error="the inference engine is shutting down")
            while True:
                try:
                    seq = self._queue.get_nowait()
                except queue.Empty:
                    break
                if seq is not None:
                    self._emit_final(seq, "error", error="the inference engine is shutting down")

    def _step(self) -> None:
        for seq in [s for s in self._active if s.handle.cancelled]:
            self._finish(seq, "cancelled")
        self._pull()
        if any(s.handle.cancelled for s in self._waiting):
            # a request cancelled while waiting for a slot ends now, not when admitted
            keep: deque[_Sequence] = deque()
            for seq in self._waiting:
                if seq.handle.cancelled:
                    self._emit_final(seq, "cancelled")
                else:
                    keep.append(seq)
            self._waiting = keep
        self._admit()
        if any(s.prefilling for s in self._active):
            self._prefill_chunk()
        if any(not s.prefilling for s in self._active):
            self._decode()

    def _pull(self) -> None:
        """Move everything queued into `_waiting`; block up to 0.1 s only when idle."""
        idle = not self._active and not self._waiting
        while True:
            try:
                seq = self._queue.get(timeout=0.1) if idle else self._queue.get_nowait()
            except queue.Empty:
                return
            if seq is None:  # stop() sentinel
                return
            self._waiting.append(seq)
            idle = False  # got work: take the rest without waiting

    def _next_waiting(self) -> _Sequence | None:
        """Take the oldest waiting interactive request while fewer than `max_batch_size`
        run; else, when no interactive request waits, the oldest background one while fewer
        than `background_slots` run; else None."""
        running = sum(s.background for s in self._active)
        interactive = next((seq for seq in self._waiting if not seq.background), None)
        if interactive is not None:
            if len(self._active) - running >= self.max_batch_size:
                return None
            self._waiting.remove(interactive)
            return interactive
        if self._waiting and running < self.background_slots:
            return self._waiting.popleft()
        return None

    def _admit(self) -> None:
        """Give waiting requests slots (FIFO, background ones last) while the decode batch
        has room, with as much of each prompt as the prefix cache holds (prefix_cache.py)."""
        reused, admitted = 0, False
        while (seq := self._next_waiting()) is not None:
            placement = self.pool.acquire(seq.prompt_ids)
            if placement.copy_from is not None:
                n = placement.reused
                self.cache.data[:, :, placement.slot, :n] = self.cache.data[:, :, placement.copy_from, :n]
            seq.slot, seq.pos = placement.slot, placement.reused
            reused += placement.reused
            self._active.append(seq)
            admitted = True
        if admitted:  # (every engine step passes here: count only when something changed)
            with self._stats_lock:
                self._prefix_reused_tokens_total += reused
                self._cached_tokens = self.pool.cached_tokens

    def _chunk_plan(self) -> tuple[list[_Sequence], list[int], int]:
        """Which prefilling sequences share this step's prefill forward, how many prompt
        tokens each, and the padded width T: the oldest first, B * T within the budget, and
        every row's pads (positions pos + len .. pos + T - 1) inside the KV cache.
        Background prompts are read only when no interactive one is."""
        batch: list[_Sequence] = []
        lens: list[int] = []
        width = 0
        prefilling = [s for s in self._active if s.prefilling]
        if not all(s.background for s in prefilling):
            prefilling = [s for s in prefilling if not s.background]
        for seq in prefilling:
            remaining = len(seq.prompt_ids) - seq.pos
            want = max(width, min(remaining, self.max_prefill_tokens))
            if batch and (len(batch) + 1) * want > self.max_prefill_tokens:
                want = width  # do not widen the batch for this one; it takes a shorter chunk
                if (len(batch) + 1) * want > self.max_prefill_tokens:
                    break
            if any(s.pos + want > self.cache.max_len for s in [*batch, seq]):
                continue  # its (or another row's) pads would fall off the cache: next step
            batch.append(seq)
            lens.append(min(remaining, want))
            width = want
        return batch, lens, width

    def _prefill_chunk(self) -> None:
        """One forward over the next chunk of every prompt in the plan (right-padded, see the
        module notes); rows whose prompt is complete sample their first token."""
        batch, lens, width = self._chunk_plan()
        try:
            logits = self._prefill(batch, lens, width)  # [B, V] on the host
        except Exception as exc:
            log.exception("prefill failed")
            for seq in batch:
                self._finish(seq, "error", error=f"inference failed: {exc}")
            return
        done = [i for i, seq in enumerate(batch) if not seq.prefilling]
        if not done:
            return
        now = time.monotonic()
        ready = [batch[i] for i in done]
        for seq, token in zip(ready, self._sample(ready, logits[torch.tensor(done)])):
            self._accept(seq, token, now)

    def _prefill(self, batch: list[_Sequence], lens: list[int], width: int) -> torch.Tensor:
        """Prompt tokens pos .. pos + len of each row at their absolute positions; [B, V]
        logits of each row's last one. Natively every token is a row of its own (no pads);
        model.py takes [B, width] with pads after each prompt (see the module notes)."""
        if self._native is not None and self._native.prefills(sum(lens)):
            logits = self._native.prefill([(s.prompt_ids[s.pos : s.pos + n], s.pos, s.slot) for s, n in zip(batch, lens)])
        else:
            ids = torch.zeros(len(batch), width, dtype=torch.long)  # pad id 0: any valid id, never attended to
            positions = torch.empty(len(batch), width, dtype=torch.long)
            for i, (seq, n) in enumerate(zip(batch, lens)):
                ids[i, :n] = torch.tensor(seq.prompt_ids[seq.pos : seq.pos + n])
                # pads continue their row's positions: causal masking hides them from real queries
                positions[i] = torch.arange(seq.pos, seq.pos + width)
            slots, last_index = torch.tensor([s.slot for s in batch]), torch.tensor(lens) - 1
            logits = self.model(ids.to(self.device), positions.to(self.device), self.cache, slots.to(self.device),
                                last_index=last_index.to(self.device))[:, 0]  # [B, V]
        for seq, n in zip(batch, lens):
            self.pool.extend(seq.slot, seq.prompt_ids[seq.pos : seq.pos + n])
            seq.pos += n
        with self._stats_lock:
            self._prefill_batches_total += 1
            self._prefill_tokens_total += sum(lens)
        return logits.cpu()  # one device->host copy for the whole batch

    def _sample(self, batch: list[_Sequence], logits: torch.Tensor) -> list[int]:
        """One token per sequence from logits [B, V], in one batched pass."""
        banned = None
        early = [i for i, seq in enumerate(batch) if len(seq.out_ids) < seq.params.min_tokens]
        if early:  # too early to end: these rows may not pick an end-of-sequence token
            banned = torch.zeros(logits.shape, dtype=torch.bool)
            banned[torch.tensor(early)[:, None], torch.tensor(sorted(self.eos_ids))[None, :]] = True
        return sample_batch(logits, [s.params for s in batch], [s.generator for s in batch], banned)

    def _decode(self) -> None:
        # in slot order: consecutive slots are read as one view of the cache, not copied (kv_cache.py)
        batch = sorted((s for s in self._active if not s.prefilling), key=lambda s: s.slot)
        ids = torch.tensor([[s.out_ids[-1]] for s in batch], device=self.device)  # [B, 1]
        positions = torch.tensor([[s.pos] for s in batch], device=self.device)  # [B, 1]
        slots = torch.tensor([s.slot for s in batch], device=self.device)  # [B]
        if self._native is not None:
            logits = self._native(ids, positions, slots)  # [B, V]
        else:
            logits = self.model(ids, positions, self.cache, slots)[:, -1]  # [B, V]
        logits = logits.cpu()  # one device->host copy for the whole batch (and a sync)
        now = time.monotonic()
        for seq, token in zip(batch, self._sample(batch, logits)):
            self.pool.extend(seq.slot, seq.out_ids[-1:])  # the token just fed is in the cache now
            seq.pos += 1
            self._accept(seq, token, now)

    def _accept(self, seq: _Sequence, token: int, now: float) -> None:
        """Take one token sampled at `now`: count it, emit text, or finish the sequence."""
        with self._stats_lock:
            if seq.last_token_at is None:  # the first token, EOS or not: its latency is what users wait
                self._ttft_ms_total += (now - seq.submitted_at) * 1000.0
                self._first_tokens_total += 1
            elif token not in self.eos_ids:  # EOS is not an output token
                self._tpot_ms_total += (now - seq.last_token_at) * 1000.0
                self._output_tokens_total += 1
        seq.last_token_at = now
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
        if reason == "error":  # a failed forward may have left its entries half written
            self.pool.forget(seq.slot)
        else:
            self.pool.release(seq.slot)
        with self._stats_lock:
            self._cached_tokens = self.pool.cached_tokens
        self._emit_final(seq, reason, text=text, error=error)

    def _emit_final(self, seq: _Sequence, reason: str, *, text: str = "", error: str | None = None) -> None:
        event = EngineEvent(seq.handle.request_id, text, reason, len(seq.prompt_ids), len(seq.out_ids), error)
        with self._stats_lock:
            self._requests_total[reason] += 1
        self._deliver(seq, event)
        seq.handle.done.set()

    def _deliver(self, seq: _Sequence, event: EngineEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:  # a broken consumer must not take the engine down
            log.exception("event callback of request %s failed", seq.handle.request_id)
