"""Serving throughput and time to first token: our engine in Triton against `transformers`
and llama.cpp.

The same weights (SmolLM2-135M-Instruct: the Q4_1 GGUF that the model install converts to
`triton_models/chat/1/smollm2`) are served these ways, one after the other, on the same
workload:

  engine      the `chat` model in a real `tritonserver` (continuous batching inside),
              streamed over gRPC with the worker's own `stream_reply`;
  sequential  `transformers.LlamaForCausalLM.generate`, one request at a time in arrival
              order (a FIFO server with a batch size of one);
  static      `generate` on static batches: when the server is idle it takes every
              request that has arrived (up to --max-batch), left-pads them and runs one
              `generate`; requests arriving meanwhile wait for the next batch.
  in-proc     (only with --in-process, a diagnostic) the same `Engine` class in this
              process, without Triton or gRPC: what the serving layers cost.
  llama.cpp   `llama-server` on the GGUF itself (Q4_1, its embedding Q8_0: the weights our
              engine serves dequantised), started per level with `--parallel C
              --cont-batching -t 2` and streamed over HTTP from its `/completion`
              endpoint. Not a dependency: it runs when bench/llamacpp.py finds a binary
              (LLAMA_SERVER, `llama-server` on the PATH, or one built with
              `bench/llamacpp.py build`) and is skipped with a note otherwise.

Workload. For each level C of concurrent streams (default 1, 8, 32) the run sends waves
of C requests whose arrivals are spread evenly over --spread seconds (the first at 0;
--poisson draws exponential gaps with the same mean instead); the next wave starts when
every request of the previous one has finished, and there are ceil(--requests / C) waves,
so every level has about --requests samples. Requests are a system prompt plus one of a
list of varied chit-chat user messages (the same list, in the same order, for every
server). Every request produces exactly --new-tokens tokens: `min_tokens` = `max_tokens`
for Triton, `min_new_tokens` = `max_new_tokens` for `generate`, `n_predict` with
`ignore_eos` for llama.cpp, so EOS never ends one early. Sampling is the same everywhere:
temperature 0.8, top_p 0.95, no top-k (and no min_p for llama.cpp, whose default has one).
Prompts for `generate` and llama.cpp are rendered and tokenized with our `ChatTokenizer`,
exactly as the engine does it, and sent as token ids (the bench checks that every server
counts the same prompt tokens); llama.cpp gets `cache_prompt: false`, so every request
prefills its whole prompt, like a first turn in the engine.

Measures, per level and server:
  - output tokens/s: all output tokens of the level / the summed wall time of its waves
    (a wave's wall time runs from its first arrival to its last finished request);
  - TTFT p50/p99 (nearest rank), from a request's arrival to its first token:
      engine: arrival = just before `stream_infer` is called, first token = the first
        non-empty text delta on the client (so it includes gRPC and detokenization);
      llama.cpp: the same, around its HTTP request and its streamed chunks;
      generate: `generate` does not stream per request, so a `streamer` object (the hook
        `TextStreamer` uses) records the time of its second `put()` call: the first is the
        prompt, the second carries the first sampled token of every row of the batch. A
        request's TTFT is that time minus its arrival, which includes its wait in the
        queue for the previous request (sequential) or batch (static) to end.

The HF runs use `torch.set_num_threads(2)`, the Triton model its `num_threads` parameter
(2), llama-server `-t 2 -tb 2`. Every figure is CPU-bound, so the bench also meters the
CPU time used by processes that are not its own (from /proc) and prints it per row as
"other CPU": a row where that is more than a few percent was disturbed and should be run
again (the report names such rows). The sequential server runs the full workload, not a sample: on this
model a request takes about 0.4 s, so it stays within a few minutes.

Run: `.venv/bin/python bench/engine.py [--in-process] [--no-llamacpp]`, about 4 minutes on
2 cores without llama.cpp.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.llamacpp import BUILD_HINT, find_server, gguf_path, serving  # noqa: E402
from chatbot.inference.tokenizer import ChatTokenizer  # noqa: E402
from chatbot.ops.launcher import Child, http_ok  # noqa: E402
from chatbot.ops.servers import (  # noqa: E402
    MODEL_REPOSITORY,
    Ports,
    triton_argv,
    triton_env,
)

if TYPE_CHECKING:
    from chatbot.inference.engine import Engine
    from chatbot.inference.request import EngineEvent

MODEL_DIR = Path(__file__).resolve().parent.parent / "triton_models" / "chat" / "1" / "smollm2"
SYSTEM = "You are a helpful, friendly assistant. Keep your answers short and kind."
# varied lengths and topics, so prompts in a static batch need real padding
USER_MESSAGES = [
    "Hi! How are you today?",
    "What do you like to do on weekends?",
    "I just got back from a long hike in the mountains and my legs are so tired. Any tips for recovering?",
    "Do you have a favourite book?",
    "My cat keeps knocking things off the table. Why do cats do that?",
    "Can you recommend a good movie for a rainy evening?",
    "I'm thinking about learning to play the guitar, but I'm not sure I have the time. What do you think?",
    "What's your favourite season and why?",
    "Tell me something that made you smile recently.",
    "I cooked pasta for the first time and it was a disaster, the sauce burned and the noodles were mushy.",
    "Do you prefer coffee or tea?",
    "Any ideas for a birthday present for my sister? She likes gardening and old music.",
    "How do you stay motivated when things get hard?",
    "What would you do with a free day and no plans at all?",
    "I moved to a new city last month and I don't know anyone yet. How can I meet people?",
    "Good morning!",
]
SAMPLING = {"temperature": 0.8, "top_p": 0.95}


# ---- workload -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    index: int
    arrival: float  # seconds after the start of its wave
    messages: list[dict[str, str]]
    prompt_ids: list[int]


@dataclasses.dataclass
class Outcome:
    arrival: float  # perf_counter() when the request arrived (was sent)
    first_token: float  # perf_counter() of its first token
    tokens: int  # output tokens produced
    finished: float = 0.0  # perf_counter() of its last token


@dataclasses.dataclass
class LevelResult:
    tokens: int = 0
    wall: float = 0.0
    ttft_ms: list[float] = dataclasses.field(default_factory=list)
    decode_rates: list[float] = dataclasses.field(default_factory=list)  # per stream, tokens after the first / s
    other_cpu: float = 0.0  # share of the machine's CPU used by processes not ours meanwhile

    def add_wave(self, start: float, end: float, outcomes: Sequence[Outcome]) -> None:
        self.wall += end - start
        self.tokens += sum(o.tokens for o in outcomes)
        self.ttft_ms += [(o.first_token - o.arrival) * 1000 for o in outcomes]
        self.decode_rates += [(o.tokens - 1) / (o.finished - o.first_token) for o in outcomes
                              if o.tokens > 1 and o.finished > o.first_token]

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def make_waves(
    tokenizer: ChatTokenizer, streams: int, requests: int, spread: float, poisson: bool, seed: int,
) -> list[list[Request]]:
    rng = random.Random(seed * 1000 + streams)  # the same arrivals for every server
    waves: list[list[Request]] = []
    index = 0
    for _ in range(math.ceil(requests / streams)):
        if poisson:
            gaps = [rng.expovariate(streams / spread) for _ in range(streams)]
            arrivals = [sum(gaps[:i]) for i in range(streams)]  # the first arrives at 0
        else:
            arrivals = [i * spread / streams for i in range(streams)]
        wave = []
        for arrival in arrivals:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": USER_MESSAGES[index % len(USER_MESSAGES)]},
            ]
            prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
            wave.append(Request(index, arrival, messages, prompt_ids))
            index += 1
        waves.append(wave)
    return waves


# ---- disturbance meter -------------------------------------------------------------------------


def _machine_busy_ticks() -> int:
    # first line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return user + nice + system + irq + softirq + steal


def _own_ticks() -> int:
    """CPU ticks of this process and its live descendants (tritonserver and its stubs)."""
    parents: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            rest = stat.read_text().rsplit(")", 1)[1].split()  # the name may contain spaces
        except (OSError, IndexError):
            continue  # exited meanwhile
        pid = int(stat.parent.name)
        parents[pid] = int(rest[1])
        ticks[pid] = int(rest[11]) + int(rest[12])  # utime + stime
    ours, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in ours]
        ours.update(children)
        frontier += children
    return sum(ticks.get(pid, 0) for pid in ours)


class OtherCpu:
    """Meter what processes that are not ours take of the CPU over a stretch of time.

    Children that exit within the stretch would count as foreign; none do here (the
    Triton child lives across every engine level and is stopped outside the meter).
    """

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.busy, self.own = _machine_busy_ticks(), _own_ticks()

    def share(self) -> float:
        elapsed = time.perf_counter() - self.start
        busy, own = _machine_busy_ticks() - self.busy, _own_ticks() - self.own
        capacity = elapsed * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return max(0.0, (busy - own) / capacity) if capacity else 0.0


def metered(run: Callable[[], LevelResult]) -> LevelResult:
    meter = OtherCpu()
    result = run()
    result.other_cpu = meter.share()
    return result


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


# ---- (a) the engine in Triton ---------------------------------------------------------------


async def engine_level(grpc_url: str, waves: list[list[Request]], new_tokens: int) -> LevelResult:
    from tritonclient.grpc import aio as triton_aio

    from workers.inference import stream_reply

    params = {**SAMPLING, "max_tokens": new_tokens, "min_tokens": new_tokens}
    client = triton_aio.InferenceServerClient(grpc_url)
    result = LevelResult()

    async def one(request: Request, start: float) -> tuple[Outcome, float]:
        await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
        arrival = time.perf_counter()
        first = 0.0
        final: dict[str, Any] | None = None
        async for delta, end in stream_reply(
            client, "chat", str(uuid.uuid4()), request.messages, {**params, "seed": request.index},
        ):
            if delta and not first:
                first = time.perf_counter()
            final = end or final
        assert final is not None
        if final["prompt_tokens"] != len(request.prompt_ids):
            raise RuntimeError(f"the engine counted {final['prompt_tokens']} prompt tokens, we {len(request.prompt_ids)}")
        now = time.perf_counter()
        return Outcome(arrival, first or now, int(final["completion_tokens"]), now), now

    try:
        for wave in waves:
            start = time.perf_counter()
            done = await asyncio.gather(*(one(r, start) for r in wave))
            result.add_wave(start, max(end for _, end in done), [o for o, _ in done])
    finally:
        await client.close()
    return result


def repository_with(tmp: Path, **params: str) -> Path:
    """A model repository whose `chat` model serves MODEL_DIR with these config.pbtxt
    parameters changed (precision, kv_cache_mb, ...)."""
    repository = tmp / "triton_models"
    shutil.copytree(MODEL_REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__", "smollm2", "demo"))
    config = repository / "chat" / "config.pbtxt"
    text = config.read_text()
    for key, value in {"model_dir": str(MODEL_DIR), **params}.items():
        text, n = re.subn(rf'(key:\s*"{key}".*?string_value:\s*)"[^"]*"', rf'\g<1>"{value}"', text, flags=re.S)
        assert n == 1, f"config.pbtxt has no parameter {key}"
    config.write_text(text)
    return repository


@contextlib.contextmanager
def triton_serving(log_dir: Path, **params: str) -> Iterator[str]:
    """A tritonserver serving the chat model with these parameters; yields its gRPC address
    and its metrics URL."""
    log_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports.random()
    log = log_dir / "triton.log"
    child = Child(
        "triton", triton_argv(ports, repository_with(log_dir, **params)), triton_env(),
        ready=lambda: http_ok(f"http://127.0.0.1:{ports.triton_http}/v2/health/ready"), ready_timeout=120, log=log,
    )
    child.start()
    try:
        try:
            child.wait_ready()
        except (RuntimeError, TimeoutError):
            print(log.read_text()[-4000:], file=sys.stderr)
            raise
        yield f"127.0.0.1:{ports.triton_grpc}", f"http://127.0.0.1:{ports.triton_metrics}/metrics"
    finally:
        child.stop()


def run_engine(
    levels: dict[int, list[list[Request]]], new_tokens: int, log_dir: Path, precision: str,
) -> dict[int, LevelResult]:
    with triton_serving(log_dir, precision=precision) as (grpc_url, _):
        # warm-up: first forwards allocate and pick kernels; a short batch of 8 covers prefill and decode
        every = [r for waves in levels.values() for wave in waves for r in wave]
        warm = [dataclasses.replace(r, arrival=0.0) for r in every[:8]]
        asyncio.run(engine_level(grpc_url, [warm], 8))
        return {
            streams: metered(lambda: asyncio.run(engine_level(grpc_url, waves, new_tokens)))
            for streams, waves in levels.items()
        }


# ---- (d) llama.cpp's server on the same weights ------------------------------------------------

LLAMA_CPP = "llama.cpp server Q4_1"


async def llamacpp_level(url: str, waves: list[list[Request]], new_tokens: int) -> LevelResult:
    """The waves against llama-server's streaming `/completion`, timed like the engine's."""
    import httpx

    body = {
        **SAMPLING, "top_k": 0, "min_p": 0.0, "n_predict": new_tokens, "ignore_eos": True,
        "cache_prompt": False, "stream": True,
    }
    result = LevelResult()

    async def one(client: httpx.AsyncClient, request: Request, start: float) -> tuple[Outcome, float]:
        await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
        arrival = time.perf_counter()
        first = 0.0
        final: dict[str, Any] | None = None
        payload = {**body, "prompt": request.prompt_ids, "seed": request.index}
        async with client.stream("POST", "/completion", json=payload) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():  # server-sent events: `data: {...}`
                if not line.startswith("data: "):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                if chunk.get("content") and not first:
                    first = time.perf_counter()
                if chunk.get("stop"):
                    final = chunk
        if final is None:
            raise RuntimeError("llama-server's stream ended without a final chunk")
        if final["tokens_evaluated"] != len(request.prompt_ids) or final["tokens_predicted"] != new_tokens:
            raise RuntimeError(f"llama-server evaluated {final['tokens_evaluated']} prompt tokens and predicted "
                               f"{final['tokens_predicted']}, we sent {len(request.prompt_ids)} and asked {new_tokens}")
        now = time.perf_counter()
        return Outcome(arrival, first or now, int(final["tokens_predicted"]), now), now

    # a connection per request, as each stream of the engine's is its own call: llama-server
    # (cpp-httplib) closes idle keep-alive connections, and reusing one fails the next request
    limits = httpx.Limits(max_connections=max(len(w) for w in waves), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits) as client:
        for wave in waves:
            start = time.perf_counter()
            done = await asyncio.gather(*(one(client, r, start) for r in wave))
            result.add_wave(start, max(end for _, end in done), [o for o, _ in done])
    return result


def run_llamacpp(
    levels: dict[int, list[list[Request]]], new_tokens: int, log_dir: Path, binary: Path,
) -> dict[int, LevelResult]:
    """One llama-server per level, with as many slots as the level has streams (what a
    deployment sized for that load would run); each slot holds the longest prompt and its reply."""
    gguf = gguf_path()
    every = [r for waves in levels.values() for wave in waves for r in wave]
    slot_context = math.ceil((max(len(r.prompt_ids) for r in every) + new_tokens) / 256) * 256
    results = {}
    for streams, waves in levels.items():
        with serving(binary, gguf, streams, slot_context, log_dir / f"llama-server-{streams}.log") as url:
            # warm-up, as for the engine: a few short requests through prefill and decode
            warm = [dataclasses.replace(r, arrival=0.0) for r in every[:min(8, streams)]]
            asyncio.run(llamacpp_level(url, [warm], 8))
            results[streams] = metered(lambda w=waves: asyncio.run(llamacpp_level(url, w, new_tokens)))
    return results


# ---- one conversation of many turns ----------------------------------------------------------

TURNS = [
    "Hi! I'm planning a small garden on my balcony.", "What vegetables grow well in pots?",
    "How much sun do tomatoes need?", "And how often should I water them?", "What about herbs?",
    "Which herbs can share a pot?", "Do I need special soil?", "How do I keep pests away?",
    "Are coffee grounds good for plants?", "When should I plant the seeds?",
    "Can I grow strawberries too?", "How big should the pots be?", "What if it gets windy?",
    "Should I use fertilizer?", "How do I know when tomatoes are ripe?", "Can I save seeds for next year?",
    "What grows in winter?", "Any flowers that attract bees?", "How do I keep track of everything?",
    "Thanks! Any last advice?",
]


def reused_tokens(metrics_url: str) -> int:
    """The Triton model's count of prompt tokens taken from its prefix cache."""
    import urllib.request

    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return int(sum(float(m.group(1)) for m in re.finditer(
        r"^chat_prefix_cache_reused_tokens_total(?:\{[^}]*\})? (\S+)$", text, re.M)))


async def multi_turn(
    grpc_url: str, metrics_url: str, new_tokens: int, system: str = SYSTEM,
) -> list[tuple[int, float, int]]:
    """(prompt tokens, time to first token in ms, prompt tokens reused from the prefix cache)
    of each turn of one conversation, sent one after the other with the replies as history,
    as the chat sends them."""
    from tritonclient.grpc import aio as triton_aio

    from workers.inference import stream_reply

    client = triton_aio.InferenceServerClient(grpc_url)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    out = []
    try:
        for i, text in enumerate(TURNS):
            await asyncio.sleep(0.3)  # the model pushes its metrics every 0.25 s
            before = reused_tokens(metrics_url)
            messages.append({"role": "user", "content": text})
            start, first, reply = time.perf_counter(), 0.0, []
            final: dict[str, Any] | None = None
            params = {**SAMPLING, "max_tokens": new_tokens, "seed": i}
            async for delta, end in stream_reply(client, "chat", str(uuid.uuid4()), messages, params):
                if delta and not first:
                    first = time.perf_counter()
                reply.append(delta)
                final = end or final
            assert final is not None
            ttft = ((first or time.perf_counter()) - start) * 1000
            await asyncio.sleep(0.3)
            out.append((int(final["prompt_tokens"]), ttft, reused_tokens(metrics_url) - before))
            messages.append({"role": "assistant", "content": "".join(reply)})
    finally:
        await client.close()
    return out


def run_multi_turn(log_dir: Path, new_tokens: int, precision: str) -> dict[str, list[tuple[int, float, int]]]:
    """The same conversation with the prefix cache and without it (prefix_cache false)."""
    out = {}
    for name, reuse in (("prefix cache", "true"), ("no cache", "false")):
        params = {"precision": precision, "prefix_cache": reuse}
        with triton_serving(log_dir / name.replace(" ", "-"), **params) as (grpc_url, metrics_url):
            # warm-up with another system prompt: the measured conversation shares nothing with it
            asyncio.run(multi_turn(grpc_url, metrics_url, 4, system="Warm up the kernels, please."))
            out[name] = asyncio.run(multi_turn(grpc_url, metrics_url, new_tokens))
    return out


def report_multi_turn(runs: dict[str, list[tuple[int, float, int]]], new_tokens: int) -> None:
    print(f"\nOne conversation of {len(TURNS)} turns ({new_tokens} new tokens per reply): time to first token, ms")
    names = list(runs)
    print(f"{'turn':>4} | {'prompt tokens':>13} | {'reused':>6} | " + " | ".join(f"{n:>12}" for n in names))
    for i in range(len(TURNS)):
        prompt, _, reused = runs[names[0]][i]
        print(f"{i + 1:>4} | {prompt:>13} | {reused:>6} | " + " | ".join(f"{runs[n][i][1]:>12.0f}" for n in names))
    cached = runs[names[0]]
    ratio = cached[-1][1] / cached[0][1]
    print(f"  with the prefix cache, turn {len(TURNS)} / turn 1: {ratio:.2f}x  (goal <= 1.3x: {goal(ratio <= 1.3)})")


# ---- (diagnostic) the engine in this process ----------------------------------------------------


async def in_process_level(engine: Engine, waves: list[list[Request]], new_tokens: int) -> LevelResult:
    from chatbot.inference.generate import SamplingParams

    loop = asyncio.get_running_loop()
    result = LevelResult()

    async def one(request: Request, start: float) -> tuple[Outcome, float]:
        await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
        events: asyncio.Queue[tuple[EngineEvent, float]] = asyncio.Queue()

        def on_event(event: EngineEvent) -> None:  # engine thread: stamp, then hand over
            loop.call_soon_threadsafe(events.put_nowait, (event, time.perf_counter()))

        params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, seed=request.index, **SAMPLING)
        arrival = time.perf_counter()
        engine.submit(request.messages, params, on_event)
        first = 0.0
        while True:
            event, at = await events.get()
            if event.text and not first:
                first = at
            if event.final:
                if event.finish_reason == "error":
                    raise RuntimeError(event.error)
                return Outcome(arrival, first or at, event.completion_tokens, at), at

    for wave in waves:
        start = time.perf_counter()
        done = await asyncio.gather(*(one(r, start) for r in wave))
        result.add_wave(start, max(end for _, end in done), [o for o, _ in done])
    return result


def run_in_process(levels: dict[int, list[list[Request]]], new_tokens: int) -> dict[int, LevelResult]:
    from chatbot.inference.engine import Engine

    torch.set_num_threads(2)
    engine = Engine.from_pretrained(MODEL_DIR, max_batch_size=max(levels))
    engine.start()
    try:
        every = [r for waves in levels.values() for wave in waves for r in wave]
        asyncio.run(in_process_level(engine, [[dataclasses.replace(r, arrival=0.0) for r in every[:8]]], 8))
        return {
            streams: metered(lambda: asyncio.run(in_process_level(engine, waves, new_tokens)))
            for streams, waves in levels.items()
        }
    finally:
        engine.stop()


# ---- (b), (c) transformers generate -----------------------------------------------------------


class FirstTokenClock:
    """A `generate` streamer that only notes when the first sampled tokens come out.

    `generate` calls `put()` once with the prompt ids, then once per decoding step with
    the new token of every row; the second call is therefore the batch's first token.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.at = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def hf_generate(model: Any, batch: Sequence[Request], new_tokens: int, pad_id: int) -> tuple[float, int]:
    """One `generate` over `batch`, left-padded; returns (first-token time, tokens per row)."""
    width = max(len(r.prompt_ids) for r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, r in enumerate(batch):
        ids[row, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[row, width - len(r.prompt_ids):] = 1
    clock = FirstTokenClock()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
            do_sample=True, top_k=0, pad_token_id=pad_id, streamer=clock, **SAMPLING,
        )
    produced = out.shape[1] - width
    assert produced == new_tokens, f"generate produced {produced} tokens, expected {new_tokens}"
    return clock.at, produced


def serve_hf(
    model: Any, waves: list[list[Request]], new_tokens: int, pad_id: int, take: Callable[[list[Request], float], int],
) -> LevelResult:
    """Simulate a FIFO server in real time: arrivals are fixed offsets from the wave start;
    whenever the server is idle it runs `generate` on the first `take(arrived, now)` of
    the requests that have arrived (sleeping until the next arrival if none has)."""
    result = LevelResult()
    for wave in waves:
        pending = sorted(wave, key=lambda r: r.arrival)
        start = time.perf_counter()
        outcomes: list[Outcome] = []
        while pending:
            now = time.perf_counter() - start
            arrived = [r for r in pending if r.arrival <= now]
            if not arrived:
                time.sleep(pending[0].arrival - now)
                continue
            batch = arrived[: take(arrived, now)]
            first, produced = hf_generate(model, batch, new_tokens, pad_id)
            done = time.perf_counter()
            outcomes += [Outcome(start + r.arrival, first, produced, done) for r in batch]
            pending = pending[len(batch):]
        result.add_wave(start, time.perf_counter(), outcomes)
    return result


def run_hf(levels: dict[int, list[list[Request]]], new_tokens: int, max_batch: int, pad_id: int) -> tuple[dict[int, LevelResult], dict[int, LevelResult]]:
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    every = [r for waves in levels.values() for wave in waves for r in wave]
    hf_generate(model, every[:1], 8, pad_id)  # warm-up: a batch of one and a padded batch
    hf_generate(model, every[:8], 8, pad_id)
    sequential = {
        s: metered(lambda: serve_hf(model, waves, new_tokens, pad_id, lambda arrived, now: 1))
        for s, waves in levels.items()
    }
    static = {
        s: metered(lambda: serve_hf(model, waves, new_tokens, pad_id, lambda arrived, now: max_batch))
        for s, waves in levels.items()
    }
    return sequential, static


# ---- report ---------------------------------------------------------------------------------


def goal(ok: bool) -> str:
    return "met" if ok else "NOT met"


# llama.cpp on this kind of machine (2 cores, AVX-512; issue 13's table), the reference when
# this run has no llama-server: one stream's decode with Q4_1 weights, and
# `llama-server --parallel 32 --cont-batching` end to end with Q8_0
LLAMA_CPP_ONE_STREAM = 94.0
LLAMA_CPP_SERVER_32 = 218.0


def report(results: dict[str, dict[int, LevelResult]], new_tokens: int) -> None:
    print(f"\nOutput tokens/s and time to first token ({new_tokens} new tokens per request)")
    print(f"{'streams':>7} | {'server':<21} | {'requests':>8} | {'tok/s':>7} | {'decode/stream':>13} | "
          f"{'TTFT p50 ms':>11} | {'p99 ms':>8} | {'wall s':>6} | {'other CPU':>9}")
    print("-" * 117)
    levels = sorted(next(iter(results.values())))
    for streams in levels:
        for name, by_level in results.items():
            r = by_level[streams]
            print(
                f"{streams:>7} | {name:<21} | {len(r.ttft_ms):>8} | {r.throughput:>7.0f} | "
                f"{pct(r.decode_rates, 50):>13.1f} | {pct(r.ttft_ms, 50):>11.1f} | {pct(r.ttft_ms, 99):>8.1f} | "
                f"{r.wall:>6.1f} | {r.other_cpu:>8.0%}"
            )
        print("-" * 117)
    top, one = levels[-1], levels[0]
    if LLAMA_CPP in results:
        server_top = results[LLAMA_CPP][top].throughput
        one_stream = pct(results[LLAMA_CPP][one].decode_rates, 50)
        print(f"\nGoals (llama.cpp figures: its server in this run, at {top} streams and {one})")
    else:
        server_top, one_stream = LLAMA_CPP_SERVER_32, LLAMA_CPP_ONE_STREAM
        print("\nGoals (llama.cpp figures: issue 13's table, measured on this kind of machine; not run here)")
    for name in (k for k in results if k.startswith("engine")):
        at_top, single = results[name][top], results[name][one]
        p99 = pct(at_top.ttft_ms, 99)
        rate = pct(single.decode_rates, 50)
        print(f"  {name}: {top} streams {at_top.throughput:.0f} tok/s = {at_top.throughput / server_top:.2f}x "
              f"llama-server's {server_top:.0f} (goal >= 2x: {goal(at_top.throughput >= 2 * server_top)}); "
              f"TTFT p99 {p99:.0f} ms (goal <= 500: {goal(p99 <= 500)}); {one} stream decodes {rate:.1f} tok/s "
              f"(goal >= llama.cpp Q4_1's {one_stream:.0f}: {goal(rate >= one_stream)})")
        if "static" in results:
            print(f"    / transformers static batch at {top} streams: "
                  f"{at_top.throughput / results['static'][top].throughput:.2f}x")
    disturbed = [f"{name}@{s}" for name, by in results.items() for s, r in by.items() if r.other_cpu > 0.05]
    if disturbed:
        print(f"  WARNING: other processes took more than 5% of the CPU during {', '.join(disturbed)}: run again")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,8,32", help="concurrent streams, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="requests per level (whole waves)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--spread", type=float, default=0.5, help="seconds over which a wave's requests arrive")
    parser.add_argument("--poisson", action="store_true", help="exponential inter-arrival gaps instead of even ones")
    parser.add_argument("--max-batch", type=int, default=32, help="largest static batch for generate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="also run the Engine in this process (diagnostic)")
    parser.add_argument("--precisions", default="fp32,bf16,int8", help="engine precisions to run, comma-separated")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers servers")
    parser.add_argument("--llamacpp", action=argparse.BooleanOptionalAction, default=None,
                        help="run llama-server on the same GGUF (default: when bench/llamacpp.py finds one)")
    parser.add_argument("--turns-only", action="store_true", help="only the multi-turn conversation")
    args = parser.parse_args()
    llama_server = find_server() if args.llamacpp is not False else None
    if args.llamacpp and llama_server is None:
        parser.error(f"--llamacpp: no llama-server found; {BUILD_HINT}")

    tokenizer = ChatTokenizer.from_pretrained(MODEL_DIR)
    assert tokenizer.eos_token_id is not None
    levels = {
        s: make_waves(tokenizer, s, args.requests, args.spread, args.poisson, args.seed)
        for s in (int(x) for x in args.levels.split(","))
    }
    started = datetime.now(timezone.utc)
    print(f"bench/engine.py, started {started:%Y-%m-%d %H:%M:%S} UTC; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}")
    print(f"levels {list(levels)}, {args.requests} requests per level, arrivals "
          f"{'Poisson' if args.poisson else 'evenly spaced'} over {args.spread} s per wave")
    results: dict[str, dict[int, LevelResult]] = {}
    precisions = args.precisions.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        t = time.perf_counter()
        turns = run_multi_turn(Path(tmp) / "turns", args.new_tokens, precisions[0])
        report_multi_turn(turns, args.new_tokens)
        print(f"multi-turn done in {time.perf_counter() - t:.0f} s", flush=True)
        if args.turns_only:
            return
        for precision in precisions:
            t = time.perf_counter()
            results[f"engine {precision}"] = run_engine(levels, args.new_tokens, Path(tmp) / precision, precision)
            print(f"engine {precision} done in {time.perf_counter() - t:.0f} s", flush=True)
        if llama_server is not None:
            t = time.perf_counter()
            results[LLAMA_CPP] = run_llamacpp(levels, args.new_tokens, Path(tmp) / "llama.cpp", llama_server)
            print(f"llama.cpp ({llama_server}) done in {time.perf_counter() - t:.0f} s", flush=True)
        elif args.llamacpp is None:
            print(f"llama.cpp skipped: no llama-server found; {BUILD_HINT}", flush=True)
    if args.in_process:
        t = time.perf_counter()
        results["in-proc"] = run_in_process(levels, args.new_tokens)
        print(f"in-process engine done in {time.perf_counter() - t:.0f} s")
    if not args.no_hf:
        t = time.perf_counter()
        # the tokenizer's EOS doubles as the pad token: padded positions are masked out anyway
        sequential, static = run_hf(levels, args.new_tokens, args.max_batch, tokenizer.eos_token_id)
        results["sequential"] = sequential
        results["static"] = static
        print(f"transformers done in {time.perf_counter() - t:.0f} s")
    report(results, args.new_tokens)
    print(f"\nfinished {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC")


if __name__ == "__main__":
    main()
