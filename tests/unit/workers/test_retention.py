"""The retention sweep's choices, with fakes for the read model and the application: due
temporary chats expire, chats left empty are discarded only when a time is set, and one
conversation that fails does not stop the rest. The setting refuses a negative time."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from chatbot.runtime.config import load_settings
from workers.retention import sweep


class FakeReadModels:
    def __init__(self, due: list[UUID], empty: list[UUID]) -> None:
        self.due, self.empty = due, empty
        self.asked: list[timedelta] = []

    def due_expiries(self) -> list[UUID]:
        return self.due

    def empty_conversations(self, older_than: timedelta) -> list[UUID]:
        self.asked.append(older_than)
        return self.empty


class FakeApp:
    def __init__(self, failing: UUID) -> None:
        self.failing = failing
        self.done: list[tuple[str, UUID]] = []

    def expire_conversation(self, conversation_id: UUID) -> bool:
        if conversation_id == self.failing:
            raise RuntimeError("erased meanwhile")
        self.done.append(("expired", conversation_id))
        return True

    def discard_empty_conversation(self, conversation_id: UUID, older_than: timedelta) -> bool:
        self.done.append(("discarded", conversation_id))
        return older_than == timedelta(days=1)


def test_a_sweep_expires_and_discards_and_goes_on_past_a_failure() -> None:
    failing, due, empty = uuid4(), uuid4(), uuid4()
    readmodels, app = FakeReadModels([failing, due], [empty]), FakeApp(failing)
    assert sweep(app, readmodels, timedelta(days=1)) == 2  # type: ignore[arg-type]
    assert app.done == [("expired", due), ("discarded", empty)]
    assert readmodels.asked == [timedelta(days=1)]


def test_without_a_time_no_empty_chat_is_discarded() -> None:
    readmodels, app = FakeReadModels([], [uuid4()]), FakeApp(uuid4())
    assert sweep(app, readmodels, None) == 0  # type: ignore[arg-type]
    assert app.done == [] and readmodels.asked == []


def test_the_empty_chat_time_is_a_whole_number_of_seconds_not_below_zero(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert load_settings(tmp_path).empty_chat_ttl_s == 86_400
    monkeypatch.setenv("CHATBOT_EMPTY_CHAT_TTL_S", "0")
    assert load_settings(tmp_path).empty_chat_ttl_s == 0
    for bad, words in (("-5", "0 or more"), ("a day", "whole number")):
        monkeypatch.setenv("CHATBOT_EMPTY_CHAT_TTL_S", bad)
        with pytest.raises(ValueError, match=words):
            load_settings(tmp_path)
