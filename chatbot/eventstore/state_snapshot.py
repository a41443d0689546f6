"""Snapshots of any aggregate state that JSON can carry.

A snapshot stores an aggregate's whole `__dict__`, which holds things JSON has no word
for: dicts keyed by UUIDs (a conversation's replies) and tuples (the ids a client message
id maps to). `StateSnapshot.take` marks them with two small wrapper types, which the
application's transcoder writes as `{"_type_": "mapping_items"|"tuple", "_data_": [...]}`
and reads back as the original dict or tuple (the decoder works bottom-up, so what comes
out is the state exactly as it was, nothing left to unwrap). Events are untouched: this
applies to snapshots only, so the stored form of every event stays what it was.

The class was `domain.snapshot:StateSnapshot` before it moved here, and that topic is in
the `chat_snapshots` rows: it stays the class's topic (`TOPIC`), so rows written before
and after the move read the same, in this version and the one before it.
"""

from __future__ import annotations

from typing import Any

from eventsourcing.domain import Snapshot
from eventsourcing.persistence import JSONTranscoder, Transcoding
from eventsourcing.utils import register_topic

STORED_TOPIC = "domain.snapshot:StateSnapshot"  # where the class was; stored snapshots name it


class MappingItems:
    """A dict with keys that are not all strings, as its (key, value) pairs."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[Any, Any]]) -> None:
        self.pairs = pairs


class TupleItems:
    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items


class MappingItemsAsList(Transcoding):
    type = MappingItems
    name = "mapping_items"

    def encode(self, obj: MappingItems) -> list[list[Any]]:
        return [[k, v] for k, v in obj.pairs]

    def decode(self, data: list[list[Any]]) -> dict[Any, Any]:
        return {k: v for k, v in data}


class TupleAsList(Transcoding):
    type = TupleItems
    name = "tuple"

    def encode(self, obj: TupleItems) -> list[Any]:
        return obj.items

    def decode(self, data: list[Any]) -> tuple[Any, ...]:
        return tuple(data)


def register_state_transcodings(transcoder: JSONTranscoder) -> None:
    transcoder.register(MappingItemsAsList())
    transcoder.register(TupleAsList())


def json_safe(value: Any) -> Any:
    """`value` with every non-string-keyed dict and every tuple wrapped, at any depth."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: json_safe(v) for k, v in value.items()}
        return MappingItems([(json_safe(k), json_safe(v)) for k, v in value.items()])
    if isinstance(value, tuple):
        return TupleItems([json_safe(v) for v in value])
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


class StateSnapshot(Snapshot):
    """The library's snapshot, with the state made JSON-safe when it is taken."""

    TOPIC = STORED_TOPIC  # what `get_topic` gives, so new rows name it as the old ones do

    @classmethod
    def take(cls, aggregate: Any) -> StateSnapshot:
        snapshot = super().take(aggregate)
        return cls(
            originator_id=snapshot.originator_id,
            originator_version=snapshot.originator_version,
            timestamp=snapshot.timestamp,
            topic=snapshot.topic,
            state=json_safe(snapshot.state),
        )


register_topic(STORED_TOPIC, StateSnapshot)  # rows that name the old module resolve to this class
