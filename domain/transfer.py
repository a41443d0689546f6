"""Moving conversations in and out: this system's JSON export (every branch), Markdown
(the active branch, for reading), and the import of ChatGPT's `conversations.json` and of
this system's own exports ("Export all", or one conversation's JSON).

Pure functions over plain data (and `ImportRecord`, the aggregate that remembers what was
imported): the application loads and saves, these only convert. A ChatGPT export is a
list of conversations, each a `mapping` of nodes (`message`, `parent`, `children`) with a
`current_node`; ours lists `messages` with their `parent_id`. Only user and assistant text
survives the import: system, tool, empty and unfinished nodes are dropped and their
children attached to the nearest kept ancestor, so the tree keeps its shape.

Each imported conversation has a `source`: the id its export gave it (`chatgpt:<id>`, or
`chatbot:<id>` for ours), or for a ChatGPT conversation without one a hash of its messages.
A source already imported into the same account, whose conversation still exists, is
skipped as a duplicate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4, uuid5

from eventsourcing.domain import Aggregate, event

from domain.conversation_errors import ConversationError
from domain.conversation_rules import MAX_TITLE
from domain.ids import NAMESPACE

EXPORT_FORMAT = "chatbot.conversation.v1"
EXPORT_ALL_FORMAT = "chatbot.export.v1"
MAX_IMPORT_CONVERSATIONS = 1000


class NotAnExport(ConversationError):
    """A file that is not a ChatGPT export (its message names what is wrong)."""


@dataclass
class ImportedConversation:
    title: str
    nodes: list[dict[str, Any]]  # {"id", "parent_id", "role", "text"}, parents first
    current: UUID | None
    source: str = ""  # what the export called it: the same source is not imported twice
    persona_id: UUID | None = None  # ours: the persona it was with


class ImportRecord(Aggregate):
    """That a user imported a conversation from `source`, and as which conversation. Its id
    is derived from the user and the source, so a second import of it finds it with one
    read (and two imports at once conflict on it). Stored under the user's key, like their
    conversations: erasing the user shreds which exports they brought in."""

    @staticmethod
    def create_id(owner_id: UUID, source: str, **_: object) -> UUID:
        return import_record_id(owner_id, source)

    @event("Recorded")
    def __init__(self, owner_id: UUID, source: str, conversation_id: UUID) -> None:
        self.owner_id = owner_id
        self.conversation_id = conversation_id

    @event("Repeated")
    def repeat(self, conversation_id: UUID) -> None:
        """Imported again, after the conversation of the earlier import was deleted."""
        self.conversation_id = conversation_id


def import_record_id(owner_id: UUID, source: str) -> UUID:
    return uuid5(NAMESPACE, f"import:{owner_id}:{source}")


def export_conversation(conversation: Any, persona: dict[str, Any], timestamps: dict[UUID, datetime]) -> dict[str, Any]:
    """The whole tree of a `Conversation` aggregate, with what each reply was written by."""
    messages = []
    for node in conversation.messages:
        item: dict[str, Any] = {
            "id": str(node["id"]), "parent_id": str(node["parent_id"]) if node["parent_id"] else None,
            "role": node["role"], "text": node["text"], "status": node["status"],
            "created_at": timestamps[node["id"]].isoformat() if node["id"] in timestamps else None,
        }
        reply = conversation.replies.get(node["id"])
        if reply is not None:
            item["persona_version"] = reply["persona_version"]
            if "model_name" in reply:
                item["model"] = f"{reply['model_name']}/{reply['model_version']}"
                item["finish_reason"] = reply.get("finish_reason")
            if "feedback" in reply:
                item["feedback"] = reply["feedback"]
        messages.append(item)
    return {
        "format": EXPORT_FORMAT,
        "id": str(conversation.id),
        "title": conversation.title,
        "archived": conversation.archived,
        "created_at": conversation.created_on.isoformat(),
        "persona": {"id": str(persona["id"]), "slug": persona["slug"], "name": persona["name"]},
        "current_message_id": str(conversation.current) if conversation.current else None,
        "messages": messages,
    }


def active_branch(export: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {m["id"]: m for m in export["messages"]}
    path, node = [], export["current_message_id"]
    while node is not None:
        path.append(by_id[node])
        node = by_id[node]["parent_id"]
    return path[::-1]


def to_markdown(export: dict[str, Any]) -> str:
    """The active branch as a Markdown document; other branches are counted, not shown."""
    children: dict[str | None, int] = {}
    for m in export["messages"]:
        children[m["parent_id"]] = children.get(m["parent_id"], 0) + 1
    persona = export["persona"]["name"]
    lines = [f"# {export['title']}", "", f"*With {persona}, started {export['created_at'][:10]}.*", ""]
    for m in active_branch(export):
        if m["role"] == "assistant" and m["status"] != "complete":
            continue
        who = "You" if m["role"] == "user" else persona
        alternatives = children.get(m["parent_id"], 1) - 1
        note = f" *({alternatives} other version{'s' if alternatives > 1 else ''})*" if alternatives else ""
        lines += [f"**{who}:**{note}", "", m["text"], ""]
    return "\n".join(lines)


def parse_export(data: Any) -> tuple[list[tuple[int, ImportedConversation]], list[dict[str, Any]]]:
    """ChatGPT's `conversations.json`, or one of our exports -> ((index, conversation) to
    import, skipped ones with the reason). Raises NotAnExport when the file as a whole is
    neither."""
    parse = _parse_one
    if isinstance(data, dict) and data.get("format") == EXPORT_ALL_FORMAT:
        data, parse = data.get("conversations"), _parse_ours
        if not isinstance(data, list):
            raise NotAnExport("an export of all conversations lists them under `conversations`")
    elif isinstance(data, dict) and data.get("format") == EXPORT_FORMAT:
        data, parse = [data], _parse_ours
    elif isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise NotAnExport("an export is a JSON list of ChatGPT conversations, or this app's export")
    if len(data) > MAX_IMPORT_CONVERSATIONS:
        raise NotAnExport(f"at most {MAX_IMPORT_CONVERSATIONS} conversations at once, got {len(data)}")
    imported, skipped = [], []
    for index, item in enumerate(data):
        try:
            imported.append((index, parse(item)))
        except NotAnExport as e:
            skipped.append({"index": index, "reason": str(e)})
    return imported, skipped


def _parse_ours(item: Any) -> ImportedConversation:
    """A conversation of our export: every branch; replies that did not finish are left out."""
    if not isinstance(item, dict) or item.get("format") != EXPORT_FORMAT or not isinstance(item.get("messages"), list):
        raise NotAnExport(f"not a conversation of this app's export: it has no `format` {EXPORT_FORMAT!r} and `messages`")
    ids: dict[str, UUID] = {}  # exported id -> ours, for the messages kept
    parent_of: dict[str, str | None] = {}
    nodes = []
    for m in item["messages"]:
        if not isinstance(m, dict) or not isinstance(m.get("id"), str) or m["id"] in parent_of:
            raise NotAnExport("a message has no id, or one that comes twice")
        parent = m.get("parent_id") if isinstance(m.get("parent_id"), str) else None
        if parent is not None and parent not in parent_of:
            raise NotAnExport(f"message {m['id']}: its parent must come before it")
        parent_of[m["id"]] = parent
        text = m.get("text").strip() if isinstance(m.get("text"), str) else ""
        if m.get("role") not in ("user", "assistant") or not text or m.get("status", "complete") != "complete":
            continue
        ids[m["id"]] = uuid4()
        nodes.append({"id": ids[m["id"]], "parent_id": _kept_ancestor(parent, ids, parent_of), "role": m["role"],
                      "text": text})
    if not nodes:
        raise NotAnExport("no user or assistant messages with text")
    current = item.get("current_message_id")
    current = _kept_ancestor(current if isinstance(current, str) and current in parent_of else None, ids, parent_of)
    title = item.get("title") if isinstance(item.get("title"), str) else ""
    persona = item.get("persona") if isinstance(item.get("persona"), dict) else {}
    try:
        persona_id = UUID(str(persona.get("id")))
    except ValueError:
        persona_id = None
    return ImportedConversation(
        title=" ".join(title.split())[:MAX_TITLE] or "Imported chat", nodes=nodes, current=current,
        source=f"chatbot:{item.get('id')}" if isinstance(item.get("id"), str) else _content_source(item), persona_id=persona_id,
    )


def _kept_ancestor(key: str | None, ids: dict[str, UUID], parent_of: dict[str, str | None]) -> UUID | None:
    """Our id of `key`, or of its nearest ancestor that was kept (None: none was)."""
    while key is not None and key not in ids:
        key = parent_of.get(key)
    return ids[key] if key is not None else None


def _content_source(item: dict[str, Any]) -> str:
    """A source for a conversation whose export gives it no id: a hash of its content."""
    canonical = json.dumps(item, sort_keys=True, ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _text(message: dict[str, Any]) -> str:
    content = message.get("content") or {}
    if not isinstance(content, dict):
        return ""
    parts = content.get("parts")
    if isinstance(parts, list):
        return "\n".join(p for p in parts if isinstance(p, str)).strip()
    text = content.get("text")
    return text.strip() if isinstance(text, str) else ""


def _parse_one(item: Any) -> ImportedConversation:
    if not isinstance(item, dict) or not isinstance(item.get("mapping"), dict):
        raise NotAnExport("not a conversation: it has no `mapping` of messages")
    mapping: dict[str, Any] = item["mapping"]
    title = item.get("title") if isinstance(item.get("title"), str) else ""
    title = " ".join(title.split())[:MAX_TITLE] or "Imported chat"
    ids = {key: uuid4() for key in mapping}  # fresh ids: the same file may be imported twice

    kept: dict[str, dict[str, Any]] = {}  # foreign id -> our node
    order: list[dict[str, Any]] = []

    def visit(key: str, parent: UUID | None) -> None:
        """Depth first, with an explicit stack (a long chat is a deep tree): every
        parent comes before its children, siblings in the order given."""
        stack = [(key, parent)]
        while stack:
            key, parent = stack.pop()
            node = mapping.get(key)
            if not isinstance(node, dict) or key in seen:
                continue
            seen.add(key)
            message = node.get("message") if isinstance(node.get("message"), dict) else {}
            author = message.get("author") if isinstance(message.get("author"), dict) else {}
            role, text = author.get("role"), _text(message)
            here = parent
            if role in ("user", "assistant") and text:
                ours = {"id": ids[key], "parent_id": parent, "role": role, "text": text}
                kept[key] = ours
                order.append(ours)
                here = ours["id"]
            children = node.get("children") if isinstance(node.get("children"), list) else []
            for child in reversed([c for c in children if isinstance(c, str)]):
                stack.append((child, here))

    seen: set[str] = set()
    roots = [k for k, n in mapping.items() if isinstance(n, dict) and _parent(n) not in mapping]
    for root in roots:
        visit(root, None)
    if not order:
        raise NotAnExport("no user or assistant messages with text")
    # the current node, or its nearest kept ancestor
    current_key = item.get("current_node")
    current = None
    walked: set[str] = set()  # a file may link nodes in a circle
    while isinstance(current_key, str) and current is None and current_key in mapping and current_key not in walked:
        walked.add(current_key)
        if current_key in kept:
            current = kept[current_key]["id"]
        node = mapping[current_key]
        current_key = _parent(node) if isinstance(node, dict) else None
    source_id = item.get("conversation_id") or item.get("id")
    source = f"chatgpt:{source_id}" if isinstance(source_id, str) and source_id else _content_source(item)
    return ImportedConversation(title=title, nodes=order, current=current, source=source)


def _parent(node: dict[str, Any]) -> str | None:
    parent = node.get("parent")
    return parent if isinstance(parent, str) else None
