"""The application keeps saved conversations and personas in memory
(chatbot/eventstore/aggregate_cache.py): commands still see every stored event, an unsaved change never reaches the cache, and an
erased user's conversation is not served from it."""

from __future__ import annotations

from uuid import UUID

import pytest

from chatbot.eventstore.aggregate_cache import CachingRepository
from chatbot.eventstore.application import StoredChatApplication
from chatbot.eventstore.store import MemoryStoreFactory
from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.conversation_errors import ConversationNotFound
from domain.ids import persona_id_for
from tests.unit.conftest import memory_env

OUTCOME = dict(finish_reason="stop", prompt_tokens=3, completion_tokens=2, ttft_ms=1.0, duration_ms=2.0,
               model_name="chat", model_version="1")


def cached(app: ChatApplication, aggregate_id: UUID) -> object | None:
    assert isinstance(app.repository, CachingRepository)
    return app.repository.entries.get(aggregate_id)


def store_behind_the_cache(app: ChatApplication, aggregate: Conversation) -> None:
    """What another process does: store events without this process's cache knowing."""
    app.events.put(aggregate.collect_events())


def test_a_saved_conversation_is_kept_and_the_next_command_takes_it_out(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    assert isinstance(cached(app, conversation_id), Conversation)
    posted = app.post_message(conversation_id, user, "c1", "hello")
    kept = cached(app, conversation_id)
    assert isinstance(kept, Conversation) and posted.reply_id in kept.replies


def test_a_command_on_a_cached_conversation_sees_events_another_process_stored(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    posted = app.post_message(conversation_id, user, "c1", "hello")
    kept = cached(app, conversation_id)
    assert isinstance(kept, Conversation)
    elsewhere = app.repository.get(conversation_id, version=kept.version)  # from the events, not the cache
    elsewhere.complete_reply(posted.reply_id, text="hi!", **OUTCOME)
    store_behind_the_cache(app, elsewhere)
    # the cached copy still has the reply pending; a new message needs it finished
    second = app.post_message(conversation_id, user, "c2", "again")
    assert second.created
    assert [m["text"] for m in app.branch(conversation_id, user)] == ["hello", "hi!", "again", ""]


def test_a_stale_cached_conversation_cannot_overwrite_a_newer_one(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    app.post_message(conversation_id, user, "c1", "hello")
    stale = app.repository.get(conversation_id)  # checked out: the cache no longer has it
    assert cached(app, conversation_id) is None
    fresh = app.repository.get(conversation_id)  # a second command at once loads its own
    assert fresh is not stale and fresh.version == stale.version
    fresh.rename("first")
    app.save(fresh)
    stale.rename("second")
    with pytest.raises(Exception, match="(?i)integrity|conflict|version"):
        app.save(stale)
    assert app.repository.get(conversation_id).title == "first"


def test_a_change_that_was_not_saved_never_reaches_the_cache(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    unsaved = app.repository.get(conversation_id)
    unsaved.rename("never saved")
    assert app.repository.get(conversation_id).title == "New chat"


def test_personas_are_shared_as_copies_brought_up_to_date(app: ChatApplication, user: UUID) -> None:
    mine = app.create_persona(user, {"slug": "helper", "name": "Helper", "system_prompt": "Help."})
    first = app.get_persona(mine)
    first.name = "changed in memory only"  # a caller's copy: the cache keeps its own
    assert app.get_persona(mine).name == "Helper"
    elsewhere = app.repository.get(mine, version=1)
    elsewhere.edit(user, {"name": "Helper 2"})
    app.events.put(elsewhere.collect_events())  # another process edits the persona
    assert app.get_persona(mine).name == "Helper 2"
    assert app.get_persona(mine).version == 2
    assert app.get_persona(persona_id_for("assistant")).version >= 1


def test_an_erased_users_cached_conversation_is_not_served(keyed: ChatApplication) -> None:
    ada = keyed.register_user("ada@example.com", "correct horse")
    conversation_id = keyed.start_conversation(ada)
    posted = keyed.post_message(conversation_id, ada, "c1", "my secret")
    keyed.complete_reply(conversation_id, posted.reply_id, text="kept", **OUTCOME)
    assert cached(keyed, conversation_id) is not None
    keyed.erase_user(ada)
    with pytest.raises(ConversationNotFound):
        keyed.branch(conversation_id, ada)
    with pytest.raises(ConversationNotFound):
        keyed.post_message(conversation_id, ada, "c2", "more")


def test_the_cache_holds_at_most_its_size(user: UUID) -> None:
    app = StoredChatApplication(env=memory_env(), factory=MemoryStoreFactory)
    app.seed_personas()
    assert isinstance(app.repository, CachingRepository)
    app.repository.size = 5
    ids = [app.start_conversation(app.register_user(f"u{i}@example.com", "correct horse")) for i in range(8)]
    assert len(app.repository.entries) <= 5
    assert all(isinstance(app.repository.get(i), Conversation) for i in ids)  # evicted ones load


def test_a_persona_loaded_once_is_kept(app: ChatApplication, user: UUID) -> None:
    assistant = persona_id_for("assistant")
    assert isinstance(app.repository, CachingRepository)
    app.repository.forget(assistant)
    app.start_conversation(user)  # reads the persona
    assert cached(app, assistant) is not None


def test_a_persona_read_for_a_send_is_the_kept_copy_and_an_edit_elsewhere_shows_within_its_freshness(
    app: ChatApplication, user: UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    import domain.app_personas as application

    mine = app.create_persona(user, {"slug": "reader", "name": "Reader", "system_prompt": "Read."})
    monkeypatch.setattr(application, "PERSONA_FRESH_S", 60.0)
    first = app.read_persona(mine)
    assert app.read_persona(mine) is first  # no copy, no read of the store
    elsewhere = app.repository.get(mine, version=1)
    elsewhere.edit(user, {"name": "Reader 2"})
    app.events.put(elsewhere.collect_events())  # another process edits the persona
    assert app.read_persona(mine).name == "Reader"  # within its freshness: the kept copy
    monkeypatch.setattr(application, "PERSONA_FRESH_S", 0.0)
    assert app.read_persona(mine).name == "Reader 2" and app.read_persona(mine).version == 2
    # an edit made by this process shows at once
    monkeypatch.setattr(application, "PERSONA_FRESH_S", 60.0)
    app.edit_persona(mine, user, {"name": "Reader 3"})
    assert app.read_persona(mine).name == "Reader 3"
    posted = app.post_message(app.start_conversation(user, mine), user, "c1", "hi")
    assert posted.created
    with pytest.raises(application.PersonaNotFound):
        app.read_persona(UUID(int=7))
