"""Message trees (regenerate, edit, branches) and conversation management, in memory."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from uuid import UUID, uuid4

import pytest

from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.conversation_errors import (
    ConversationError,
    ConversationNotFound,
    InvalidTitle,
    MessageNotFound,
    ReplyStillPending,
)
from domain.conversation_rules import make_title

OUTCOME = dict(finish_reason="stop", prompt_tokens=5, completion_tokens=2,
               ttft_ms=1.0, duration_ms=2.0, model_name="chat", model_version="1")


def exchange(app: ChatApplication, cid: UUID, user: UUID, text: str, reply: str) -> tuple[UUID, UUID]:
    posted = app.post_message(cid, user, str(uuid4()), text)
    app.complete_reply(cid, posted.reply_id, text=reply, **OUTCOME)
    return posted.message_id, posted.reply_id


def texts(branch: list[dict]) -> list[str]:
    return [m["text"] for m in branch]


def test_regenerate_makes_a_sibling_reply_and_history_excludes_the_old_one(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    m1, r1 = exchange(app, cid, user, "Hello", "Hi there")
    regenerated = app.regenerate(cid, user, r1)
    assert regenerated.message_id == m1 and regenerated.reply_id != r1
    branch = app.branch(cid, user)
    assert [m["id"] for m in branch] == [m1, regenerated.reply_id]
    assert branch[1]["siblings"] == [r1, regenerated.reply_id]
    job = app.reply_job(cid, regenerated.reply_id)
    assert [t["content"] for t in job.messages[1:]] == ["Hello"]  # not the first reply
    assert job.params["seed"] != app.reply_job(cid, r1).params["seed"]


def test_regenerating_while_a_reply_is_pending_is_refused(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    posted = app.post_message(cid, user, "c1", "Hello")
    with pytest.raises(ReplyStillPending):
        app.regenerate(cid, user, posted.reply_id)


def test_edit_starts_a_branch_and_select_branch_switches_back(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    m1, r1 = exchange(app, cid, user, "First question", "First answer")
    m2, r2 = exchange(app, cid, user, "Second question", "Second answer")
    edited = app.edit_message(cid, user, m2, "edit-1", "Second question, rephrased")
    app.complete_reply(cid, edited.reply_id, text="Another answer", **OUTCOME)

    assert texts(app.branch(cid, user)) == [
        "First question", "First answer", "Second question, rephrased", "Another answer"]
    history = app.reply_job(cid, edited.reply_id).messages[1:]
    assert [t["content"] for t in history] == ["First question", "First answer", "Second question, rephrased"]
    assert app.branch(cid, user)[2]["siblings"] == [m2, edited.message_id]

    leaf = app.select_branch(cid, user, m2)  # back to the original branch, down to its leaf
    assert leaf == r2
    assert texts(app.branch(cid, user)) == ["First question", "First answer", "Second question", "Second answer"]
    # the next message continues the selected branch
    m3, _ = exchange(app, cid, user, "Third", "Third answer")
    assert app.branch(cid, user)[-2]["id"] == m3
    assert [t["content"] for t in app.reply_job(cid, app.branch(cid, user)[-1]["id"]).messages[1:]] == [
        "First question", "First answer", "Second question", "Second answer", "Third"]


def test_edit_is_idempotent_per_client_message_id_and_only_for_user_messages(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    m1, r1 = exchange(app, cid, user, "Hello", "Hi")
    first = app.edit_message(cid, user, m1, "e1", "Hello again")
    again = app.edit_message(cid, user, m1, "e1", "Hello again")
    assert (again.message_id, again.reply_id, again.created) == (first.message_id, first.reply_id, False)
    app.complete_reply(cid, first.reply_id, text="Hey", **OUTCOME)
    with pytest.raises(ConversationError, match="only a user message"):
        app.edit_message(cid, user, r1, "e2", "text")
    with pytest.raises(MessageNotFound):
        app.edit_message(cid, user, uuid4(), "e3", "text")
    # editing the very first message makes a second root
    assert app.branch(cid, user)[0]["siblings"] == [m1, first.message_id]


def test_the_title_comes_after_the_first_reply_and_a_rename_sticks(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    posted = app.post_message(cid, user, "c1", "how do **tides** work on the moon and on earth too?\nmore")
    conversation: Conversation = app.repository.get(cid)
    assert conversation.title == "New chat"
    app.complete_reply(cid, posted.reply_id, text="Gravity.", **OUTCOME)
    assert app.repository.get(cid).title == "How do tides work on the moon and…"
    app.update_conversation(cid, user, title="  Tides  ")
    assert app.repository.get(cid).title == "Tides"
    with pytest.raises(InvalidTitle):
        app.update_conversation(cid, user, title="   ")
    with pytest.raises(InvalidTitle):
        app.update_conversation(cid, user, title="x" * 81)


def test_the_model_title_replaces_the_rules_once_and_never_the_users(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    posted = app.post_message(cid, user, "c1", "What do penguins eat in winter?")
    assert app.reply_job(cid, posted.reply_id).untitled is True
    assert app.write_title(cid, "Too early", "chat/1") is False  # nothing to replace before the first reply
    app.complete_reply(cid, posted.reply_id, text="Fish and krill.", **OUTCOME)
    assert app.repository.get(cid).title == "What do penguins eat in winter?"
    assert app.write_title(cid, "Penguin winter diet", "chat/1") is True
    conversation: Conversation = app.repository.get(cid)
    assert (conversation.title, conversation.title_model) == ("Penguin winter diet", "chat/1")
    assert app.write_title(cid, "Another title", "chat/1") is False  # a request delivered twice
    again = app.post_message(cid, user, "c2", "And in summer?")
    assert app.reply_job(cid, again.reply_id).untitled is False  # only the first reply asks for one

    renamed = app.start_conversation(user)
    posted = app.post_message(renamed, user, "r1", "Plan a trip to Lisbon")
    app.complete_reply(renamed, posted.reply_id, text="Sure.", **OUTCOME)
    app.update_conversation(renamed, user, title="Lisbon in May")
    assert app.write_title(renamed, "Trip to Lisbon", "chat/1") is False
    assert app.repository.get(renamed).title == "Lisbon in May"
    with pytest.raises(InvalidTitle):
        app.write_title(cid, "x" * 81, "chat/1")


def test_make_title_handles_short_and_odd_messages() -> None:
    assert make_title("hi!") == "Hi!"
    assert make_title("\n\n# Plan for Monday.\nrest") == "Plan for Monday"
    assert make_title("...") == "New chat"


def test_archive_and_delete(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    exchange(app, cid, user, "Hello", "Hi")
    app.update_conversation(cid, user, archived=True)
    assert app.repository.get(cid).archived
    app.delete_conversation(cid, user)
    with pytest.raises(ConversationNotFound):
        app.branch(cid, user)
    with pytest.raises(ConversationNotFound):
        app.post_message(cid, user, "c2", "still there?")
    with pytest.raises(ConversationNotFound):
        app.conversation_owner(cid)
    types = [n.topic.rsplit(".", 1)[-1] for n in app.recorder.select_events(cid)]
    assert types[-2:] == ["ArchiveSet", "Deleted"]


def test_pin_and_unpin_record_only_changes(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    assert app.repository.get(cid).pinned is False  # a class default: older chats read unpinned
    app.update_conversation(cid, user, pinned=True)
    app.update_conversation(cid, user, pinned=True)  # already pinned: nothing recorded
    assert app.repository.get(cid).pinned is True
    app.update_conversation(cid, user, pinned=False)
    assert app.repository.get(cid).pinned is False
    types = [n.topic.rsplit(".", 1)[-1] for n in app.recorder.select_events(cid)]
    assert types.count("PinSet") == 2
    other = app.register_user("mallory@example.com", "correct horse")
    with pytest.raises(ConversationNotFound):
        app.update_conversation(cid, other, pinned=True)


def test_a_chat_left_empty_for_a_day_is_discarded_and_a_kept_one_is_not(app: ChatApplication, user: UUID) -> None:
    day = timedelta(days=1)
    later = datetime.now(timezone.utc) + day + timedelta(minutes=1)
    empty, young, spoken, renamed, archived, pinned = (app.start_conversation(user) for _ in range(6))
    exchange(app, spoken, user, "Hello", "Hi")
    app.update_conversation(renamed, user, title="For later")
    app.update_conversation(archived, user, archived=True)
    app.update_conversation(pinned, user, pinned=True)
    assert not app.discard_empty_conversation(young, day)  # started a moment ago
    for kept in (spoken, renamed, archived, pinned):
        assert not app.discard_empty_conversation(kept, day, now=later), kept
    assert app.discard_empty_conversation(empty, day, now=later)
    assert not app.discard_empty_conversation(empty, day, now=later)  # gone already: nothing more
    with pytest.raises(ConversationNotFound):
        app.post_message(empty, user, "c1", "still there?")
    types = [n.topic.rsplit(".", 1)[-1] for n in app.recorder.select_events(empty)]
    assert types == ["Started", "Discarded"]
    assert app.conversation_owner(spoken) == user  # the rest are untouched


def test_someone_else_cannot_branch_or_rename(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    m1, r1 = exchange(app, cid, user, "Hello", "Hi")
    other = app.register_user("eve@example.com", "correct horse")
    with pytest.raises(ConversationNotFound):
        app.regenerate(cid, other, r1)
    with pytest.raises(ConversationNotFound):
        app.update_conversation(cid, other, title="mine now")
    with pytest.raises(ConversationNotFound):
        app.select_branch(cid, other, m1)


def test_a_temporary_conversation_expires_only_when_due(app: ChatApplication, user: UUID) -> None:
    from datetime import datetime, timedelta, timezone

    from domain.conversation_errors import InvalidRetention

    cid = app.start_conversation(user, keep_for=timedelta(hours=1))
    exchange(app, cid, user, "Hello", "Hi")
    expires_at = app.repository.get(cid).expires_at
    assert timedelta(minutes=59) < expires_at - datetime.now(timezone.utc) <= timedelta(hours=1)
    assert not app.expire_conversation(cid)  # not due yet
    assert app.branch(cid, user)
    assert app.expire_conversation(cid, now=expires_at)
    assert not app.expire_conversation(cid, now=expires_at)  # once
    with pytest.raises(ConversationNotFound):
        app.branch(cid, user)
    with pytest.raises(InvalidRetention):
        app.start_conversation(user, keep_for=timedelta(seconds=5))
    kept = app.start_conversation(user, keep_for=timedelta(days=1))
    app.update_conversation(kept, user, keep_for=None)  # keep it for good after all
    assert app.repository.get(kept).expires_at is None
    assert not app.expire_conversation(kept, now=datetime.now(timezone.utc) + timedelta(days=2))
