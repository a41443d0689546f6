"""Per-user keys, erasure, snapshots and the chain check, on the in-memory event store
with the same mapper the PostgreSQL store uses (chatbot/eventstore/mapper.py)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import Repository
from eventsourcing.persistence import JSONTranscoder, StoredEvent, UUIDAsHex
from eventsourcing.utils import get_topic, resolve_topic

from chatbot.eventstore.application import SNAPSHOT_INTERVAL
from chatbot.eventstore.chain import GENESIS, event_hash
from chatbot.eventstore.keys import DataErased, key_owner
from chatbot.eventstore.mapper import KeyedMapper
from chatbot.eventstore.state_snapshot import (
    STORED_TOPIC,
    StateSnapshot,
    json_safe,
    register_state_transcodings,
)
from chatbot.ops.integrity import check_aggregate
from domain.application import ChatApplication
from domain.conversation_errors import ConversationNotFound
from domain.ids import persona_id_for
from domain.user import EmailAlreadyRegistered, InvalidCredentials

OUTCOME = dict(finish_reason="stop", prompt_tokens=3, completion_tokens=2, ttft_ms=1.0, duration_ms=2.0,
               model_name="chat", model_version="1")


def chat(app: ChatApplication, user: UUID, texts: list[str]) -> UUID:
    conversation_id = app.start_conversation(user)
    for i, text in enumerate(texts):
        posted = app.post_message(conversation_id, user, f"c{i}", text)
        app.complete_reply(conversation_id, posted.reply_id, text=f"reply to {text}", **OUTCOME)
    return conversation_id


def stored(app: ChatApplication, aggregate_id: UUID) -> list[StoredEvent]:
    return list(app.recorder.select_events(aggregate_id))


def test_a_users_account_and_conversations_are_encrypted_under_their_own_key(keyed: ChatApplication) -> None:
    ada = keyed.register_user("ada@example.com", "correct horse")
    bob = keyed.register_user("bob@example.com", "battery staple")
    conversation = chat(keyed, ada, ["the secret is 1234"])
    assert isinstance(keyed.mapper, KeyedMapper)
    assert {key_owner(e.state) for e in stored(keyed, ada)} == {ada}
    assert {key_owner(e.state) for e in stored(keyed, conversation)} == {ada}
    assert {key_owner(e.state) for e in stored(keyed, bob)} == {bob}
    assert {key_owner(e.state) for e in stored(keyed, persona_id_for("assistant"))} == {None}  # master key
    assert all(b"secret" not in e.state for e in stored(keyed, conversation))


def test_erasing_a_user_makes_their_data_unreadable_and_leaves_others_alone(keyed: ChatApplication) -> None:
    ada = keyed.register_user("ada@example.com", "correct horse")
    bob = keyed.register_user("bob@example.com", "battery staple")
    adas = chat(keyed, ada, ["ada's private words"])
    bobs = chat(keyed, bob, ["bob's words"])
    key = keyed.create_api_key(ada, "laptop")

    assert keyed.erase_user(ada) is True
    assert keyed.erase_user(ada) is False  # once is enough

    adas_events = [e for aggregate_id in (ada, adas) for e in stored(keyed, aggregate_id)]
    assert sum(key_owner(e.state) == ada for e in adas_events) == len(adas_events) - 1  # all but Erased
    for e in adas_events:
        if key_owner(e.state) == ada:
            with pytest.raises(DataErased):
                keyed.mapper.to_domain_event(e)
    erased = [keyed.mapper.to_domain_event(e) for e in stored(keyed, ada) if key_owner(e.state) is None]
    assert [type(e).__name__ for e in erased] == ["Erased"] and erased[0].by == "operator"
    assert vars(erased[0]).keys() == {"originator_id", "originator_version", "timestamp", "by"}

    with pytest.raises(ConversationNotFound):
        keyed.post_message(adas, ada, "again", "more words")
    with pytest.raises(InvalidCredentials, match="wrong e-mail address or password"):
        keyed.authenticate("ada@example.com", "correct horse")
    with pytest.raises(InvalidCredentials):
        keyed.user_for_api_key(key)
    with pytest.raises(InvalidCredentials):
        keyed.start_conversation(ada)  # nothing new can be recorded under the destroyed key
    with pytest.raises(EmailAlreadyRegistered):
        keyed.register_user("ada@example.com", "another password")

    assert keyed.authenticate("bob@example.com", "battery staple") == bob
    assert keyed.repository.get(bobs).messages[0]["text"] == "bob's words"


def test_a_user_deletes_their_account_only_with_their_password(keyed: ChatApplication) -> None:
    ada = keyed.register_user("ada@example.com", "correct horse")
    with pytest.raises(InvalidCredentials):
        keyed.delete_account(ada, "wrong password")
    assert keyed.authenticate("ada@example.com", "correct horse") == ada
    keyed.delete_account(ada, "correct horse")
    with pytest.raises(InvalidCredentials):
        keyed.user_email(ada)
    erased = keyed.mapper.to_domain_event(stored(keyed, ada)[-1])
    assert erased.by == "user"


def test_a_long_conversation_loads_from_its_snapshot_exactly_as_from_its_events(keyed: ChatApplication) -> None:
    ada = keyed.register_user("ada@example.com", "correct horse")
    turns = SNAPSHOT_INTERVAL // 3 + 5
    conversation_id = chat(keyed, ada, [f"message {i}" for i in range(turns)])
    assert keyed.snapshots is not None
    snapshots = list(keyed.snapshots.recorder.select_events(conversation_id))
    assert [s.originator_version for s in snapshots] == [SNAPSHOT_INTERVAL]
    assert key_owner(snapshots[0].state) == ada  # under the owner's key, like the events

    from_snapshot = keyed.repository.get(conversation_id)
    from_events = Repository(event_store=keyed.events).get(conversation_id)
    assert from_snapshot.version == from_events.version > SNAPSHOT_INTERVAL
    assert vars(from_snapshot) == vars(from_events)
    reply_id = next(iter(from_snapshot.replies))
    assert isinstance(reply_id, UUID)  # dict keys and tuples come back as they were
    assert all(isinstance(v, tuple) for v in from_snapshot.client_message_ids.values())

    keyed.erase_user(ada)
    with pytest.raises(DataErased):
        keyed.mapper.to_domain_event(snapshots[0])


def test_a_snapshot_stored_under_the_topic_of_the_module_it_moved_from_still_loads(keyed: ChatApplication) -> None:
    """`StateSnapshot` was `domain.snapshot:StateSnapshot`, and stored snapshot rows name that
    topic: they still load, and new rows name it too (so the version before reads them)."""
    assert importlib.util.find_spec("domain.snapshot") is None  # the module is gone
    assert resolve_topic(STORED_TOPIC) is StateSnapshot
    assert resolve_topic(get_topic(StateSnapshot)) is StateSnapshot
    assert resolve_topic("chatbot.eventstore.state_snapshot:StateSnapshot") is StateSnapshot
    ada = keyed.register_user("ada@example.com", "correct horse")
    conversation_id = chat(keyed, ada, [f"message {i}" for i in range(SNAPSHOT_INTERVAL // 3 + 5)])
    assert keyed.snapshots is not None
    (row,) = keyed.snapshots.recorder.select_events(conversation_id)
    assert row.topic == STORED_TOPIC == "domain.snapshot:StateSnapshot"
    old = StoredEvent(originator_id=row.originator_id, originator_version=row.originator_version,
                      topic="domain.snapshot:StateSnapshot", state=row.state)  # as the version before wrote it
    snapshot = keyed.mapper.to_domain_event(old)
    assert isinstance(snapshot, StateSnapshot) and snapshot.originator_version == SNAPSHOT_INTERVAL
    keyed.repository.forget(conversation_id)  # type: ignore[attr-defined] - load it from the row
    assert vars(keyed.repository.get(conversation_id)) == vars(Repository(event_store=keyed.events).get(conversation_id))


def test_snapshot_state_survives_json_with_uuid_keys_and_tuples() -> None:
    transcoder = JSONTranscoder()
    transcoder.register(UUIDAsHex())
    register_state_transcodings(transcoder)
    key = uuid4()
    state: dict[str, Any] = {"replies": {key: {"ids": (uuid4(), uuid4()), "nested": {1: [("a", 2)]}}},
                             "plain": {"x": [1, 2]}, "empty": {}}
    assert transcoder.decode(transcoder.encode(json_safe(state))) == state


def chained(versions: list[int], key: bytes = b"k" * 32, owner: UUID | None = None,
            originator: UUID | None = None) -> list[dict[str, Any]]:
    """Rows of one aggregate as the chained recorder writes them."""
    originator = originator or uuid4()
    rows, prev = [], GENESIS
    for v in versions:
        state = (b"\x00ukey1" + owner.bytes if owner else b"") + os.urandom(20)
        e = StoredEvent(originator_id=originator, originator_version=v, topic="domain.conversation:Conversation.X",
                        state=state)
        digest = event_hash(key, prev, e)
        rows.append({"originator_id": originator, "originator_version": v, "topic": e.topic, "state": state,
                     "chain_prev": prev, "chain_hash": digest})
        prev = digest
    return rows


def statuses(rows: list[dict[str, Any]], erased: set[UUID] | None = None) -> list[tuple[int, str]]:
    return [(f.version, f.status) for f in check_aggregate(b"k" * 32, rows, erased or set())]


def test_the_chain_check_names_altered_and_removed_events() -> None:
    rows = chained([1, 2, 3, 4, 5])
    assert statuses(rows) == [(v, "ok") for v in range(1, 6)]

    rows[1] = {**rows[1], "state": rows[1]["state"][:-1] + b"!"}  # rewritten state
    del rows[3]  # version 4 deleted
    assert statuses(rows) == [(1, "ok"), (2, "altered"), (3, "ok"), (4, "removed"), (5, "ok")]


def test_the_chain_check_sees_a_forged_hash_a_missing_first_event_and_a_splice() -> None:
    rows = chained([1, 2, 3])
    rows[2] = {**rows[2], "chain_hash": os.urandom(32)}
    assert statuses(rows)[2] == (3, "altered")
    assert statuses(chained([1, 2, 3])[1:]) == [(1, "removed"), (2, "ok"), (3, "ok")]

    spliced = chained([1, 2, 3])
    other = chained([1, 2, 3])
    spliced[1] = {**other[1], "originator_id": spliced[0]["originator_id"]}  # a row of another aggregate
    assert statuses(spliced)[1] == (2, "altered")
    one = chained([1, 2, 3])
    two = chained([1, 2, 3], originator=one[0]["originator_id"])  # the same aggregate, another history
    assert statuses([one[0], two[1], one[2]]) == [(1, "ok"), (2, "unlinked"), (3, "unlinked")]
    unsealed = chained([1, 2])
    unsealed[1] = {**unsealed[1], "chain_hash": None}
    assert statuses(unsealed) == [(1, "ok"), (2, "unsealed")]


def test_the_chain_check_reports_an_erased_users_intact_events_as_erased() -> None:
    owner = uuid4()
    rows = chained([1, 2], owner=owner)
    assert statuses(rows, {owner}) == [(1, "erased"), (2, "erased")]
    rows[0] = {**rows[0], "state": rows[0]["state"] + b"x"}
    assert statuses(rows, {owner}) == [(1, "altered"), (2, "erased")]
