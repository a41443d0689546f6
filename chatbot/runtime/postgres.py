"""Bounded writes to PostgreSQL: the pipeline-mode flush, session timeouts, timeout errors.

The pipeline flush. psycopg (3.3.9, checked with libpq 18) sends a pipelined statement
from its `_pipeline_communicate` generator, which calls `PQflush()` once when the socket is
writable and stops as soon as no command is left to send, whatever `PQflush()` answered.
A statement bigger than the socket's buffer (a bound parameter of about 0.5 MB or more:
an import's events, a snapshot, a share of a long conversation) is then left half-sent in
libpq's output buffer; `Pipeline.sync()` waits for results that the server, still reading
the statement (`ClientRead`), never sends. The caller hangs for good, holding whatever it
locked: the event store's table lock, so every later write of every process waited too.
Server-side timeouts do not end it (the session is neither idle nor running a statement).
`flush_pipeline` sends the rest, reading what the server answers meanwhile so neither side
can block on a full socket, within a deadline. Everything that executes statements in
pipeline mode calls it after each statement (psycopg's issue 685 reports the same hang).

Timeouts. Every session of the event store and the read models runs with
`statement_timeout` and `idle_in_transaction_session_timeout`, and the event store's
`LOCK TABLE` with `lock_timeout`, so a slow statement, a lock held too long or a client
that stopped mid-transaction ends with an error and releases its locks instead of
stopping every writer behind it. `WriteTimeout` is what a caller then sees.
"""

from __future__ import annotations

import select
import time
from typing import Any

import psycopg

STATEMENT_TIMEOUT_S = 30.0  # the longest statement (a rebuild's page, an import's insert)
LOCK_TIMEOUT_S = 10  # waiting for the event table's lock (whole seconds: eventsourcing's unit)
IDLE_IN_TRANSACTION_S = 60.0  # a client that stopped mid-transaction loses its session
FLUSH_TIMEOUT_S = 30.0


class WriteTimeout(TimeoutError):
    """A write did not finish in time and was undone: nothing of it was saved."""


def session_options(statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> str:
    """libpq `options` that bound every statement of a session (`-c` settings)."""
    return f"-c statement_timeout={int(statement_timeout_s * 1000)}"


def bound_sessions(datastore: Any, statement_timeout_s: float = STATEMENT_TIMEOUT_S) -> None:
    """Give every connection an eventsourcing `PostgresDatastore` opens from now on a
    statement timeout (its pool opens lazily, on first use)."""
    kwargs = datastore.pool.kwargs
    options = session_options(statement_timeout_s)
    if options not in kwargs.get("options", ""):
        kwargs["options"] = f"{kwargs.get('options', '')} {options}".strip()


def flush_pipeline(conn: psycopg.Connection[Any], timeout_s: float = FLUSH_TIMEOUT_S) -> None:
    """Send whatever of the pipelined statements is still in libpq's output buffer. Reads
    the server's results into libpq's input buffer meanwhile (psycopg fetches them later),
    so a server blocked on writing to us cannot block our writing to it. Raises
    WriteTimeout when the server takes no more for `timeout_s`."""
    pgconn = conn.pgconn
    deadline = time.monotonic() + timeout_s
    while pgconn.flush() == 1:  # 1: data is left to send
        left = deadline - time.monotonic()
        if left <= 0:
            raise WriteTimeout(f"PostgreSQL took no more of a statement for {timeout_s:.0f} s")
        readable, _, _ = select.select([pgconn.socket], [pgconn.socket], [], left)
        if readable:
            pgconn.consume_input()


def is_timeout(error: BaseException) -> bool:
    """Whether a (possibly wrapped) database error is a statement or lock timeout."""
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, (WriteTimeout, psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable,
                              psycopg.errors.IdleInTransactionSessionTimeout)):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1  # type: ignore[assignment]
    return False
