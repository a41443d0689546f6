"""One trace per user message, across every process (OpenTelemetry).

The hops of a message, each a span (service `chatbot-<process>`):

    api        ws send                      the websocket frame, until `accepted` is queued
                 command post_message       the command in its thread (edit_message, regenerate)
                   event store commit       the insert, group commit's wait included
    relay      relay publish                one per traced event, until its atomic batch is stored
    worker     worker reply                 from the fetch that brought the request to its ack
                 prompt build               the conversation loaded, the prompt fitted
                 triton generate            the streamed call; events `first token`, `last token`
                 record reply               `ReplyCompleted` (or the failure) committed
    projector  projector apply              one per traced event, its batch's transaction and ack

The context crosses processes twice over. In the event's metadata: eventsourcing's stored
event has no metadata field, so the mapper (chatbot/eventstore/mapper.py) writes the current span's
W3C `traceparent` into the stored state of the events in `TRACED_EVENTS` as `_trace`,
encrypted with the rest; decoding gives it back as an attribute the aggregates never see
(the library passes a decorated method only its own parameters). The relay reads it from
there (decrypting only those events, and only while exporting) and carries its own span's
context on in the NATS headers of each message, where the worker and the projector read it.

Export: OTLP over HTTP/protobuf when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant)
is set, configured by the exporter's standard variables (`OTEL_BSP_*` for batching,
`OTEL_TRACES_SAMPLER` for sampling). Otherwise nothing is recorded or exported: spans are
not sampled, so they cost a context and give the logs a trace id, no more.

Spans are bounded and carry no user data: a fixed set of names, attributes from fixed sets
or counts; never a message's text, a user id, nor a conversation's or a message's id (ids
are user data here too: the trace id links the hops).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
TRACE_ATTRIBUTE = "_trace"  # the event's metadata: {"traceparent": ..., "tracestate": ...}
# The events of one message's path that carry its context: what the worker and the
# projector act on. Others (titles, renames, feedback) are not part of a message's trace.
TRACED_EVENTS = frozenset({
    "Conversation.UserMessagePosted", "Conversation.ReplyRequested",
    "Conversation.ReplyCompleted", "Conversation.ReplyFailed",
})
CARRIER_KEYS = ("traceparent", "tracestate")
MAX_CARRIER_CHARS = 512  # tracestate may hold 32 members; a longer carrier is not ours

# Only the W3C trace context, never baggage: baggage could carry anything across processes.
_propagator = TraceContextTextMapPropagator()
_tracer = trace.get_tracer("chatbot")
_exporting = False


def exporting() -> bool:
    """Whether this process exports spans (work done only for traces is skipped otherwise)."""
    return _exporting


def setup_tracing(process: str, environ: Mapping[str, str] = os.environ) -> TracerProvider:
    """This process's tracer provider: exporting over OTLP when an endpoint is configured,
    recording nothing otherwise. Called once, at the start of `main`."""
    global _exporting
    resource = Resource.create({"service.name": f"chatbot-{process}"})
    if not any(environ.get(name) for name in ENDPOINT_VARIABLES):
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER, else parent-based always-on
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _exporting = True
    trace.set_tracer_provider(provider)
    return provider


def shutdown() -> None:
    """Export what is still queued (bounded by the exporter's timeout)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.shutdown()


# -- spans -----------------------------------------------------------------------------------


def span(name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
         context: otel_context.Context | None = None) -> Any:
    """A span made current for the `with` block: a child of the current one, or of
    `context` (a remote parent), or a root. An exception leaving the block marks it failed."""
    return _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes)


@contextmanager
def child_span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A span only under a recording one: code shared by traced and untraced paths (a commit
    of a registration, a title) adds no root traces of its own."""
    if not trace.get_current_span().is_recording():
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def add_event(name: str, attributes: Mapping[str, Any] | None = None) -> None:
    """A point in time on the current span (`first token`); nothing outside a span."""
    trace.get_current_span().add_event(name, attributes=attributes)


def set_attributes(attributes: Mapping[str, Any]) -> None:
    trace.get_current_span().set_attributes(attributes)


# -- the context across processes -------------------------------------------------------------


def carrier(context: otel_context.Context | None = None) -> dict[str, str]:
    """The W3C trace context of the current span (or `context`) as headers; empty when that
    span is not sampled, so nothing is written for spans nobody records."""
    if not trace.get_current_span(context).get_span_context().trace_flags.sampled:
        return {}
    headers: dict[str, str] = {}
    _propagator.inject(headers, context=context)
    return headers


def extract(headers: Mapping[str, Any] | None) -> otel_context.Context | None:
    """The remote parent named by `headers` (NATS headers or an event's `_trace`), or None
    when they name none or are not a carrier of ours."""
    if not isinstance(headers, Mapping):
        return None
    picked = {k: headers[k] for k in CARRIER_KEYS if isinstance(headers.get(k), str)}
    if not picked or sum(len(v) for v in picked.values()) > MAX_CARRIER_CHARS:
        return None
    context = _propagator.extract(picked)
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def stamp(event: Any, topic_name: str) -> None:
    """Write the current span's context into a traced event's metadata (`_trace`), before
    the mapper stores it. The event has just been made by a command: mutating it here is the
    one way in, as eventsourcing's events are frozen dataclasses stored whole."""
    if topic_name not in TRACED_EVENTS or TRACE_ATTRIBUTE in vars(event):
        return
    headers = carrier()
    if headers:
        object.__setattr__(event, TRACE_ATTRIBUTE, headers)


def context_of(event: Any) -> otel_context.Context | None:
    """The context an event was recorded in (its `_trace`), or None."""
    return extract(getattr(event, TRACE_ATTRIBUTE, None))


@contextmanager
def remote_spans(name: str, kind: SpanKind, parents: Mapping[Any, otel_context.Context | None],
                 attributes: Mapping[str, Any] | None = None) -> Iterator[dict[Any, dict[str, str]]]:
    """One span per key with a remote parent (an event or a message of a batch), from now
    until the block ends, none of them current; yields each one's context as headers to
    carry on. An exception in the block marks them all failed."""
    spans = {key: _tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
             for key, parent in parents.items() if parent is not None}
    try:
        yield {key: carrier(trace.set_span_in_context(s)) for key, s in spans.items()}
    except BaseException as e:
        for s in spans.values():
            s.record_exception(e)
            s.set_status(trace.StatusCode.ERROR, type(e).__name__)
        raise
    finally:
        for s in spans.values():
            s.end()


def message_parents(headers: Iterable[Mapping[str, str] | None]) -> dict[int, otel_context.Context | None]:
    """The remote parent of each message of a batch, by its place in the batch."""
    return {i: extract(h) for i, h in enumerate(headers)}
