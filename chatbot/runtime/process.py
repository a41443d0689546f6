"""What every long-running process shares: logging, and a stop event set by SIGTERM/SIGINT.

Logs are text by default; `CHATBOT_LOG_FORMAT=json` writes one JSON object a line
(python-json-logger) with the process, the logger, and the trace and span ids of the span
the line was written in, so a log line leads to its message's trace (chatbot/runtime/tracing.py).
The ids come from a small filter rather than opentelemetry-instrumentation-logging, which
would replace the process's log record factory and bring the instrumentation framework.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter


class TraceIds(logging.Filter):
    """Adds `trace_id` and `span_id` (hex, as trace viewers show them) to a record written
    inside a span; a record outside one gets neither."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


def log_handler(name: str, log_format: str = "text") -> logging.Handler:
    """A stderr handler in the chosen format ("text" or "json"), trace ids attached."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"process": name},
        ))
    elif log_format == "text":
        handler.setFormatter(logging.Formatter(f"%(asctime)s {name:>9} %(levelname)s %(message)s", datefmt="%H:%M:%S"))
    else:
        raise ValueError(f"a log format is text or json, not {log_format!r}")
    handler.addFilter(TraceIds())
    return handler


def setup_logging(name: str, log_format: str = "text") -> logging.Logger:
    logging.basicConfig(level=logging.INFO, handlers=[log_handler(name, log_format)])
    return logging.getLogger(name)


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
