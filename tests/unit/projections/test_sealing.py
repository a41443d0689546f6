"""Read-model text sealed under its owner's key, and the blind index that search reads."""

from __future__ import annotations

import os
import uuid

from chatbot.eventstore.keys import MemoryKeyStore
from projections.sealing import Sealer, query_words, words_of


def hashes(literal: str) -> set[int]:
    """The hashes of a bigint[] literal."""
    assert literal[0] == "{" and literal[-1] == "}"
    return {int(h) for h in literal[1:-1].split(",") if h}


def sealer() -> tuple[Sealer, MemoryKeyStore]:
    keys = MemoryKeyStore(os.urandom(32))
    return Sealer(keys), keys


def test_words_and_their_prefixes_are_indexed_case_folded() -> None:
    assert words_of("Lisbon, TRIP!") == {"lisbon", "lis", "lisb", "lisbo", "trip", "tri"}
    assert words_of("a to") == {"a", "to"}  # short words whole, no prefixes
    long = words_of("internationalisation")
    assert "internationalisation" in long and "internationa" in long  # 12 letters at most
    assert "internationalis" not in long
    assert query_words("  Lisbon lisbon trip?? ") == ["lisbon", "trip"]
    assert query_words("%_?!") == []


def test_text_opens_only_for_its_owner_its_column_and_its_row() -> None:
    s, _ = sealer()
    owner, other, row = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    sealed = s.seal(owner, "Plan a trip to Lisbon", "rm_messages.text", row)
    assert b"Lisbon" not in sealed
    assert s.open(owner, sealed, "rm_messages.text", row) == "Plan a trip to Lisbon"
    assert s.open(owner, memoryview(sealed), "rm_messages.text", row) == "Plan a trip to Lisbon"
    assert s.open(other, sealed, "rm_messages.text", row) is None  # another user's key
    assert s.open(owner, sealed, "rm_messages.text", uuid.uuid4()) is None  # moved to another row
    assert s.open(owner, sealed, "rm_conversations.title", row) is None  # or another column
    damaged = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert s.open(owner, damaged, "rm_messages.text", row) is None


def test_sealing_is_deterministic_per_cell_so_a_rebuild_compares_equal() -> None:
    s, _ = sealer()
    owner, row = uuid.uuid4(), uuid.uuid4()
    assert s.seal(owner, "same", "rm_messages.text", row) == s.seal(owner, "same", "rm_messages.text", row)
    assert s.seal(owner, "same", "rm_messages.text", row) != s.seal(owner, "same", "rm_messages.text", uuid.uuid4())
    assert s.seal(None, "a persona", "rm_personas.name", row) != s.seal(owner, "a persona", "rm_personas.name", row)


def test_erasing_the_owner_shreds_the_text_and_the_index() -> None:
    s, keys = sealer()
    owner, row = uuid.uuid4(), uuid.uuid4()
    sealed = s.seal(owner, "zebra marmalade", "rm_messages.text", row)
    index = hashes(s.index(owner, "zebra marmalade"))
    assert set(s.terms(owner, "zebr")) <= set(index)
    keys.rows[owner] = None  # the wrapped key destroyed, as erasure does
    keys.forget(owner)
    assert s.open(owner, sealed, "rm_messages.text", row) is None
    fresh = Sealer(MemoryKeyStore(os.urandom(32)))  # a new key: the old hashes mean nothing
    assert not set(fresh.terms(owner, "zebra")) & set(index)


def test_a_query_matches_whole_words_and_word_starts_under_the_owners_key_only() -> None:
    s, _ = sealer()
    owner, other = uuid.uuid4(), uuid.uuid4()
    index = hashes(s.index(owner, "Plan a trip to Lisbon"))
    for query in ("lisbon", "LISB", "trip lisbon", "a"):
        assert set(s.terms(owner, query)) <= index, query
    for query in ("isbon", "lisbons", "paris", "trip paris"):
        assert not set(s.terms(owner, query)) <= index, query
    assert not set(s.terms(other, "lisbon")) <= index  # another user's hashes differ
    assert s.terms(owner, "?!") == []
    assert s.index(owner, "?!") == "{}"


def test_without_a_key_store_text_is_plain_utf8() -> None:
    s = Sealer(None)
    row = uuid.uuid4()
    value = s.seal(uuid.uuid4(), "héllo", "rm_messages.text", row)
    assert value == b"\x00" + "héllo".encode()
    assert s.open(None, value, "rm_messages.text", row) == "héllo"
    assert s.open(None, None, "rm_messages.text", row) is None
