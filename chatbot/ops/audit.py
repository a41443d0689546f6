"""`chatbot audit`: a conversation's events in order, decoded, and the conversation
reconstructed exactly as it stood at any version or time, from the events alone.

Every use is itself recorded as an `Audited` event on the conversation (operator and
reason), after the version being shown, so the record of who looked never changes what
they saw.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any
from uuid import UUID

from chatbot.bus.messaging import event_name
from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.conversation_errors import ConversationNotFound
from domain.user import AccountErased

HIDDEN = {"originator_id", "originator_version", "timestamp", "originator_topic"}


def actor_of(event: Any, owner: UUID) -> str:
    name = type(event).__name__
    if name in ("ReplyCompleted",):
        return f"model:{event.model_name}/{event.model_version}"
    if name in ("ReplyFailed",):
        return "worker"
    if name == "Audited":
        return f"operator:{event.operator}"
    return f"user:{owner}"


def event_data(event: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(event).items() if k not in HIDDEN and not k.startswith("_")}


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (UUID, datetime)):
        return str(value)
    return value


def audit(
    app: ChatApplication,
    conversation_id: UUID,
    *,
    operator: str,
    reason: str,
    at_version: int | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The events up to `at_version` / `at` and the conversation as it stood then."""
    try:
        events = list(app.events.get(conversation_id))
    except AccountErased:
        return erased_report(app, conversation_id, at_version)
    if not events or not isinstance(events[0], Conversation.Started):
        raise ConversationNotFound(str(conversation_id))
    if at is not None:
        at = at if at.tzinfo else at.replace(tzinfo=timezone.utc)
        events = [e for e in events if e.timestamp <= at]
    if at_version is not None:
        events = [e for e in events if e.originator_version <= at_version]
    if not events:
        raise ConversationNotFound(f"{conversation_id} did not exist yet then")
    version = events[-1].originator_version
    app.record_audit(conversation_id, operator, reason)
    conversation: Conversation = app.repository.get(conversation_id, version=version)
    owner = conversation.owner_id
    return jsonable({
        "conversation_id": conversation_id,
        "version": version,
        "events": [
            {
                "version": e.originator_version, "time": e.timestamp.isoformat(), "type": type(e).__name__,
                "actor": actor_of(e, owner), "data": event_data(e),
            }
            for e in events
        ],
        "state": {
            "owner_id": owner, "persona_id": conversation.persona_id, "title": conversation.title,
            "messages": [
                {"id": m["id"], "role": m["role"], "text": m["text"], "status": m["status"]}
                for m in conversation.messages
            ],
        },
    })


def erased_report(app: ChatApplication, conversation_id: UUID, at_version: int | None = None) -> dict[str, Any]:
    """What is left of a conversation whose owner was erased: the events' versions and
    types, no time (it is inside the ciphertext), no content. Nothing can be recorded on
    it any more, so this look is not."""
    stored = [e for e in app.recorder.select_events(conversation_id)
              if at_version is None or e.originator_version <= at_version]
    return jsonable({
        "conversation_id": conversation_id,
        "erased": True,
        "version": stored[-1].originator_version if stored else 0,
        "events": [{"version": e.originator_version, "time": None, "type": event_name(e.topic),
                    "actor": None, "status": "erased", "data": None} for e in stored],
        "state": None,
    })


def render_text(report: dict[str, Any]) -> str:
    if report.get("erased"):
        lines = [f"conversation {report['conversation_id']}: erased (its owner's key is destroyed;"
                 " nothing can be read, and this look is not recorded)", ""]
        lines += [f"  v{e['version']:<4} {e['type']:<18} erased" for e in report["events"]]
        return "\n".join(lines)
    lines = [f"conversation {report['conversation_id']} at version {report['version']}", ""]
    for e in report["events"]:
        data = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in e["data"].items())
        lines.append(f"{e['time']}  v{e['version']:<4} {e['type']:<18} {e['actor']}  {data}")
    state = report["state"]
    lines += ["", f"as it stood: {state['title']!r} (owner {state['owner_id']})"]
    for m in state["messages"]:
        lines.append(f"  [{m['role']}{'' if m['status'] == 'complete' else ', ' + m['status']}] {m['text']}")
    return "\n".join(lines)
