"""Accepted user messages per second: persisted in PostgreSQL and published on JetStream.

Starts the stack on embedded servers with no inference workers (requests wait in the
stream, so generation does not compete for the CPU), opens websockets for many users, and
sends one message to each of many fresh conversations: first all at once (throughput;
the latency is then mostly queueing), then paced at each `--paced` rate for 4 s (latency
under load; by default 500/s and the goal's 1,000/s).
For every message it records the time from the `send` frame to the `accepted` frame (the
events are committed) and to the moment its `ReplyRequested` event is on the stream (seen
by a core NATS subscriber on the event subjects). Prints throughput, percentiles and the
CPU time each process of the stack spent per message.
Run: `.venv/bin/python bench/ingest.py [--users 32] [--messages 4000] [--paced 500,1000] [--api 1]
[--profile out.txt]`;
`--profile` attaches py-spy to the API process while the messages go in and writes the
samples of the thread holding the GIL (where the process's Python time goes) as collapsed
stacks; `--profile-idle` samples every thread, waiting ones too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats  # noqa: E402

from bench.procstat import StackCpu, describe_cpu  # noqa: E402
from chatbot.bus.messaging import H_ORIGINATOR, event_filter  # noqa: E402
from chatbot.ops.launcher import Stack  # noqa: E402
from chatbot.ops.servers import Ports  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402
from projections.rebuild import status  # noqa: E402
from tests.client import ChatClient, recv  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_profiler(stack: Stack, out: Path, idle: bool) -> subprocess.Popen[bytes]:
    """py-spy sampling the API process (its pid from the launcher) until stopped."""
    child = stack.children["api-0"]
    assert child.proc is not None, "the API process is running"
    argv = [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(child.proc.pid),
            "--format", "raw", "--rate", "200", "--output", str(out), "--threads"]
    return subprocess.Popen(argv + (["--idle"] if idle else ["--gil"]), stdout=subprocess.DEVNULL)


async def sign_up(stack: Stack, users: int) -> list[ChatClient]:
    urls = stack.api_urls
    clients = [ChatClient(urls[i % len(urls)]) for i in range(users)]  # users spread over the API processes
    hashing = asyncio.Semaphore(2)  # argon2 takes its memory and CPU: a few sign-ups at a time

    async def one(c: ChatClient) -> None:
        async with hashing:
            await c.register_and_log_in()

    await asyncio.gather(*(one(c) for c in clients))
    return clients


async def phase(stack: Stack, clients: list[ChatClient], per_user: int, rate: float | None,
                profile: Path | None = None, idle: bool = False) -> float:
    """One message to each of `per_user` fresh conversations of every user: all at once
    (`rate` None) or paced at `rate` messages/s in all. Prints the figures; returns the
    accepted messages/s."""
    users = len(clients)
    async def start(c: ChatClient) -> list[str]:
        return [await c.start_conversation() for _ in range(per_user)]

    conversations = await asyncio.gather(*(start(c) for c in clients))
    published: dict[str, float] = {}
    nc = await nats.connect(stack.settings.nats_servers)

    async def on_event(msg) -> None:
        published.setdefault((msg.headers or {}).get(H_ORIGINATOR, ""), time.perf_counter())

    await nc.subscribe(event_filter("Conversation.ReplyRequested"), cb=on_event)
    sent: dict[str, float] = {}
    accepted: dict[str, float] = {}
    interval = users / rate if rate else 0.0  # each user's share of the rate

    async def user(client: ChatClient, ids: list[str], offset: float) -> None:
        async with client.ws() as ws:
            async def reader() -> None:
                left = set(ids)
                while left:
                    frame = await recv(ws, timeout=120)
                    if frame["type"] == "accepted":
                        accepted[frame["conversation_id"]] = time.perf_counter()
                        left.discard(frame["conversation_id"])
                    elif frame["type"] == "error":
                        raise RuntimeError(frame)

            task = asyncio.create_task(reader())
            await ready.wait()
            for i, cid in enumerate(ids):
                if interval:
                    due = started + offset + i * interval
                    await asyncio.sleep(max(0.0, due - time.perf_counter()))
                sent[cid] = time.perf_counter()
                await ws.send(json.dumps({"type": "send", "conversation_id": cid,
                                          "client_message_id": str(uuid.uuid4()), "text": "Hello there!"}))
            await task

    ready = asyncio.Event()
    users_done = asyncio.gather(*(
        user(c, ids, interval * k / users) for k, (c, ids) in enumerate(zip(clients, conversations))
    ))
    await asyncio.sleep(0.5)  # the sockets open
    profiler = start_profiler(stack, profile, idle) if profile else None
    if profiler:
        await asyncio.sleep(1.0)  # py-spy attaches
    cpu = StackCpu(stack)
    cpu_before = cpu.snapshot()
    started = time.perf_counter()
    ready.set()
    await users_done
    all_accepted = time.perf_counter()
    if profiler:
        profiler.send_signal(2)  # SIGINT: py-spy writes its samples and exits
        profiler.wait(30)
        print(f"profile of the API process: {profile}")
    deadline = time.perf_counter() + 60
    while len(published) < len(sent) and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
    all_published = max(published.values())
    cpu_spent = StackCpu.spent(cpu_before, cpu.snapshot())
    await nc.close()
    accept_ms = [(accepted[c] - sent[c]) * 1000 for c in sent]
    publish_ms = [(published[c] - sent[c]) * 1000 for c in sent if c in published]
    n = len(sent)
    throughput = n / (all_accepted - started)
    how = f"paced at {rate:,.0f}/s" if rate else "all at once"
    print(f"\n{n} messages from {users} users over {users} websockets, {how}")
    print(f"  accepted (committed): {throughput:,.0f} messages/s; "
          f"send->accepted p50 {pct(accept_ms, 50):.1f} ms, p99 {pct(accept_ms, 99):.1f} ms")
    print(f"  published (on the stream): {len(publish_ms) / (all_published - started):,.0f} messages/s; "
          f"send->published p50 {pct(publish_ms, 50):.1f} ms, p99 {pct(publish_ms, 99):.1f} ms"
          f" ({len(publish_ms)} of {n} seen)")
    print("  " + describe_cpu(cpu_spent, n, "message")
          + f"; {sum(cpu_spent.values()) / (all_published - started):.2f} cores busy", flush=True)
    return throughput


async def settled(stack: Stack, timeout: float = 120) -> None:
    """Wait until the relay and the projector have caught up with the event store, so one
    phase's backlog does not take the CPU from the next."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        report = await asyncio.to_thread(status, stack.settings)
        if report["relay"]["lag"] == 0 and report["projections"]["chat"]["lag"] == 0:
            break
        await asyncio.sleep(0.5)
    await asyncio.sleep(1.0)


async def run(stack: Stack, users: int, messages: int, paced: list[float] | None,
              profile: Path | None = None, idle: bool = False) -> None:
    clients = await sign_up(stack, users)
    per_user = messages // users
    try:
        burst = await phase(stack, clients, per_user, None, profile, idle)
        for rate in paced or [burst / 2]:
            await settled(stack)
            # 4 s of sending: an API session looks up a reply it has heard nothing of for 5 s
            # (with no workers, every reply), which would be measured as well after that
            await phase(stack, clients, max(1, min(per_user, int(rate * 4 / users))), rate)
    finally:
        for c in clients:
            await c.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--paced", default="500,1000",
                        help="then send again at each of these rates (messages/s, comma-separated;"
                             " 'half': half the burst's; 0: skip)")
    parser.add_argument("--api", type=int, default=1, help="API processes (users spread over them)")
    parser.add_argument("--profile", type=Path, help="write py-spy samples of the (first) API process here")
    parser.add_argument("--profile-idle", action="store_true", help="sample waiting threads too")
    args = parser.parse_args()
    if args.users < 1 or args.messages < args.users or args.api < 1:
        parser.error("--users and --api are at least 1, --messages at least --users")
    try:
        paced = None if args.paced == "half" else [r for r in map(float, args.paced.split(",")) if r > 0]
    except ValueError:
        parser.error("--paced is 'half' or rates in messages/s, comma-separated")
    with tempfile.TemporaryDirectory(prefix="chatbench") as tmp:
        settings = load_settings(Path(tmp))
        settings = dataclasses.replace(settings, messages_per_minute=1_000_000, tokens_per_day=0,
                                       auth_attempts_per_address=0)  # every simulated user logs in from here
        stack = Stack(settings, Ports.random(), workers=0, worker_groups=0, apis=args.api, log_dir=Path(tmp) / "logs")
        print(f"starting the stack (no workers, {args.api} API process{'es' if args.api > 1 else ''})…", flush=True)
        stack.start()
        try:
            asyncio.run(run(stack, args.users, args.messages, paced, args.profile, args.profile_idle))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
