"""How many websockets one API process holds, how fast it fans token deltas out to them,
and what each open socket costs it in memory.

Starts the stack on embedded servers (no inference workers), makes `--users` users and
`--sockets` conversations among them, then opens one websocket per conversation from
`--clients` client processes (one Python process cannot drive thousands of sockets on
its own). Each socket sends `resume` for its conversation, which makes the API follow it
(a NATS subscription on the conversation's token subject). Then the bench publishes
`TokenDelta` messages on those subjects, as a worker does, each carrying its publish time
(CLOCK_MONOTONIC, which every process on the machine shares), and the clients record
the time from publish to receipt of the `token` frame:

- paced: `--rate` deltas/s spread over all conversations for `--seconds`;
- burst: one delta to every conversation at once.

Prints the sockets held, the time to open them, the API process's RSS per open socket,
and the fan-out latency percentiles (and any delta not received). The file-descriptor
limit is raised to its hard limit (as `chatbot up` does); the API process inherits it.
Run: `.venv/bin/python bench/websocket_fanout.py [--sockets 10000] [--clients 4] [--rate 2000]`.
(Not `bench/websockets.py`: a script of that name would hide the `websockets` package from
every script in this directory.)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESUME_CONCURRENCY = 32  # sockets a client process opens at once
TEXT_WIDTH = 22  # "P" + 20-digit publish time (ns) + " "


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


# -- client processes ---------------------------------------------------------------------------


def client_process(url: str, sockets: list[tuple[str, str]], pipe: Connection) -> None:
    """Open a websocket per (token, conversation), resume each, then record the latency
    of every token frame until told to stop; send back {phase: [ns, ...]}."""
    from chatbot.ops.launcher import raise_fd_limit

    raise_fd_limit()
    asyncio.run(client_main(url, sockets, pipe))


async def client_main(url: str, sockets: list[tuple[str, str]], pipe: Connection) -> None:
    import json

    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    latencies: dict[str, list[int]] = defaultdict(list)
    opened: list = []
    failures: list[str] = []
    gate = asyncio.Semaphore(RESUME_CONCURRENCY)

    async def open_one(token: str, conversation_id: str) -> None:
        async with gate:
            try:
                ws = await connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                                   ping_interval=None, max_size=None, open_timeout=120)
                await ws.send(json.dumps({"type": "resume", "conversation_id": conversation_id}))
                while True:
                    frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
                    if frame["type"] == "resumed":
                        break
                    if frame["type"] == "error":
                        raise RuntimeError(frame)
            except Exception as e:  # noqa: BLE001 - counted and reported: how many the API held
                failures.append(f"{type(e).__name__}: {e}"[:200])
                return
            opened.append(ws)

    await asyncio.gather(*(open_one(t, c) for t, c in sockets))
    pipe.send(("opened", len(opened), failures[:5], len(failures)))

    async def read(ws) -> None:
        try:
            async for raw in ws:
                now = time.monotonic_ns()
                frame = json.loads(raw)
                if frame["type"] == "token":
                    for stamp in frame["text"].split():
                        latencies[stamp[0]].append(now - int(stamp[1:]))
        except Exception:  # noqa: BLE001 - the socket closed at the end
            return

    readers = [asyncio.create_task(read(ws)) for ws in opened]
    await loop.run_in_executor(None, pipe.recv)  # "stop"
    await asyncio.sleep(0)
    pipe.send(("latencies", dict(latencies)))
    for ws in opened:
        ws.transport.abort()  # thousands of closing handshakes would only add noise
    for task in readers:
        task.cancel()


# -- the bench ------------------------------------------------------------------------------------


def make_conversations(stack, users: int, sockets: int) -> list[tuple[str, str]]:
    """(token, conversation id) for each socket, users owning equal shares."""
    from api.auth import issue_token
    from chatbot.eventstore.application import chat_application

    app = chat_application(stack.settings)
    try:
        with ThreadPoolExecutor(8) as pool:  # saves that meet share commits
            owners = list(pool.map(
                lambda i: app.register_user(f"ws-{i}-{uuid.uuid4().hex[:8]}@example.com", "correct horse battery"),
                range(users),
            ))
            ids = list(pool.map(lambda i: app.start_conversation(owners[i % users]), range(sockets)))
    finally:
        app.close()
    tokens = {u: issue_token(stack.settings.secret_key, u, 3600, uuid.uuid4()) for u in owners}
    return [(tokens[owners[i % users]], str(c)) for i, c in enumerate(ids)]


async def publish(stack, conversations: list[str], rate: float, seconds: float) -> int:
    """Paced deltas (phase "P"), then one to every conversation at once (phase "B")."""
    import nats

    from chatbot.bus.messaging import TokenDelta, token_encoder, token_subject

    nc = await nats.connect(stack.settings.nats_servers)
    reply = {c: str(uuid.uuid4()) for c in conversations}
    offset = dict.fromkeys(conversations, 0)
    subject = {c: token_subject(c) for c in conversations}

    async def send(c: str, phase: str) -> None:
        text = f"{phase}{time.monotonic_ns():020d} "
        assert len(text) == TEXT_WIDTH
        await nc.publish(subject[c], token_encoder.encode(TokenDelta(reply[c], offset[c], text)))
        offset[c] += len(text)

    count = int(rate * seconds)
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        if (ahead := due - time.perf_counter()) > 0:
            await asyncio.sleep(ahead)
        await send(conversations[i % len(conversations)], "P")
    await nc.flush()
    await asyncio.sleep(2.0)  # the paced deltas arrive
    for c in conversations:
        await send(c, "B")
    await nc.flush()
    await asyncio.sleep(5.0)  # the burst arrives
    await nc.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sockets", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=4, help="client processes")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rate", type=float, default=2000.0, help="paced deltas per second, in all")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if args.sockets < 1 or args.clients < 1 or args.users < 1 or args.rate <= 0 or args.seconds <= 0:
        parser.error("--sockets, --clients, --users, --rate and --seconds are positive")

    from bench.procstat import StackCpu, cpu_seconds, rss_bytes
    from chatbot.ops.launcher import Stack, raise_fd_limit
    from chatbot.ops.servers import Ports
    from chatbot.runtime.config import load_settings

    limit = raise_fd_limit()  # the API process inherits it (`Stack.start` raises it too)
    if args.sockets + 1000 > limit:
        print(f"note: the file-descriptor limit is {limit}; {args.sockets} sockets may not all open")
    with tempfile.TemporaryDirectory(prefix="chatbench") as tmp:
        settings = dataclasses.replace(load_settings(Path(tmp)), tokens_per_day=0,
                                       auth_attempts_per_address=0)  # every simulated user logs in from here
        stack = Stack(settings, Ports.random(), workers=0, worker_groups=0, log_dir=Path(tmp) / "logs")
        print("starting the stack (no workers)…", flush=True)
        stack.start()
        try:
            api = stack.children["api-0"].proc
            assert api is not None
            api_limit = next(line for line in Path(f"/proc/{api.pid}/limits").read_text().splitlines()
                             if line.startswith("Max open files"))
            print(f"API process {api.pid}: {' '.join(api_limit.split())}")
            print(f"making {args.users} users and {args.sockets} conversations…", flush=True)
            pairs = make_conversations(stack, args.users, args.sockets)
            time.sleep(2.0)
            rss_before = rss_bytes(api.pid)
            cpu_before = cpu_seconds(api.pid)
            url = stack.api_urls[0].replace("http://", "ws://") + "/api/ws"
            ctx = mp.get_context("spawn")
            pipes, procs = [], []
            started = time.perf_counter()
            for k in range(args.clients):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=client_process, args=(url, pairs[k::args.clients], child), daemon=True)
                proc.start()
                pipes.append(parent)
                procs.append(proc)
            print(f"opening {args.sockets} websockets from {args.clients} client processes…", flush=True)
            opened, failed, samples = 0, 0, []
            for pipe in pipes:
                _, n, examples, n_failed = pipe.recv()
                opened, failed, samples = opened + n, failed + n_failed, samples + examples
            open_s = time.perf_counter() - started
            open_cpu = cpu_seconds(api.pid) - cpu_before
            time.sleep(2.0)
            rss_open = rss_bytes(api.pid)
            conversations = [c for _, c in pairs]
            cpu = StackCpu(stack)
            before = cpu.snapshot()
            paced = asyncio.run(publish(stack, conversations, args.rate, args.seconds))
            spent = StackCpu.spent(before, cpu.snapshot())
            latencies: dict[str, list[int]] = defaultdict(list)
            for pipe in pipes:
                pipe.send("stop")
            for pipe in pipes:
                _, got = pipe.recv()
                for phase, values in got.items():
                    latencies[phase] += values
            for proc in procs:
                proc.join(30)
        finally:
            stack.stop()
    per_socket = (rss_open - rss_before) / max(opened, 1)
    print(f"\n{opened} of {args.sockets} websockets open in one API process ({failed} failed) in {open_s:.1f} s"
          f" ({opened / open_s:,.0f}/s, each resumed; API CPU {open_cpu / max(opened, 1) * 1000:.2f} ms per socket)")
    for example in samples:
        print(f"  e.g. {example}")
    print(f"API process RSS: {rss_before / 2**20:,.0f} MiB before, {rss_open / 2**20:,.0f} MiB with the sockets open:"
          f" {per_socket / 1024:,.1f} KiB per socket")
    for phase, name, sent in (("P", f"paced, {args.rate:,.0f} deltas/s for {args.seconds:.0f} s", paced),
                              ("B", f"burst, one delta to each of {len(conversations)} conversations at once",
                               len(conversations))):
        ms = [v / 1e6 for v in latencies.get(phase, [])]
        print(f"fan-out {name}: publish->token frame p50 {pct(ms, 50):.1f} ms, p99 {pct(ms, 99):.1f} ms,"
              f" max {max(ms, default=float('nan')):.1f} ms; {len(ms)} of {sent} received")
    print("CPU while publishing (s): " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(spent.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
