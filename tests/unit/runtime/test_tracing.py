"""The trace context across processes (chatbot/runtime/tracing.py): through NATS headers, through an
event's metadata as the relay reads it, and into the log lines written inside a span."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from uuid import uuid4

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind

from chatbot.runtime import tracing
from chatbot.runtime.config import load_settings
from chatbot.runtime.process import log_handler
from domain.application import ChatApplication
from workers import relay

EXPORTER = InMemorySpanExporter()


@pytest.fixture(autouse=True)
def spans() -> InMemorySpanExporter:
    """A recording tracer provider for this process (the global one can be set only once)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    if not getattr(provider, "_test_exporter", False):
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        provider._test_exporter = True  # type: ignore[attr-defined]
    EXPORTER.clear()
    return EXPORTER


def ids(context: object) -> tuple[int, int]:
    span_context = trace.get_current_span(context).get_span_context()  # type: ignore[arg-type]
    return span_context.trace_id, span_context.span_id


def test_a_span_crosses_nats_headers_as_the_parent_of_the_next_process() -> None:
    with tracing.span("ws send", SpanKind.SERVER) as sent:
        headers = tracing.carrier()
    assert set(headers) == {"traceparent"}
    parent = tracing.extract({"Nats-Msg-Id": "x:1", **headers})
    assert ids(parent) == (sent.get_span_context().trace_id, sent.get_span_context().span_id)
    with tracing.span("worker reply", SpanKind.CONSUMER, context=parent) as received:
        pass
    assert received.parent is not None and received.parent.span_id == sent.get_span_context().span_id
    assert received.get_span_context().trace_id == sent.get_span_context().trace_id


@pytest.mark.parametrize("headers", [
    None, "traceparent", {}, {"Chat-Topic": "x"}, {"traceparent": "00-not-a-trace-01"},
    {"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"},  # the invalid all-zero ids
    {"traceparent": 7}, {"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "tracestate": "k=" + "v" * 600},
])
def test_headers_that_name_no_valid_parent_give_none(headers: object) -> None:
    assert tracing.extract(headers) is None  # type: ignore[arg-type]


def test_a_span_nobody_records_writes_no_carrier() -> None:
    unsampled = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test").start_span("ws send")
    assert unsampled.get_span_context().is_valid  # it still has ids, for the logs
    with trace.use_span(unsampled, end_on_exit=True):
        assert tracing.carrier() == {}
    assert tracing.carrier() == {}  # nor outside any span


def test_a_commands_events_carry_its_trace_in_their_metadata(keyed: ChatApplication) -> None:
    user = keyed.register_user("ada@example.com", "correct horse battery")
    conversation = keyed.start_conversation(user)
    with tracing.span("command post_message") as command:
        keyed.post_message(conversation, user, "c1", "hello")
    stored = keyed.recorder.select_events(conversation)
    events = {type(e).__qualname__: e for e in map(keyed.mapper.to_domain_event, stored)}
    for name in ("Conversation.UserMessagePosted", "Conversation.ReplyRequested"):
        assert ids(tracing.context_of(events[name])) == (command.get_span_context().trace_id,
                                                         command.get_span_context().span_id), name
    assert tracing.context_of(events["Conversation.Started"]) is None  # not on a message's path
    # the aggregate never sees the metadata, and loads as before
    assert [m["text"] for m in keyed.branch(conversation, user) if m["role"] == "user"] == ["hello"]


def test_events_saved_outside_a_span_carry_no_trace(keyed: ChatApplication) -> None:
    user = keyed.register_user("bob@example.com", "correct horse battery")
    conversation = keyed.start_conversation(user)
    keyed.post_message(conversation, user, "c1", "hello")
    events = map(keyed.mapper.to_domain_event, keyed.recorder.select_events(conversation))
    assert all(tracing.TRACE_ATTRIBUTE not in vars(e) for e in events)


def test_the_relay_publishes_each_traced_event_in_a_span_of_the_commands_trace(
    keyed: ChatApplication, monkeypatch: pytest.MonkeyPatch,
) -> None:
    user = keyed.register_user("cy@example.com", "correct horse battery")
    conversation = keyed.start_conversation(user)
    with tracing.span("command post_message") as command:
        keyed.post_message(conversation, user, "c1", "hello")
    notifications = keyed.recorder.select_notifications(1, 1000)
    assert relay.traced_events(keyed.event_log(), notifications) == {}  # nothing read while not exporting
    monkeypatch.setattr(relay, "exporting", lambda: True)
    parents = relay.traced_events(keyed.event_log(), notifications)
    assert len(parents) == 2  # the message and its reply request, nothing else decrypted
    with tracing.remote_spans("relay publish", SpanKind.PRODUCER, parents) as headers:
        assert set(headers) == set(parents)
    published = [s for s in EXPORTER.get_finished_spans() if s.name == "relay publish"]
    assert len(published) == 2
    for s in published:
        assert s.parent is not None and s.parent.span_id == command.get_span_context().span_id
        assert s.get_span_context().trace_id == command.get_span_context().trace_id
    # each message's headers name its own publish span: the consumers' parent
    assert {ids(tracing.extract(h)) for h in headers.values()} == {
        (s.get_span_context().trace_id, s.get_span_context().span_id) for s in published}


def test_remote_spans_are_made_only_for_keys_with_a_parent_and_fail_together() -> None:
    with tracing.span("relay publish") as parent:
        context = tracing.extract(tracing.carrier())
    with pytest.raises(TimeoutError):
        with tracing.remote_spans("projector apply", SpanKind.CONSUMER, {0: context, 1: None, 2: context}) as headers:
            assert set(headers) == {0, 2}
            raise TimeoutError
    applied = [s for s in EXPORTER.get_finished_spans() if s.name == "projector apply"]
    assert len(applied) == 2
    assert all(s.parent.span_id == parent.get_span_context().span_id for s in applied)  # type: ignore[union-attr]
    assert all(s.status.status_code == trace.StatusCode.ERROR for s in applied)


def test_a_child_span_is_made_only_under_a_recording_span() -> None:
    with tracing.child_span("event store commit") as alone:
        assert alone is None
    with tracing.span("record reply"), tracing.child_span("event store commit", {"chat.events": 1}) as child:
        assert child is not None
    assert [s.name for s in EXPORTER.get_finished_spans()] == ["event store commit", "record reply"]


def test_json_log_lines_carry_the_trace_and_span_ids_of_their_span() -> None:
    out = io.StringIO()
    handler = log_handler("worker", "json")
    handler.stream = out
    logger = logging.getLogger(f"test.{uuid4()}")
    logger.addHandler(handler)
    logger.propagate = False
    with tracing.span("worker reply") as current:
        logger.warning("reply %s: %d tokens", "r", 3)
    logger.warning("outside")
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["message"] == "reply r: 3 tokens" and inside["level"] == "WARNING" and inside["process"] == "worker"
    assert inside["trace_id"] == format(current.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(current.get_span_context().span_id, "016x")
    assert "trace_id" not in outside and outside["logger"] == logger.name


def test_an_unknown_log_format_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("CHATBOT_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="CHATBOT_LOG_FORMAT must be one of text, json"):
        load_settings(tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="text or json"):
        log_handler("api", "xml")


@pytest.mark.parametrize("endpoint, recorded", [("", "False False"), ("http://127.0.0.1:9", "True True")])
def test_spans_are_recorded_and_exported_only_when_an_endpoint_is_set(endpoint: str, recorded: str) -> None:
    """In a process of its own: a process sets its tracer provider once."""
    script = ("from chatbot.runtime import tracing; tracing.setup_tracing('api', {'OTEL_EXPORTER_OTLP_ENDPOINT': %r})\n"
              "with tracing.span('ws send') as s: print(tracing.exporting(), s.is_recording())\n" % endpoint)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == recorded
