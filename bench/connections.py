"""What one API process pays per websocket: memory per open socket and how fast it answers.

Starts the stack on embedded servers in a temporary directory (as the tests do), then
against one API process:
  - opens N idle websockets (logged in), N = 500, 1,000 and 2,000 in steps, and reads the
    process's resident memory before and after: memory per idle socket;
  - on every socket at once, sends a frame that fails validation and waits for its error
    frame, several rounds: frames answered per second (decode, classify, reply: the work
    every frame does before it reaches the database);
  - sends on every socket a well-formed `stop` for an unknown reply, which costs a read of
    the read models: frames per second that touch PostgreSQL.
Loopback only, bounded in count and time. Run: `.venv/bin/python bench/connections.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from websockets.asyncio.client import ClientConnection, connect  # noqa: E402

from chatbot.ops.launcher import Stack  # noqa: E402
from chatbot.ops.servers import Ports  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402
from tests.client import ChatClient  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def round_trips(sockets: list[ClientConnection], frame: str, rounds: int) -> float:
    """Frames answered per second with every socket sending one frame per round."""

    async def one(ws: ClientConnection) -> None:
        await ws.send(frame)
        answer = json.loads(await asyncio.wait_for(ws.recv(), 60))
        assert answer["type"] == "error", answer

    started = time.perf_counter()
    for _ in range(rounds):
        await asyncio.gather(*(one(ws) for ws in sockets))
    return len(sockets) * rounds / (time.perf_counter() - started)


async def measure(stack: Stack, steps: list[int]) -> None:
    client = ChatClient(stack.api_urls[0])
    await client.register_and_log_in()
    url = stack.api_urls[0].replace("http://", "ws://") + "/api/ws"
    pid = stack.children["api-0"].proc.pid  # type: ignore[union-attr]
    sockets: list[ClientConnection] = []
    await asyncio.sleep(2)
    base = rss_mib(pid)
    print(f"api process at rest: {base:.1f} MiB resident")
    print("| open sockets | resident MiB | MiB per 1,000 sockets | connects/s | invalid frames/s | stops/s (PostgreSQL read) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for target in steps:
        started, before = time.perf_counter(), len(sockets)
        while len(sockets) < target:
            batch = min(100, target - len(sockets))
            sockets += await asyncio.gather(*(
                connect(url, additional_headers=client.headers, open_timeout=60) for _ in range(batch)
            ))
        connects = (target - before) / (time.perf_counter() - started)
        await asyncio.sleep(2)
        rss = rss_mib(pid)
        invalid = await round_trips(sockets, '{"type": "send", "conversation_id": "not-a-uuid"}', rounds=3)
        stops = await round_trips(sockets, json.dumps({"type": "stop", "reply_id": str(uuid.uuid4())}), rounds=1)
        print(f"| {target:,} | {rss:.1f} | {(rss - base) / target * 1000:.1f} | {connects:,.0f} | {invalid:,.0f} | {stops:,.0f} |")
    await asyncio.gather(*(ws.close() for ws in sockets))
    await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="500,1000,2000", help="open sockets at each step")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(steps) + 1000
    assert hard >= need, f"this needs {need} open files (ulimit -Hn is {hard})"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))  # the API inherits it
    with tempfile.TemporaryDirectory() as tmp:
        settings = dataclasses.replace(load_settings(Path(tmp)), messages_per_minute=10**6,
                                       auth_attempts_per_address=0)  # every simulated user logs in from here
        stack = Stack(settings, Ports.random(), workers=1, apis=1, log_dir=Path(tmp) / "logs")
        stack.start()
        try:
            asyncio.run(measure(stack, steps))
        finally:
            stack.stop()


if __name__ == "__main__":
    main()
