"""`chatbot audit --verify`: recompute the hash chain of the stored events and name every
event that was altered or removed behind the application's back.

Each row carries `chain_prev` and `chain_hash` = HMAC(chain key, chain_prev | the row's
stored bytes) (chatbot/eventstore/chain.py). Per aggregate, in version order, a row is
- `altered` when its hash does not match its bytes (someone rewrote the state, topic,
  version or either hash: without the key no matching hash can be made),
- `removed` (for each missing version) when versions jump: its successor still verifies
  on its own, because it carries the hash it was chained to,
- `unlinked` when it verifies but does not follow the row before it (rows spliced in from
  elsewhere),
- `unsealed` when it has no hash (written before the chain existed, or the hash erased),
- `erased` when it is intact but its user's key was destroyed (crypto-shredded: there is
  nothing left to read, which is not a fault), else `ok`.
Snapshots are checked against their MAC (`snapshot altered`). The checks read stored
bytes only: nothing is decrypted, so verifying reveals no content and is not recorded.
A per-aggregate chain cannot see the removal of an aggregate's newest events, or of a
whole aggregate: that leaves no gap. The JetStream stream can: the relay publishes every
stored event there, with its aggregate and version in the headers, and the stream lives
outside PostgreSQL (on the NATS nodes' disks). `stream_heads` reads those headers (no
payloads) and `verify` names every version the stream has and the table lacks as `removed`.
Events not yet relayed are newer in the table than on the stream, which is no fault.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any
from uuid import UUID

from eventsourcing.persistence import StoredEvent
from psycopg.sql import SQL, Identifier

from chatbot.bus.messaging import (
    EVENT_SUBJECT_PREFIX,
    H_ORIGINATOR,
    H_VERSION,
    event_name,
    partition_of,
)
from chatbot.eventstore.chain import (
    GENESIS,
    ChainedApplicationRecorder,
    event_hash,
    snapshot_mac,
)
from chatbot.eventstore.keys import key_owner
from chatbot.runtime.config import Settings
from domain.application import ChatApplication

PROBLEMS = ("altered", "removed", "unlinked", "unsealed", "snapshot altered")
FETCH = 2000


@dataclass(frozen=True)
class Finding:
    originator_id: UUID
    version: int
    status: str
    type: str = ""  # the event's type; unknown for a removed one

    def as_dict(self) -> dict[str, Any]:
        return {"originator_id": str(self.originator_id), "version": self.version,
                "status": self.status, "type": self.type}


@dataclass
class Verification:
    events: int = 0
    aggregates: int = 0
    snapshots: int = 0
    erased: int = 0  # intact events of erased users
    findings: list[Finding] = field(default_factory=list)  # every event, or the notable ones
    stream: str = "not compared"  # how the newest versions compared with the JetStream stream

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.status in PROBLEMS]

    def as_dict(self) -> dict[str, Any]:
        return {"events": self.events, "aggregates": self.aggregates, "snapshots": self.snapshots,
                "erased": self.erased, "problems": len(self.problems), "stream": self.stream,
                "findings": [f.as_dict() for f in self.findings]}


def check_aggregate(key: bytes, rows: Iterable[dict[str, Any]], erased_users: set[UUID]) -> Iterator[Finding]:
    """The status of every event of one aggregate (rows in version order), and of every
    version missing between them."""
    expected = 1
    link: bytes | None = GENESIS  # what the next row's chain_prev must be; None: unknown
    for row in rows:
        originator_id, version = row["originator_id"], row["originator_version"]
        for missing in range(expected, version):
            yield Finding(originator_id, missing, "removed")
        gap = version > expected
        state = bytes(row["state"])
        prev = bytes(row["chain_prev"]) if row["chain_prev"] is not None else None
        stored = bytes(row["chain_hash"]) if row["chain_hash"] is not None else None
        event = StoredEvent(originator_id=originator_id, originator_version=version, topic=row["topic"], state=state)
        if prev is None or stored is None:
            status = "unsealed"
        elif not hmac.compare_digest(event_hash(key, prev, event), stored):
            status = "altered"
        elif (version == 1 and prev != GENESIS) or (not gap and link is not None and prev != link):
            status = "unlinked"
        else:
            status = "erased" if key_owner(state) in erased_users else "ok"
        yield Finding(originator_id, version, status, event_name(row["topic"] or ""))
        link = stored if status in ("ok", "erased", "unlinked") else None
        expected = version + 1


def _rows(recorder: ChainedApplicationRecorder, originator_ids: list[UUID] | None) -> Iterator[dict[str, Any]]:
    table = SQL("{}.{}").format(Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))
    query = SQL("SELECT originator_id, originator_version, topic, state, chain_prev, chain_hash FROM {}").format(table)
    params: tuple[Any, ...] = ()
    if originator_ids is not None:
        query += SQL(" WHERE originator_id = ANY(%s)")
        params = (originator_ids,)
    query += SQL(" ORDER BY originator_id, originator_version")
    with recorder.datastore.get_connection() as conn, conn.transaction():
        with conn.cursor(name="verify_chain") as curs:  # server side: --all streams
            curs.itersize = FETCH
            curs.execute(query, params)
            yield from curs


def _snapshots(app: ChatApplication, originator_ids: list[UUID] | None) -> Iterator[Finding]:
    if app.snapshots is None:
        return
    recorder = app.snapshots.recorder
    key = app.recorder.chain_key  # type: ignore[attr-defined]
    query = SQL("SELECT originator_id, originator_version, topic, state, mac FROM {}.{}").format(
        Identifier(recorder.datastore.schema), Identifier(recorder.events_table_name))  # type: ignore[attr-defined]
    params: tuple[Any, ...] = ()
    if originator_ids is not None:
        query += SQL(" WHERE originator_id = ANY(%s)")
        params = (originator_ids,)
    with recorder.datastore.get_connection() as conn, conn.cursor() as curs:  # type: ignore[attr-defined]
        curs.execute(query, params)
        for row in curs.fetchall():
            e = StoredEvent(originator_id=row["originator_id"], originator_version=row["originator_version"],
                            topic=row["topic"], state=bytes(row["state"]))
            ok = row["mac"] is not None and hmac.compare_digest(bytes(row["mac"]), snapshot_mac(key, e))
            yield Finding(e.originator_id, e.originator_version, "snapshot" if ok else "snapshot altered", "Snapshot")


async def stream_heads(settings: Settings, originator_ids: list[UUID] | None = None,
                       timeout: float = 5.0) -> dict[UUID, int]:
    """The newest version of each aggregate (of `originator_ids`; None: all) that the
    JetStream stream holds, read from message headers only, through an ephemeral consumer
    of the partitions concerned."""
    import nats
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    wanted = None if originator_ids is None else set(originator_ids)
    if wanted is None:
        subjects = [f"{EVENT_SUBJECT_PREFIX}.>"]
    else:
        subjects = sorted({f"{EVENT_SUBJECT_PREFIX}.{partition_of(i, settings.partitions)}.>" for i in wanted})
    nc = await nats.connect(settings.nats_servers, connect_timeout=timeout, allow_reconnect=False)
    heads: dict[UUID, int] = {}
    try:
        js = nc.jetstream(timeout=timeout)
        for subject in subjects:
            sub = await js.pull_subscribe(subject, stream=settings.stream_name, config=ConsumerConfig(
                headers_only=True, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                inactive_threshold=60.0,
            ))
            try:
                while True:
                    try:
                        messages = await sub.fetch(FETCH, timeout=timeout)
                    except (NatsTimeout, TimeoutError):
                        break  # nothing (more) on these subjects
                    for m in messages:
                        headers = m.headers or {}
                        originator = UUID(headers[H_ORIGINATOR])
                        if wanted is None or originator in wanted:
                            heads[originator] = max(heads.get(originator, 0), int(headers[H_VERSION]))
                    if not messages or messages[-1].metadata.num_pending == 0:
                        break
            finally:
                await sub.unsubscribe()
    finally:
        await nc.close()
    return heads


def verify(
    app: ChatApplication, originator_ids: list[UUID] | None = None, *, every: bool = False,
    stream: dict[UUID, int] | str | None = None,
) -> Verification:
    """Check the events of `originator_ids` (None: every aggregate). With `every`, the
    report lists each event; otherwise only the problems and erased aggregates' events.
    `stream`: `stream_heads`' answer to compare the newest versions with, or why there is
    none (a string, shown in the report)."""
    recorder = app.recorder
    if not isinstance(recorder, ChainedApplicationRecorder):
        raise TypeError("the hash chain lives in the PostgreSQL event store (chatbot.eventstore.chain)")
    with recorder.datastore.get_connection() as conn:
        erased_users = {r["user_id"] for r in conn.execute("SELECT user_id FROM user_keys WHERE wrapped_key IS NULL")}
    report = Verification()
    table_heads: dict[UUID, int] = {}
    for originator_id, rows in groupby(_rows(recorder, originator_ids), key=lambda r: r["originator_id"]):
        report.aggregates += 1
        for finding in check_aggregate(recorder.chain_key, rows, erased_users):
            report.events += finding.status != "removed"
            report.erased += finding.status == "erased"
            table_heads[originator_id] = finding.version
            if every or finding.status in PROBLEMS:
                report.findings.append(finding)
    if isinstance(stream, dict):
        lost = 0
        for originator_id, head in sorted(stream.items()):
            have = table_heads.get(originator_id, 0)
            if have == 0:
                report.aggregates += 1  # gone from the table altogether
            for version in range(have + 1, head + 1):
                report.findings.append(Finding(originator_id, version, "removed"))
                lost += 1
        report.stream = (f"compared with the stream's {len(stream)} aggregates: "
                         + (f"{lost} newest events missing from the table" if lost else "nothing missing"))
    elif isinstance(stream, str):
        report.stream = stream
    for finding in _snapshots(app, originator_ids):
        report.snapshots += 1
        if every or finding.status in PROBLEMS:
            report.findings.append(finding)
    return report


def render_verification(report: Verification, scope: str) -> str:
    lines = [f"{f.status:<16} {f.originator_id}  v{f.version:<5} {f.type}" for f in report.findings]
    problems = report.problems
    counts = {s: sum(f.status == s for f in problems) for s in PROBLEMS}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no problems: the chain is intact"
    if lines:
        lines.append("")
    lines.append(
        f"{scope}: verified {report.events} events of {report.aggregates} aggregates"
        f" and {report.snapshots} snapshots: {summary}"
        + (f"; {report.erased} events of erased users (intact, unreadable)" if report.erased else "")
        + f"; newest events {report.stream}"
    )
    return "\n".join(lines)
