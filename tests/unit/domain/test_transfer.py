"""Export (JSON with branches, Markdown), ChatGPT import and share links, in memory."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest

import domain.app_sharing as application_module
import domain.conversation as conversation_module
from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.conversation_errors import ConversationNotFound, ShareNotFound
from domain.transfer import NotAnExport, active_branch, parse_export, to_markdown
from tests.fakes import chatgpt_export, node

OUTCOME = dict(finish_reason="stop", prompt_tokens=5, completion_tokens=2,
               ttft_ms=1.0, duration_ms=2.0, model_name="chat", model_version="1")


def test_parse_export_keeps_branches_and_drops_what_is_not_chat() -> None:
    parsed, skipped = parse_export(chatgpt_export())
    assert [s["index"] for s in skipped] == [1, 2]
    assert "mapping" in skipped[0]["reason"] and "no user or assistant" in skipped[1]["reason"]
    index, tides = parsed[0]
    assert index == 0 and tides.title == "Tides"
    texts = [n["text"] for n in tides.nodes]
    assert texts == ["What is a tide?", "The rise and fall of the sea.", "What causes tides?",
                     "Mostly the Moon's gravity.", "And this picture?"]
    by_text = {n["text"]: n for n in tides.nodes}
    assert by_text["What is a tide?"]["parent_id"] is None and by_text["What causes tides?"]["parent_id"] is None
    # the tool message is dropped and its child attached to the nearest kept ancestor
    assert by_text["Mostly the Moon's gravity."]["parent_id"] == by_text["What causes tides?"]["id"]
    assert tides.current == by_text["And this picture?"]["id"]


@pytest.mark.parametrize("bad", ["text", 42, None, [1] * 1001])
def test_parse_export_refuses_what_is_not_an_export(bad: Any) -> None:
    with pytest.raises(NotAnExport):
        parse_export(bad)


def test_import_then_export_round_trips_every_branch(app: ChatApplication, user: UUID) -> None:
    result = app.import_conversations(user, chatgpt_export())
    assert result["imported"] == 1 and [s["index"] for s in result["skipped"]] == [1, 2]
    cid = result["conversation_ids"][0]
    branch = app.branch(cid, user)
    assert [m["text"] for m in branch] == ["What causes tides?", "Mostly the Moon's gravity.", "And this picture?"]
    assert len(branch[0]["siblings"]) == 2
    export = app.export_conversation(cid, user)
    assert export["title"] == "Tides" and len(export["messages"]) == 5
    assert [m["text"] for m in active_branch(export)] == [m["text"] for m in branch]
    markdown = to_markdown(export)
    assert markdown.startswith("# Tides")
    assert "*(1 other version)*" in markdown and "What is a tide?" not in markdown
    # the imported conversation goes on like any other
    posted = app.post_message(cid, user, "c1", "Thanks!")
    app.complete_reply(cid, posted.reply_id, text="You're welcome.", **OUTCOME)
    history = [t["content"] for t in app.reply_job(cid, posted.reply_id).messages[1:]]
    assert history == ["What causes tides?", "Mostly the Moon's gravity.", "And this picture?", "Thanks!"]


def test_a_bad_conversation_inside_an_export_is_skipped_not_fatal(app: ChatApplication, user: UUID) -> None:
    data = chatgpt_export()[:1] * 3
    data[1] = {**data[1], "mapping": {**data[1]["mapping"], "u1": node("u1", "sys", ["a1"], "user", "x" * 101)}}
    data[2] = {**data[2], "mapping": {**data[2]["mapping"], "u1": node("u1", "sys", ["a1"], "user", "nul \x00")}}
    result = app.import_conversations(user, data)  # the app's limit is 100 characters
    assert result["imported"] == 1 and [s["index"] for s in result["skipped"]] == [1, 2]
    assert "NUL" in result["skipped"][1]["reason"]
    assert "the limit is 100" in result["skipped"][0]["reason"]


def test_share_and_revoke(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    posted = app.post_message(cid, user, "c1", "Hello")
    app.complete_reply(cid, posted.reply_id, text="Hi!", **OUTCOME)
    share_id = app.share_conversation(cid, user)
    conversation = app.repository.get(cid)
    assert conversation.shares == {share_id: True}
    other = app.register_user("eve@example.com", "correct horse")
    with pytest.raises(ConversationNotFound):
        app.revoke_share(cid, other, share_id)
    with pytest.raises(ShareNotFound):
        app.revoke_share(cid, user, uuid4())
    app.revoke_share(cid, user, share_id)
    app.revoke_share(cid, user, share_id)  # again: a no-op
    assert app.repository.get(cid).shares == {share_id: False}


def test_a_circular_or_malformed_export_is_refused_or_imported_without_hanging() -> None:
    looped = {
        "r": node("r", None, [], "user", "Root"),
        "u": node("u", "b", [], "user", "Hello"),
        "a": node("a", "b", [], "system", ""),
        "b": node("b", "a", ["a"], "system", ""),
    }
    parsed, skipped = parse_export([
        {"title": "Loop", "mapping": looped, "current_node": "a"},  # a and b are each other's parent
        {"title": "Odd parent", "mapping": {"x": {**node("x", None, [], "user", "Hi"), "parent": ["not", "an", "id"]}}},
    ])
    assert [i for i, _ in parsed] == [0, 1] and not skipped
    loop = parsed[0][1]
    assert [n["text"] for n in loop.nodes] == ["Root"]  # the circle is unreachable from the root
    assert loop.current is None  # walking up from current_node went round the circle once, then stopped
    assert parsed[1][1].nodes[0]["text"] == "Hi"


def test_a_reply_that_answers_nothing_cannot_be_regenerated(app: ChatApplication, user: UUID) -> None:
    from domain.conversation_errors import ConversationError

    starts_with_reply = [{"title": "Odd", "current_node": "a", "mapping": {
        "a": node("a", None, ["u"], "assistant", "Hello, I start."),
        "u": node("u", "a", [], "user", "Hi."),
    }}]
    cid = app.import_conversations(user, starts_with_reply)["conversation_ids"][0]
    first = app.branch(cid, user)[0]
    assert first["role"] == "assistant" and first["parent_id"] is None
    with pytest.raises(ConversationError, match="answers no message"):
        app.regenerate(cid, user, first["id"])


def test_a_long_imported_conversation_is_recorded_in_bounded_events(
    app: ChatApplication, user: UUID, monkeypatch: pytest.MonkeyPatch,
) -> None:
    turns = 60
    mapping = {"root": node("root", None, ["n0"], None)}
    for i in range(turns):
        mapping[f"n{i}"] = node(f"n{i}", "root" if i == 0 else f"n{i - 1}", [f"n{i + 1}"] if i + 1 < turns else [],
                                "user" if i % 2 == 0 else "assistant", f"{i} " + "x" * 90)
    export = [{"title": "Long", "mapping": mapping, "current_node": f"n{turns - 1}"}]
    monkeypatch.setattr(conversation_module, "IMPORT_EVENT_MAX_CHARS", 1000)  # about ten messages an event
    (cid,) = app.import_conversations(user, export)["conversation_ids"]
    parts = [e for e in app.repository.event_store.get(cid) if isinstance(e, Conversation.TreeImported)]
    assert len(parts) == 6 and all(sum(len(n["text"]) for n in p.nodes) <= 1000 for p in parts)
    conversation = app.repository.get(cid)
    assert len(conversation.nodes) == turns
    assert conversation.title == "Long"
    last = [i for i, n in conversation.nodes.items() if n["text"].startswith(f"{turns - 1} ")][0]
    assert conversation.current == last, "the current message is the export's, not a part's last"


def test_an_import_is_saved_in_batches_with_progress(
    app: ChatApplication, user: UUID, monkeypatch: pytest.MonkeyPatch,
) -> None:
    export = [{"title": f"Chat {i}", "mapping": {"root": node("root", None, ["u"], None),
                                                  "u": node("u", "root", [], "user", "y" * 50)},
               "current_node": "u"} for i in range(7)]
    progress: list[tuple[int, int]] = []
    monkeypatch.setattr(application_module, "IMPORT_BATCH_CHARS", 100)  # two conversations a batch
    result = app.import_conversations(user, export, progress=lambda done, total: progress.append((done, total)))
    assert result["imported"] == 7 and result["skipped"] == []
    assert progress == [(2, 7), (4, 7), (6, 7), (7, 7)]


def test_the_same_chatgpt_export_imported_twice_is_left_out_until_its_chat_is_deleted(
    app: ChatApplication, user: UUID
) -> None:
    export = chatgpt_export()
    export[0]["id"] = "chatgpt-conversation-1"
    first = app.import_conversations(user, export)
    assert first["imported"] == 1 and first["duplicates"] == 0
    again = app.import_conversations(user, export)
    assert again["imported"] == 0 and again["duplicates"] == 1
    assert [s for s in again["skipped"] if s.get("duplicate")] == [
        {"index": 0, "reason": "imported already (as “Tides”)", "duplicate": True}]
    other = app.register_user("other-importer@example.com", "correct horse battery")
    assert app.import_conversations(other, export)["imported"] == 1  # another account: its own import

    twice_in_one = app.import_conversations(user, [chatgpt_export()[0], chatgpt_export()[0]])  # no id: by content
    assert (twice_in_one["imported"], twice_in_one["duplicates"]) == (1, 1)

    app.delete_conversation(first["conversation_ids"][0], user)
    after = app.import_conversations(user, export)  # its chat deleted: imported anew
    assert after["imported"] == 1 and after["duplicates"] == 0
    assert app.import_conversations(user, export)["duplicates"] == 1


def test_this_apps_own_export_imports_into_another_account_and_not_twice(app: ChatApplication, user: UUID) -> None:
    cid = app.start_conversation(user)
    first = app.post_message(cid, user, "m1", "What is a tide?")
    app.complete_reply(cid, first.reply_id, text="The rise and fall of the sea.", **OUTCOME)
    edited = app.edit_message(cid, user, first.message_id, "m2", "What causes tides?")  # a second branch
    app.complete_reply(cid, edited.reply_id, text="Mostly the Moon.", **OUTCOME)
    unfinished = app.post_message(cid, user, "m3", "And the Sun?")  # a reply still pending: left out
    app.update_conversation(cid, user, title="Tides")
    everything = {"format": "chatbot.export.v1", "conversations": [app.export_conversation(cid, user)]}
    assert unfinished.reply_id

    here = app.import_conversations(user, everything)  # into the same account: it is there already
    assert (here["imported"], here["duplicates"]) == (0, 1)

    other = app.register_user("own-export@example.com", "correct horse battery")
    result = app.import_conversations(other, everything)
    assert (result["imported"], result["skipped"]) == (1, [])
    copy = result["conversation_ids"][0]
    assert app.repository.get(copy).title == "Tides"
    assert app.repository.get(copy).persona_id == app.repository.get(cid).persona_id
    assert [m["text"] for m in app.branch(copy, other)] == ["What causes tides?", "Mostly the Moon.", "And the Sun?"]
    assert len(app.branch(copy, other)[0]["siblings"]) == 2  # both branches came along
    assert app.import_conversations(other, everything)["duplicates"] == 1
    single = app.import_conversations(other, app.export_conversation(cid, user))  # one conversation's JSON
    assert single["duplicates"] == 1

    with pytest.raises(NotAnExport):
        parse_export({"format": "chatbot.export.v1", "conversations": "no"})
    parsed, skipped = parse_export({"format": "chatbot.export.v1", "conversations": [{"format": "x"}]})
    assert parsed == [] and "this app's export" in skipped[0]["reason"]
