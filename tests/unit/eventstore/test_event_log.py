"""The event log the relay and the projector read (chatbot/eventstore/log.py): the newest
notification id, the notifications after a position, and events decoded as the application
decodes them, whether over the application's store or built on its own."""

from __future__ import annotations

from chatbot.eventstore.application import StoredChatApplication, store_event_log
from chatbot.eventstore.store import MemoryStoreFactory
from domain.persona import Persona
from tests.unit.conftest import memory_env


def test_the_log_over_the_applications_store_reads_what_it_stored(keyed: StoredChatApplication) -> None:
    events = keyed.event_log()
    head = events.head()
    assert head > 0  # the seeded personas
    user = keyed.register_user("ada@example.com", "correct horse")
    conversation = keyed.start_conversation(user)
    keyed.post_message(conversation, user, "c1", "hello")
    newer = events.read(head, 100)
    assert [n.id for n in newer] == list(range(head + 1, events.head() + 1))
    assert len(events.read(head, 2)) == 2  # at most `limit`
    decoded = [events.decode(n) for n in newer]
    assert [e.originator_id for e in decoded] == [n.originator_id for n in newer]
    assert any(getattr(e, "text", None) == "hello" for e in decoded)  # decrypted under the user's key
    events.close()  # the application's store stays open: it is the application's to close
    assert keyed.branch(conversation, user)


def test_a_log_of_its_own_decodes_as_the_application_does() -> None:
    env = memory_env(COMPRESSOR_TOPIC="eventsourcing.compressor:ZlibCompressor")
    app = StoredChatApplication(env=env, factory=MemoryStoreFactory)
    app.seed_personas()
    events = store_event_log(env, factory=MemoryStoreFactory)
    assert set(events.mapper.transcoder.names) == set(app.mapper.transcoder.names)  # type: ignore[attr-defined]
    stored = app.event_log().read(0, 100)
    assert stored and events.head() == 0  # a store of its own (in memory: empty)
    for notification in stored:  # personas are under the master key, which both share
        mine, theirs = events.decode(notification), app.mapper.to_domain_event(notification)
        assert type(mine) is type(theirs) and vars(mine) == vars(theirs)
    assert any(isinstance(e, Persona.Created) for e in map(events.decode, stored))
    events.close()
