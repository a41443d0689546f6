"""`ChatApplication` is one eventsourcing application composed of one module per area
(domain/application.py): the same name, the same store, every command defined once, and the
aggregates' events still recorded under the topics stored events carry. It is plain
eventsourcing; the event store's subclass keeps its name and snapshots conversations."""

from __future__ import annotations

from pathlib import Path

from eventsourcing.application import Application
from eventsourcing.utils import get_topic

import domain
from chatbot.eventstore.application import SNAPSHOT_INTERVAL, StoredChatApplication
from domain.app_accounts import AccountCommands
from domain.app_base import ChatApplicationBase
from domain.app_conversations import ConversationCommands
from domain.app_personas import PersonaCommands
from domain.app_replies import ReplyCommands
from domain.app_sharing import SharingCommands
from domain.app_training import TrainingCommands
from domain.application import ChatApplication
from domain.conversation import Conversation

AREAS = (AccountCommands, PersonaCommands, ConversationCommands, ReplyCommands, SharingCommands, TrainingCommands)


def test_it_is_one_application_named_chat_that_snapshots_conversations() -> None:
    assert ChatApplication.name == "chat"
    assert StoredChatApplication.name == "chat"  # the tables' and the environment's name
    assert StoredChatApplication.snapshotting_intervals == {Conversation: SNAPSHOT_INTERVAL}
    assert all(issubclass(area, ChatApplicationBase) for area in AREAS)
    assert issubclass(ChatApplication, Application) and set(AREAS) <= set(ChatApplication.__mro__)
    app = ChatApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"})
    assert app.env.name == "chat"


def test_no_command_is_defined_in_two_areas() -> None:
    """So the order the areas are mixed in never decides which one runs."""
    seen: dict[str, str] = {}
    for area in (*AREAS, ChatApplicationBase):
        for name in vars(area):
            if name.startswith("__") or name in ("_abc_impl", "name"):  # `name`: the library sets it
                continue
            assert name not in seen, f"{name} is in {seen.get(name)} and {area.__name__}"
            seen[name] = area.__name__


def test_each_module_of_the_application_is_well_under_500_lines() -> None:
    folder = Path(domain.__file__).parent
    modules = [folder / "application.py", *folder.glob("app_*.py")]
    assert len(modules) == 8
    for path in modules:
        assert len(path.read_text().splitlines()) < 400, path.name


def test_conversation_events_keep_their_topics() -> None:
    assert get_topic(Conversation) == "domain.conversation:Conversation"
    assert get_topic(Conversation.Started) == "domain.conversation:Conversation.Started"
    assert get_topic(Conversation.ReplyRequested) == "domain.conversation:Conversation.ReplyRequested"
    assert get_topic(Conversation.TreeImported) == "domain.conversation:Conversation.TreeImported"
