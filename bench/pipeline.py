"""Time to first token through the whole pipeline against a direct Triton stream.

Starts the stack on embedded servers in a temporary directory (as the tests do), then for
1 and 32 concurrent conversations measures:
  - direct: the worker's own Triton call (`stream_reply`) on the same messages and
    sampling parameters, from the request to the first text delta;
  - pipeline: a websocket client, from sending the `send` frame to the first `token` frame
    (API -> PostgreSQL -> relay -> JetStream -> worker -> Triton -> NATS -> websocket).
Prints p50/p99 of both and what the pipeline adds. Run: `.venv/bin/python bench/pipeline.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tritonclient.grpc import aio as triton_aio  # noqa: E402

from chatbot.eventstore.application import chat_application  # noqa: E402
from chatbot.ops.launcher import Stack  # noqa: E402
from chatbot.ops.servers import Ports  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402
from domain.persona import Persona  # noqa: E402
from tests.client import ChatClient, recv, send  # noqa: E402
from workers.inference import stream_reply  # noqa: E402

SYSTEM = "You are a helpful, friendly assistant."
TEXT = "Hi! What do you like to do on weekends?"
MAX_TOKENS = 8


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def direct_ttft(triton: triton_aio.InferenceServerClient, concurrency: int, rounds: int) -> list[float]:
    params = {"temperature": 0.8, "top_p": 0.95, "max_tokens": MAX_TOKENS, "seed": 1}
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TEXT}]

    async def one() -> float:
        started = time.perf_counter()
        ttft = 0.0
        async for delta, final in stream_reply(triton, "chat", str(uuid.uuid4()), messages, params):
            if delta and not ttft:
                ttft = (time.perf_counter() - started) * 1000
        return ttft

    samples: list[float] = []
    for _ in range(rounds):
        samples += await asyncio.gather(*(one() for _ in range(concurrency)))
    return samples


async def pipeline_ttft(clients: list[ChatClient], persona_id: str, rounds: int) -> list[float]:
    async def one(client: ChatClient, ws) -> float:
        # a fresh conversation per round: the same prompt as the direct call, no history
        conversation_id = await client.start_conversation(persona_id)
        started = time.perf_counter()
        await send(ws, conversation_id, TEXT)
        ttft = 0.0
        while True:
            frame = await recv(ws, timeout=120)
            if frame["type"] == "token" and not ttft:
                ttft = (time.perf_counter() - started) * 1000
            elif frame["type"] == "reply":
                return ttft
            elif frame["type"] == "error":
                raise RuntimeError(frame)

    sockets = [await c.ws().__aenter__() for c in clients]
    samples: list[float] = []
    try:
        for _ in range(rounds):
            samples += await asyncio.gather(*(one(c, ws) for c, ws in zip(clients, sockets)))
    finally:
        for ws in sockets:
            await ws.close()
    return samples


async def run(stack: Stack, levels: list[int], rounds: int) -> None:
    app = chat_application(stack.settings)
    persona = Persona(slug=f"bench-{uuid.uuid4().hex[:6]}", name="Bench", description="benchmark",
                      system_prompt=SYSTEM, greeting="", model="chat", temperature=0.8, top_p=0.95,
                      max_tokens=MAX_TOKENS)
    app.save(persona)
    triton = triton_aio.InferenceServerClient(stack.settings.triton_urls[0])
    await direct_ttft(triton, 4, 2)  # warm-up
    print(f"\nTime to first token, ms ({MAX_TOKENS} new tokens per reply, {rounds} rounds per level)")
    print(f"{'streams':>8} | {'direct p50':>10} {'p99':>7} | {'pipeline p50':>12} {'p99':>7} | {'added p50':>9} {'p99':>7}")
    for concurrency in levels:
        clients = []
        for _ in range(concurrency):
            c = ChatClient(stack.api_urls[0])
            await c.register_and_log_in()
            clients.append(c)
        await pipeline_ttft(clients[:1], str(persona.id), 1)  # warm-up
        direct = await direct_ttft(triton, concurrency, rounds)
        piped = await pipeline_ttft(clients, str(persona.id), rounds)
        d50, d99, p50, p99 = pct(direct, 50), pct(direct, 99), pct(piped, 50), pct(piped, 99)
        print(f"{concurrency:>8} | {d50:>10.1f} {d99:>7.1f} | {p50:>12.1f} {p99:>7.1f} | {p50 - d50:>9.1f} {p99 - d99:>7.1f}")
        print(f"{'':>8}   (mean direct {statistics.mean(direct):.1f}, pipeline {statistics.mean(piped):.1f}, n={len(piped)})")
        for c in clients:
            await c.close()
    await triton.close()
    app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,32")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="chatbench") as tmp:
        settings = load_settings(Path(tmp))
        # one simulated user sends far more than a person would: lift the per-user limits
        settings = dataclasses.replace(settings, messages_per_minute=1_000_000, tokens_per_day=0,
                                       auth_attempts_per_address=0)  # every simulated user logs in from here
        stack = Stack(settings, Ports.random(), log_dir=Path(tmp) / "logs")
        print("starting the stack…", flush=True)
        stack.start()
        try:
            asyncio.run(run(stack, [int(x) for x in args.levels.split(",")], args.rounds))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
