"""Triton python-backend model `chat`: a thin adapter over `chatbot.inference.Engine`.

Design notes
- Decoupled: `execute()` only parses and admits requests and returns None at once; the
  engine thread generates, and a single *sender thread* owns every response sender:
  it sends one response per text delta, then the final response (flag
  TRITONSERVER_RESPONSE_COMPLETE_FINAL) with finish_reason and token counts. Keeping all
  sender calls on one thread keeps them ordered per request and off the engine thread.
- Tensors: the inputs and outputs are those of chatbot/inference/contract.py, which the
  worker uses too. `initialize` refuses a model configuration (config.pbtxt) that states
  other ones, with a `ContractMismatch` naming each difference.
- Bad input (not JSON, wrong shape, empty, prompt longer than the context window, bad
  sampling values) is answered with a response carrying `pb_utils.TritonError` and the
  final flag; engine failures likewise. Every sender is closed with the final flag.
- `stop` (optional) is a JSON list of strings (a lone JSON string is taken as a list of
  one); anything else is a bad request. The engine matches them on text and holds back
  partial matches, so a stop string never reaches the client.
- `background` (optional, true for work no one waits on, such as titles) asks the engine to
  schedule the request behind interactive ones (chatbot/inference/engine.py).
- Metrics: the engine keeps raw counters (`Engine.stats()`); the sender thread turns
  them into Triton custom metrics (`pb_utils.MetricFamily`, served on Triton's metrics
  port next to its own `nv_*` metrics) every `_METRICS_INTERVAL_S`, pushing counter
  *deltas* and gauge values, labelled {model, version}. Means come from counter pairs
  (`chat_time_to_first_token_ms_total / chat_first_tokens_total`, and
  `chat_time_per_output_token_ms_total / chat_output_tokens_total`, where the latter
  counts output tokens after each request's first), since counters and gauges are the
  kinds every python backend offers. `chat_requests_total` is split by finish_reason.
  If the backend has no metrics API, or creating a family fails, the model still loads
  and serves, without metrics (logged once).
- Cancellation: the sender thread polls `response_sender.is_cancelled()` of every live
  request every ~50 ms and cancels its engine handle; the engine drops the sequence
  within one step and the final response says finish_reason "cancelled".
- Imports: the stub embeds the *system* Python 3.11 in isolated mode, which ignores
  PYTHONPATH. The launcher still sets PYTHONPATH (venv site-packages + repo root) and
  `_extend_sys_path` copies it onto sys.path before numpy/torch/chatbot are imported.
"""

from __future__ import annotations

import json
import os
import queue
import site
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


def _extend_sys_path() -> None:
    """The stub embeds the system Python with an isolated config: PYTHONPATH is in the
    environment but *not* on sys.path. Put its entries (the venv's site-packages, the repo
    root) in front, process their .pth files, and fall back to this file's repo root."""
    repo_root = str(Path(__file__).resolve().parents[3])
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + [repo_root]
    for entry in reversed(entries):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    for entry in entries:
        if entry.endswith("site-packages"):
            site.addsitedir(entry)  # .pth files (editable installs); the dir is already on sys.path


_extend_sys_path()

import numpy as np  # noqa: E402  (needs the sys.path above)
import torch  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from chatbot.inference.contract import INPUTS, OUTPUTS, check_model_config  # noqa: E402
from chatbot.inference.engine import Engine  # noqa: E402
from chatbot.inference.errors import INVALID_REQUEST
from chatbot.inference.generate import SamplingParams  # noqa: E402
from chatbot.inference.request import (  # noqa: E402
    FINISH_REASONS,
    EngineEvent,
    EngineStats,
    validate_messages,
)

_CANCEL_POLL_S = 0.05
_METRICS_INTERVAL_S = 0.25  # counters/gauges are pushed to Triton at most this often
MAX_STOP_STRINGS = 16  # each is searched in the held-back text after every token
MAX_STOP_CHARS = 256
_STOP = object()
# the optional scalar inputs that set the SamplingParams field of their name, in contract order
_SAMPLING_INPUTS = tuple(
    t for t in INPUTS if t.optional and t.data_type != "BYTES" and t.name in {f.name for f in fields(SamplingParams)}
)


@dataclass
class _Live:
    sender: Any  # pb_utils.InferenceResponseSender
    handle: Any = None  # RequestHandle once submitted
    cancel_seen: bool = False


def _optional_scalar(request: Any, name: str) -> Any:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 1:
        raise ValueError(f"{name} must hold exactly one value, got {arr.size}")
    return arr[0].item()


def _parse_stop(request: Any) -> tuple[str, ...]:
    """Optional input `stop`: a JSON list of non-empty strings -> SamplingParams.stop."""
    tensor = pb_utils.get_input_tensor_by_name(request, "stop")
    if tensor is None:
        return ()
    raw = tensor.as_numpy().reshape(-1)
    if raw.size != 1:
        raise ValueError(f"stop must hold exactly one JSON string, got {raw.size}")
    value = raw[0]
    try:
        stop = json.loads(value.decode("utf-8") if isinstance(value, bytes) else str(value))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"stop is not valid UTF-8 JSON: {exc}") from None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError("stop must be a JSON list of non-empty strings")
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise ValueError(f"stop allows at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_CHARS} characters")
    return tuple(dict.fromkeys(stop))  # duplicates would only cost time


def _parse(request: Any) -> tuple[list[dict[str, str]], SamplingParams]:
    """Inputs -> (messages, sampling params); ValueError with a client-facing message."""
    tensor = pb_utils.get_input_tensor_by_name(request, "messages")
    if tensor is None:
        raise ValueError("input 'messages' is required")
    raw = tensor.as_numpy().reshape(-1)
    if raw.size != 1:
        raise ValueError(f"messages must hold exactly one JSON string, got {raw.size}")
    value = raw[0]
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        messages = validate_messages(json.loads(text))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"messages is not valid UTF-8 JSON: {exc}") from None
    opts = {t.name: _optional_scalar(request, t.name) for t in _SAMPLING_INPUTS}
    # absent inputs keep the SamplingParams defaults
    given = {t.name: t.python_type(opts[t.name]) for t in _SAMPLING_INPUTS if opts[t.name] is not None}
    params = SamplingParams(**given, stop=_parse_stop(request))
    params.validate()
    return messages, params


def _response(text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> Any:
    values = {"text": text.encode("utf-8"), "finish_reason": finish_reason.encode("utf-8"),
              "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor(t.name, np.array([values[t.name]], dtype=t.numpy_dtype)) for t in OUTPUTS]
    )


class _Metrics:
    """Engine stats -> Triton custom metrics; a no-op when the backend has no metrics API."""

    COUNTERS = (  # (metric name, EngineStats field, help)
        ("chat_time_to_first_token_ms_total", "ttft_ms_total",
         "Sum over requests of the time from reaching the engine to the first sampled token, in ms (mean = / chat_first_tokens_total)"),
        ("chat_first_tokens_total", "first_tokens_total", "Requests that got their first token"),
        ("chat_time_per_output_token_ms_total", "tpot_ms_total",
         "Sum of gaps between consecutive output tokens of a request, in ms (mean = / chat_output_tokens_total)"),
        ("chat_output_tokens_total", "output_tokens_total", "Output tokens after the first of each request"),
        ("chat_prefill_tokens_total", "prefill_tokens_total", "Prompt tokens prefilled"),
        ("chat_prefill_batches_total", "prefill_batches_total", "Prefill forward passes (one chunk of one or more prompts each)"),
        ("chat_prefix_cache_reused_tokens_total", "prefix_reused_tokens_total",
         "Prompt tokens whose keys and values came from the prefix cache instead of a prefill"),
    )
    GAUGES = (
        ("chat_active_sequences", "active_sequences", "Sequences being generated (holding a KV-cache slot)"),
        ("chat_queue_length", "queue_length", "Accepted requests waiting for a KV-cache slot"),
        ("chat_prefix_cache_tokens", "cached_tokens", "Tokens kept in idle KV-cache slots for later turns"),
    )

    def __init__(self, labels: dict[str, str]) -> None:
        self.enabled = False
        self._last: dict[str, float] = {}
        self._metrics: dict[str, Any] = {}  # EngineStats field (or requests_total.<reason>) -> Metric
        self._families: list[Any] = []  # families must outlive their metrics: keep them referenced
        family_cls = getattr(pb_utils, "MetricFamily", None)
        if family_cls is None:
            pb_utils.Logger.log_warn("chat: this python backend has no pb_utils.MetricFamily; no custom metrics")
            return
        try:
            for kind_name, specs in (("COUNTER", self.COUNTERS), ("GAUGE", self.GAUGES)):
                for name, field, help_text in specs:
                    family = family_cls(name=name, description=help_text, kind=getattr(family_cls, kind_name))
                    self._families.append(family)
                    self._metrics[field] = family.Metric(labels=labels)
            family = family_cls(name="chat_requests_total", description="Finished requests by finish_reason",
                                kind=family_cls.COUNTER)
            self._families.append(family)
            for reason in FINISH_REASONS:
                self._metrics[f"requests_total.{reason}"] = family.Metric(labels={**labels, "finish_reason": reason})
        except Exception as exc:  # metrics are nice to have: serve without them
            pb_utils.Logger.log_warn(f"chat: custom metrics unavailable: {exc}")
            self._metrics = {}
            return
        self.enabled = True

    def update(self, stats: EngineStats) -> None:
        """Push what changed since the last call: counter deltas, gauge values."""
        if not self.enabled:
            return
        values: dict[str, float] = {field: float(getattr(stats, field)) for _, field, _ in self.COUNTERS + self.GAUGES}
        values.update({f"requests_total.{r}": float(n) for r, n in stats.requests_total.items()})
        gauges = {field for _, field, _ in self.GAUGES}
        for key, value in values.items():
            last = self._last.get(key, 0.0)
            if value == last:
                continue  # each call is an IPC round trip to the server
            if key in gauges:
                self._metrics[key].set(value)
            else:
                self._metrics[key].increment(value - last)  # engine counters only grow
            self._last[key] = value


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        check_model_config(config)  # config.pbtxt and this file must speak the same tensors
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("num_threads", "2")))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model_dir = Path(params.get("model_dir", "demo"))
        if not model_dir.is_absolute():
            model_dir = Path(__file__).resolve().parent / model_dir  # relative to the version folder
        max_seq_len = int(params.get("max_seq_len", "0")) or None
        self.engine = Engine.from_pretrained(
            model_dir, device=device, precision=params.get("precision", "auto"), max_batch_size=int(params.get("max_num_seqs", "8")),
            max_seq_len=max_seq_len, max_prefill_tokens=int(params.get("max_prefill_tokens", "512")),
            kv_cache_bytes=int(params.get("kv_cache_mb", "0")) * 2**20,
            prefix_cache=params.get("prefix_cache", "true").lower() != "false",
            native_decode=params.get("native_decode", "true").lower() != "false",
        )
        self.engine.start()
        labels = {"model": args.get("model_name", "chat"), "version": str(args.get("model_version", "1"))}
        self._metrics = _Metrics(labels)
        self._outbox: queue.Queue[Any] = queue.Queue()
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()  # guards _live: execute registers, the sender thread removes
        self._next_id = 0
        self._sender_thread = threading.Thread(target=self._send_loop, name="chat-sender", daemon=True)
        self._sender_thread.start()
        pb_utils.Logger.log_info(
            f"chat model ready: {model_dir} on {device} in {self.engine.precision}, {self.engine.decode_path} decode, context {self.engine.max_seq_len}, "
            f"{self.engine.max_batch_size} sequences, {self.engine.cache.num_slots} KV-cache slots"
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                messages, params = _parse(request)
                background = bool(_optional_scalar(request, "background"))
            except ValueError as exc:
                self._outbox.put(("error", sender, str(exc)))
                continue
            with self._lock:
                self._next_id += 1
                rid = f"r{self._next_id}"
                live = self._live[rid] = _Live(sender)
            try:
                # registered before submit: the first event may arrive before submit returns
                live.handle = self.engine.submit(messages, params, self._on_event, request_id=rid,
                                                 background=background)
            except ValueError as exc:  # includes PromptTooLongError
                with self._lock:
                    del self._live[rid]
                self._outbox.put(("error", sender, str(exc)))
        return None  # decoupled: responses go through the senders

    def _on_event(self, event: EngineEvent) -> None:
        # engine thread: never block it; the sender thread does the IPC
        self._outbox.put(("event", event))

    def _send_loop(self) -> None:
        last_poll = last_metrics = 0.0
        while True:
            try:
                item = self._outbox.get(timeout=_CANCEL_POLL_S)
            except queue.Empty:
                item = None
            if item is _STOP:
                return
            if item is not None:
                try:
                    self._send(item)
                except Exception as exc:  # a vanished client must not stop the thread
                    pb_utils.Logger.log_error(f"chat: sending a response failed: {exc}")
            now = time.monotonic()
            if now - last_poll >= _CANCEL_POLL_S:
                last_poll = now
                self._poll_cancelled()
            if now - last_metrics >= _METRICS_INTERVAL_S:
                last_metrics = now
                try:
                    self._metrics.update(self.engine.stats())
                except Exception as exc:  # never let metrics stop the responses
                    pb_utils.Logger.log_warn(f"chat: updating metrics failed: {exc}")

    def _send(self, item: tuple[Any, ...]) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        if item[0] == "error":
            _, sender, message = item
            # The prefix tells clients the request itself is at fault: retrying cannot help.
            error = pb_utils.TritonError(f"{INVALID_REQUEST}{message}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=final)
            return
        event: EngineEvent = item[1]
        with self._lock:
            live = self._live.get(event.request_id) if not event.final else self._live.pop(event.request_id, None)
        if live is None:
            return
        if event.finish_reason == "error":
            live.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(event.error or "inference failed")), flags=final)
            return
        response = _response(event.text, event.finish_reason or "", event.prompt_tokens, event.completion_tokens)
        live.sender.send(response, flags=final if event.final else 0)

    def _poll_cancelled(self) -> None:
        with self._lock:
            lives = [v for v in self._live.values() if v.handle is not None and not v.cancel_seen]
        for live in lives:
            try:
                if live.sender.is_cancelled():
                    live.cancel_seen = True
                    live.handle.cancel()
                    pb_utils.Logger.log_verbose(f"chat: request {live.handle.request_id} cancelled by the client")
            except Exception as exc:
                pb_utils.Logger.log_warn(f"chat: is_cancelled failed: {exc}")

    def finalize(self) -> None:
        # engine.stop() ends unfinished requests with a final (error) event, which the
        # sender thread still delivers before it sees _STOP
        self.engine.stop()
        self._outbox.put(_STOP)
        self._sender_thread.join(timeout=10.0)
