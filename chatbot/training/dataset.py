"""`chatbot dataset export`: the replies people consented to share, as chat training records.

Design notes
- Exact, from the events: the export reads the application's notification log (the total
  order of every event ever stored) and the conversations' own events, never the read
  models, which may lag or be rebuilt.
- Consent is opt-in and per message. Pass 1 walks the log in order, following each user's
  `TrainingConsentChanged` events, and notes for every conversation the versions at which
  its owner's consent changed, so each event is known to have been written with consent
  or without it. A user whose consent is withdrawn at the head of the log contributes
  nothing at all. Pass 2 loads each remaining conversation, replaces the text of every
  event written without consent (messages, replies, imported turns, feedback) with a
  marker, and replays the events into the aggregate: a record whose turns contain the
  marker is left out. This keeps working whatever shape the conversation takes (a tree of
  branches since regenerate and edit): only `Conversation.history_for` decides which
  turns precede a reply.
- One record per completed reply (each regenerated sibling is its own record): the
  system prompt of the persona version pinned in the request (`{{user_name}}` becomes
  "user": names are not exported), the turns before the reply, the reply, and its latest
  feedback. E-mail addresses and phone numbers are replaced by `[email]` and `[phone]`.
  Replies the user stopped (finish_reason "cancelled") and empty ones are left out, as are
  deleted conversations. No user id is written; the conversation id groups records so a
  held-out split can keep whole conversations apart.
- Filters: `since` (inclusive) and `until` (exclusive) on the time the reply was written,
  the latest rating, and the persona's slug.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from uuid import UUID

from eventsourcing.utils import get_topic
from tqdm import tqdm

from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.persona import Persona, system_prompt
from domain.user import AccountErased, User

BATCH = 1000
WITHHELD = "\x00withheld\x00"  # stands in for text written without consent; never exported
EXPORTED_USER_NAME = "user"
RATINGS = ("up", "down")

CONSENT_TOPIC = get_topic(User.TrainingConsentChanged)
ERASED_TOPIC = get_topic(User) + ".Erased"  # an erased account consents to nothing
STARTED_TOPIC = get_topic(Conversation.Started)
COMPLETED_TOPIC = get_topic(Conversation.ReplyCompleted)
CONVERSATION_TOPIC_PREFIX = get_topic(Conversation) + "."

EMAIL_RE = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
# Digit groups with optional single separators, an optional +country code and (area) code;
# a match is a phone number if it holds 7 to 15 digits (E.164 allows 15) and is not a date.
DATE = r"\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}"
PHONE_RE = re.compile(
    rf"(?<![\w@+\-./])(?!(?:{DATE})(?!\d))"  # not inside a word, a number or an address; not a date
    r"(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-/]?\d{1,4}){1,6}(?![\w@])"
)
DATE_RE = re.compile(DATE)


class ExportError(Exception):
    pass


def _phone(match: re.Match[str]) -> str:
    text = match.group(0)
    digits = sum(c.isdigit() for c in text)
    if not 7 <= digits <= 15 or DATE_RE.fullmatch(text):
        return text
    return "[phone]"


def scrub(text: str) -> str:
    """Replace e-mail addresses and phone numbers."""
    return PHONE_RE.sub(_phone, EMAIL_RE.sub("[email]", text))


def parse_when(value: str) -> datetime:
    """An ISO 8601 date or date-time; UTC when it names no zone."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ExportError(f"not a date or date-time (ISO 8601, e.g. 2026-11-24 or 2026-11-24T10:00): {value!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class ExportFilter:
    since: datetime | None = None  # inclusive
    until: datetime | None = None  # exclusive
    rating: str | None = None  # "up" | "down"
    persona: str | None = None  # slug

    def __post_init__(self) -> None:
        if self.rating is not None and self.rating not in RATINGS:
            raise ExportError(f"rating is one of {', '.join(RATINGS)}, got {self.rating!r}")
        if self.since and self.until and self.since >= self.until:
            raise ExportError("--since must be before --until")


@dataclass
class ExportReport:
    events: int = 0
    head: int = 0
    conversations: int = 0  # loaded in pass 2 (owner consents now)
    replies: int = 0  # completed replies seen in them
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    first: str | None = None  # earliest and latest reply time exported
    last: str | None = None
    ratings: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


@dataclass
class _Seen:
    """What pass 1 learns about one conversation."""

    owner: UUID
    consent: list[tuple[int, bool]]  # (version, consent in force from that version on)
    last_version: int = 0
    replies: int = 0


def _withheld(event: Any) -> Any:
    """The event with its user-written content replaced by the WITHHELD marker."""
    changes: dict[str, Any] = {
        name: WITHHELD for name in ("text", "comment", "rating", "instructions")
        if isinstance(getattr(event, name, None), str)
    }
    turns = getattr(event, "turns", None)
    if isinstance(turns, list):
        changes["turns"] = [
            {**t, **{k: WITHHELD for k in ("text", "content") if k in t}} if isinstance(t, dict) else t for t in turns
        ]
    nodes = getattr(event, "nodes", None)  # a conversation imported whole (TreeImported)
    if isinstance(nodes, list):
        changes["nodes"] = [{**n, "text": WITHHELD} if isinstance(n, dict) and "text" in n else n for n in nodes]
    return dataclasses.replace(event, **changes) if changes else event


def _consented(consent: list[tuple[int, bool]], version: int) -> bool:
    answer = False
    for since_version, given in consent:
        if since_version > version:
            break
        answer = given
    return answer


def scan(app: ChatApplication, report: ExportReport, progress: bool) -> tuple[dict[UUID, _Seen], dict[UUID, bool]]:
    """Pass 1: each conversation's owner and consent history, in the log's order."""
    head = app.recorder.max_notification_id() or 0
    report.head = head
    consent: dict[UUID, bool] = {}
    seen: dict[UUID, _Seen] = {}
    position = 0
    bar = tqdm(total=head, desc="scanning events", unit="event", file=sys.stderr, disable=not progress,
               mininterval=0.5)
    while position < head:
        notifications = app.recorder.select_notifications(
            position, min(BATCH, head - position), stop=head, inclusive_of_start=False
        )
        if not notifications:
            break
        for n in notifications:
            if n.topic == CONSENT_TOPIC:
                try:
                    consent[n.originator_id] = bool(app.mapper.to_domain_event(n).training)
                except AccountErased:  # its key is destroyed: the user was erased
                    consent[n.originator_id] = False
            elif n.topic == ERASED_TOPIC:
                consent[n.originator_id] = False
            elif n.topic == STARTED_TOPIC:
                try:
                    owner = app.mapper.to_domain_event(n).owner_id
                except AccountErased:
                    continue  # an erased user's conversation: nothing of it can be read
                seen[n.originator_id] = _Seen(owner, [(n.originator_version, consent.get(owner, False))])
            elif n.topic.startswith(CONVERSATION_TOPIC_PREFIX) and n.originator_id in seen:
                conv = seen[n.originator_id]
                given = consent.get(conv.owner, False)
                if conv.consent[-1][1] != given:
                    conv.consent.append((n.originator_version, given))
                conv.last_version = max(conv.last_version, n.originator_version)
                conv.replies += n.topic == COMPLETED_TOPIC
        report.events += len(notifications)
        position = notifications[-1].id
        bar.update(len(notifications))
    bar.close()
    return seen, consent


def export_records(
    app: ChatApplication, filters: ExportFilter = ExportFilter(), report: ExportReport | None = None,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """Every exportable record, conversation by conversation (in the order they began)."""
    report = report if report is not None else ExportReport()
    seen, consent = scan(app, report, progress)
    wanted = [
        (cid, conv) for cid, conv in seen.items()
        if consent.get(conv.owner, False) and conv.replies and any(given for _, given in conv.consent)
    ]
    personas: dict[tuple[UUID, int], Persona] = {}
    for cid, conv in tqdm(wanted, desc="conversations", unit="conv", file=sys.stderr, disable=not progress,
                          mininterval=0.5):
        report.conversations += 1
        conversation: Any = None
        written: dict[UUID, datetime] = {}
        try:
            for e in app.events.get(cid, lte=conv.last_version):
                if not _consented(conv.consent, e.originator_version):
                    e = _withheld(e)
                if isinstance(e, Conversation.ReplyCompleted):
                    written[e.reply_id] = e.timestamp
                conversation = e.mutate(conversation)
        except AccountErased:  # erased while the export ran
            report.skip("erased user")
            continue
        if conversation is None:
            continue
        if getattr(conversation, "deleted", False):
            report.skip("deleted conversation")
            continue
        for reply_id, request in conversation.replies.items():
            if request["status"] != "complete":
                continue
            report.replies += 1
            record = _record(app, conversation, reply_id, request, written.get(reply_id), personas, filters, report)
            if record is not None:
                report.records += 1
                report.first = min(report.first or record["created_at"], record["created_at"])
                report.last = max(report.last or record["created_at"], record["created_at"])
                rating = (record["feedback"] or {}).get("rating", "none")
                report.ratings[rating] = report.ratings.get(rating, 0) + 1
                yield record


def _record(
    app: ChatApplication, conversation: Conversation, reply_id: UUID, request: dict[str, Any],
    written: datetime | None, personas: dict[tuple[UUID, int], Persona], filters: ExportFilter,
    report: ExportReport,
) -> dict[str, Any] | None:
    text = request.get("text", "")
    if request.get("finish_reason") == "cancelled" or not text.strip():
        report.skip("stopped or empty reply")
        return None
    if written is None or (filters.since and written < filters.since) or (filters.until and written >= filters.until):
        report.skip("outside the dates")
        return None
    key = (request["persona_id"], int(request["persona_version"]))
    if key not in personas:
        personas[key] = app.repository.get(key[0], version=key[1])
    persona = personas[key]
    if filters.persona and persona.slug != filters.persona:
        report.skip("other persona")
        return None
    feedback = request.get("feedback")
    if feedback and WITHHELD in (feedback.get("rating", "") + feedback.get("comment", "")):
        feedback = None  # rated while consent was withdrawn: as if not rated
    if filters.rating and (feedback or {}).get("rating") != filters.rating:
        report.skip("other rating")
        return None
    system = system_prompt(persona.system_prompt, EXPORTED_USER_NAME, conversation.instructions)
    messages = [{"role": "system", "content": system}, *conversation.history_for(reply_id)]
    messages.append({"role": "assistant", "content": text})
    if any(WITHHELD in m["content"] for m in messages):
        report.skip("written without consent")
        return None
    return {
        "id": str(reply_id),
        "conversation": str(conversation.id),
        "created_at": written.isoformat(),
        "persona": {"slug": persona.slug, "version": persona.version},
        "model": f"{request.get('model_name', '')}/{request.get('model_version', '')}",
        "finish_reason": request.get("finish_reason"),
        "messages": [{"role": m["role"], "content": scrub(m["content"])} for m in messages],
        "feedback": {"rating": feedback["rating"], "comment": scrub(feedback.get("comment", ""))} if feedback else None,
    }


def export_dataset(
    app: ChatApplication, out: Path, filters: ExportFilter = ExportFilter(), progress: bool = True
) -> ExportReport:
    """Write the records to `out` as JSON lines (atomically: a reader never sees half a file)."""
    report = ExportReport()
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        with partial.open("w", encoding="utf-8") as f:
            for record in export_records(app, filters, report, progress):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return report


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of an exported file, checked; ExportError names the first bad line."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ExportError(f"cannot read {path}: {e.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}:{number}: not JSON: {e.msg}") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if (
            not isinstance(messages, list) or len(messages) < 2
            or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                       and m.get("role") in ("system", "user", "assistant") for m in messages)
            or messages[-1]["role"] != "assistant"
        ):
            raise ExportError(f"{path}:{number}: a record has messages (role, content) ending with the assistant's reply")
        records.append(record)
    return records
