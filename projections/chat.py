"""`ChatProjection`: turns conversation and persona events into the read-model rows."""

from __future__ import annotations

from functools import singledispatchmethod
from typing import Any

from eventsourcing.persistence import Tracking
from eventsourcing.projection import Projection

from domain.conversation import Conversation
from domain.persona import Persona
from domain.user import User
from projections.readmodels import ReadModelRecorder


class ChatProjection(Projection[ReadModelRecorder]):
    name = "chat"

    @singledispatchmethod
    def process_event(self, domain_event: Any, tracking: Tracking) -> None:
        self.view.skip(tracking)  # events no read model needs still move the position

    @process_event.register
    def _(self, e: Persona.Created, tracking: Tracking) -> None:
        self.view.upsert_persona(tracking, {
            "id": e.originator_id, "slug": e.slug, "name": e.name, "description": e.description,
            "greeting": e.greeting, "model": e.model, "version": e.originator_version,
            "updated_at": e.timestamp, "owner_id": getattr(e, "owner_id", None),
            "visibility": getattr(e, "visibility", "public"), "avatar": getattr(e, "avatar", ""),
        })

    @process_event.register
    def _(self, e: Persona.Edited, tracking: Tracking) -> None:
        self.view.update_persona(tracking, e.originator_id, e.originator_version, e.timestamp, e.changes)

    @process_event.register
    def _(self, e: Persona.Retired, tracking: Tracking) -> None:
        self.view.update_persona(tracking, e.originator_id, e.originator_version, e.timestamp, {"retired": True})

    @process_event.register
    def _(self, e: Conversation.Started, tracking: Tracking) -> None:
        self.view.insert_conversation(tracking, {
            "id": e.originator_id, "owner_id": e.owner_id, "persona_id": e.persona_id,
            "title": e.title, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.UserMessagePosted, tracking: Tracking) -> None:
        self.view.add_message(tracking, {
            "id": e.message_id, "conversation_id": e.originator_id, "role": "user",
            "text": e.text, "status": "complete", "reply_to": None, "parent_id": e.parent_id, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.TurnsImported, tracking: Tracking) -> None:
        # a chain, each turn the parent of the next (turns only go into a new conversation)
        parents = [None] + [t["id"] for t in e.turns[:-1]]
        nodes = [{**t, "parent_id": parent} for t, parent in zip(e.turns, parents)]
        current = nodes[-1]["id"] if nodes else None
        self.view.import_tree(tracking, e.originator_id, nodes, current, None, e.timestamp)

    @process_event.register
    def _(self, e: Conversation.ReplyRequested, tracking: Tracking) -> None:
        self.view.add_message(tracking, {
            "id": e.reply_id, "conversation_id": e.originator_id, "role": "assistant",
            "text": "", "status": "pending", "reply_to": e.message_id, "parent_id": e.message_id,
            "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.BranchSelected, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"current_leaf": e.leaf_id})

    @process_event.register
    def _(self, e: Conversation.Titled, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"title": e.title})

    @process_event.register
    def _(self, e: Conversation.Renamed, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"title": e.title})

    @process_event.register
    def _(self, e: Conversation.ArchiveSet, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"archived": e.archived})

    @process_event.register
    def _(self, e: Conversation.PinSet, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"pinned": e.pinned})

    @process_event.register
    def _(self, e: Conversation.TreeImported, tracking: Tracking) -> None:
        self.view.import_tree(tracking, e.originator_id, e.nodes, e.current, e.title, e.timestamp)

    @process_event.register
    def _(self, e: Conversation.Shared, tracking: Tracking) -> None:
        self.view.add_share(tracking, {
            "id": e.share_id, "conversation_id": e.originator_id, "title": e.title,
            "messages": e.messages, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: Conversation.ShareRevoked, tracking: Tracking) -> None:
        self.view.revoke_share(tracking, e.share_id)

    @process_event.register
    def _(self, e: Conversation.RetentionSet, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"expires_at": e.expires_at})

    @process_event.register
    def _(self, e: Conversation.ListedApart, tracking: Tracking) -> None:
        self.view.update_conversation(tracking, e.originator_id, {"via_api": True})

    @process_event.register
    def _(self, e: Conversation.Discarded, tracking: Tracking) -> None:
        self.view.delete_conversation(tracking, e.originator_id)

    @process_event.register
    def _(self, e: Conversation.Expired, tracking: Tracking) -> None:
        self.view.delete_conversation(tracking, e.originator_id)

    @process_event.register
    def _(self, e: Conversation.Deleted, tracking: Tracking) -> None:
        self.view.delete_conversation(tracking, e.originator_id)

    @process_event.register
    def _(self, e: Conversation.ReplyCompleted, tracking: Tracking) -> None:
        self.view.finish_reply(tracking, {
            "id": e.reply_id, "conversation_id": e.originator_id, "text": e.text,
            "status": "complete", "finish_reason": e.finish_reason,
            "model": f"{e.model_name}/{e.model_version}", "at": e.timestamp,
            "tokens": e.prompt_tokens + e.completion_tokens,
        })

    @process_event.register
    def _(self, e: Conversation.FeedbackGiven, tracking: Tracking) -> None:
        self.view.rate_reply(tracking, e.originator_id, e.reply_id, e.rating, e.comment)

    @process_event.register
    def _(self, e: Conversation.FeedbackCleared, tracking: Tracking) -> None:
        self.view.rate_reply(tracking, e.originator_id, e.reply_id, None, "")

    @process_event.register
    def _(self, e: Conversation.ReplyFailed, tracking: Tracking) -> None:
        self.view.finish_reply(tracking, {
            "id": e.reply_id, "conversation_id": e.originator_id, "text": "",
            "status": "failed", "finish_reason": "error", "model": None, "at": e.timestamp,
        })

    @process_event.register
    def _(self, e: User.Erased, tracking: Tracking) -> None:
        self.view.erase_user(tracking, e.originator_id)
