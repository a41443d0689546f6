"""One chat message yields one connected trace across the API, relay, worker and projector
processes (chatbot/runtime/tracing.py), exported by each of them over the real OTLP/HTTP path.

No collector runs here, so the test is one: a small HTTP server in this process decodes
each `ExportTraceServiceRequest` (opentelemetry-proto) that the processes post, and every
process of a stack of its own is pointed at it with `OTEL_EXPORTER_OTLP_ENDPOINT`. That
tests what an operator turns on (the exporter, its environment, the shutdown flush), which a
file or in-memory exporter swapped in for the test would not."""

from __future__ import annotations

import dataclasses
import gzip
import re
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from chatbot.ops.launcher import Stack
from chatbot.ops.servers import Ports
from chatbot.runtime.config import load_settings
from tests.client import ChatClient, collect_reply, send
from tests.conftest import ARTIFACTS
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration

UUID_LIKE = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)
MESSAGE = "Say hello in three words."


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    events: tuple[str, ...]
    attributes: dict[str, Any] = field(hash=False, compare=False)


class Collector(ThreadingHTTPServer):
    """An OTLP/HTTP traces receiver on a free port, keeping every span it is sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), ExportHandler)
        self.spans: list[ReceivedSpan] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self) -> list[ReceivedSpan]:
        with self.lock:
            return list(self.spans)

    def keep(self, request: ExportTraceServiceRequest) -> None:
        spans = []
        for resource_spans in request.resource_spans:
            service = next((a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name"), "")
            for scope_spans in resource_spans.scope_spans:
                for s in scope_spans.spans:
                    spans.append(ReceivedSpan(
                        service=service, name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(), events=tuple(e.name for e in s.events),
                        attributes={a.key: a.value for a in s.attributes},
                    ))
        with self.lock:
            self.spans.extend(spans)


class ExportHandler(BaseHTTPRequestHandler):
    server: Collector

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces":
            self.send_error(404)
            return
        self.server.keep(ExportTraceServiceRequest.FromString(body))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def traced_stack(collector: Collector, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = dataclasses.replace(
        load_settings(tmp_path_factory.mktemp("traces")), max_reply_tokens=8, auth_attempts_per_address=0,
        model_titles=False,  # one message, one reply: no title request after it
    )
    logs = ARTIFACTS / "logs-traces"
    shutil.rmtree(logs, ignore_errors=True)
    stack = Stack(settings, Ports.random(), log_dir=logs, extra_env={
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # ms: spans reach the collector within a moment
        "CHATBOT_LOG_FORMAT": "json",
    })
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def trace_of(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.trace_id == trace_id]


def complete(spans: list[ReceivedSpan]) -> bool:
    """The reply's outcome applied by the projector: the last hop of the message's trace."""
    return sum(s.name == "projector apply" for s in spans) >= 3 and sum(s.name == "relay publish" for s in spans) >= 3


async def trace_rooted_at(collector: Collector, root: str, timeout: float = 30) -> tuple[list[ReceivedSpan], list[ReceivedSpan]]:
    """The spans named `root` received, and the trace of the first, once that trace is
    complete or `timeout` seconds have passed; exactly one such root is expected."""
    def roots_and_trace() -> tuple[list[ReceivedSpan], list[ReceivedSpan]]:
        roots = [s for s in collector.received() if s.name == root]
        return roots, trace_of(collector.received(), roots[0].trace_id) if roots else []

    roots, spans = await async_eventually(roots_and_trace, until=lambda found: complete(found[1]), timeout=timeout,
                                          interval=0.2, what=f"the complete trace of {root!r}", fail=False)
    assert len(roots) == 1, [s.name for s in collector.received()]
    return roots, spans


async def test_one_message_yields_one_connected_trace_across_the_processes(
    traced_stack: Stack, collector: Collector,
) -> None:
    client = ChatClient(traced_stack.api_urls[0])
    try:
        await client.register_and_log_in()
        conversation_id = await client.start_conversation()
        async with client.ws() as ws:
            await send(ws, conversation_id, MESSAGE)
            _, tokens, reply = await collect_reply(ws)
    finally:
        await client.close()
    assert reply["text"] and tokens

    roots, spans = await trace_rooted_at(collector, "ws send")
    names = sorted(s.name for s in spans)

    # every hop, in the process that makes it
    where = {(s.service, s.name) for s in spans}
    assert where >= {
        ("chatbot-api", "ws send"), ("chatbot-api", "command post_message"), ("chatbot-api", "event store commit"),
        ("chatbot-relay", "relay publish"),
        ("chatbot-worker", "worker reply"), ("chatbot-worker", "prompt build"), ("chatbot-worker", "triton generate"),
        ("chatbot-worker", "record reply"), ("chatbot-worker", "event store commit"),
        ("chatbot-projector", "projector apply"),
    }, names
    # the message, its reply request and the reply's outcome: each relayed and applied
    assert names.count("relay publish") == 3 and names.count("projector apply") == 3, names
    generate = next(s for s in spans if s.name == "triton generate")
    assert generate.events == ("first token", "last token")

    # one connected tree: one root, every other span's parent in the trace
    by_id = {s.span_id: s for s in spans}
    assert [s.name for s in spans if not s.parent_id] == ["ws send"]
    assert all(s.parent_id in by_id for s in spans if s.parent_id), names
    parent = {s.name: by_id[s.parent_id].name for s in spans if s.parent_id and s.name != "relay publish"
              and s.name != "projector apply" and s.name != "event store commit"}
    assert parent == {"command post_message": "ws send", "worker reply": "relay publish",
                      "prompt build": "worker reply", "triton generate": "worker reply", "record reply": "worker reply"}
    assert {by_id[s.parent_id].name for s in spans if s.name == "relay publish"} == {"command post_message", "record reply"}
    assert {by_id[s.parent_id].name for s in spans if s.name == "projector apply"} == {"relay publish"}
    assert {by_id[s.parent_id].name for s in spans if s.name == "event store commit"} == {
        "command post_message", "record reply"}

    # no user data in any span: no ids, no text
    texts = [MESSAGE] + ([reply["text"]] if len(reply["text"]) > 8 else [])
    for s in spans:
        for value in s.attributes.values():
            text = str(value)
            assert not UUID_LIKE.search(text) and not any(t in text for t in texts), (s.name, text)

    # the processes' JSON log lines carry the trace id (the worker's line about this reply)
    worker_log = (ARTIFACTS / "logs-traces" / "worker-0.log").read_text()
    assert f'"trace_id": "{roots[0].trace_id}"' in worker_log


async def test_a_request_to_the_openai_api_yields_one_connected_trace_too(
    traced_stack: Stack, collector: Collector,
) -> None:
    """POST /v1/chat/completions starts its own trace, as a websocket frame does: the
    command, the relay, the worker's Triton call and the projector's apply are in it."""
    client = ChatClient(traced_stack.api_urls[0])
    try:
        await client.register_and_log_in()
        r = await client.http.post("/api/keys", json={"name": "traces"}, headers=client.headers)
        assert r.status_code == 201, r.text
        r = await client.http.post("/v1/chat/completions", timeout=120, headers={"Authorization": f"Bearer {r.json()['key']}"},
                                   json={"model": "assistant", "max_tokens": 8,
                                         "messages": [{"role": "user", "content": MESSAGE}]})
        assert r.status_code == 200, r.text
    finally:
        await client.close()

    roots, spans = await trace_rooted_at(collector, "POST /v1/chat/completions")
    where = {(s.service, s.name) for s in spans}
    assert where >= {
        ("chatbot-api", "POST /v1/chat/completions"), ("chatbot-api", "command post_message"),
        ("chatbot-relay", "relay publish"), ("chatbot-worker", "worker reply"), ("chatbot-worker", "triton generate"),
        ("chatbot-projector", "projector apply"),
    }, sorted(where)
    by_id = {s.span_id: s for s in spans}
    assert [s.name for s in spans if not s.parent_id] == ["POST /v1/chat/completions"]
    assert all(s.parent_id in by_id for s in spans if s.parent_id)
    assert {by_id[s.parent_id].name for s in spans if s.name == "command post_message"} == {"POST /v1/chat/completions"}
