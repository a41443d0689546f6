"""The write side in memory: commands, invariants and the events they record."""

from __future__ import annotations

from uuid import UUID

import pytest

from domain.application import ChatApplication
from domain.conversation import Conversation
from domain.conversation_errors import (
    ConversationNotFound,
    EmptyMessage,
    MessageTooLong,
    ReplyStillPending,
)
from domain.ids import persona_id_for
from domain.user import (
    EmailAlreadyRegistered,
    InvalidCredentials,
    InvalidEmail,
    WeakPassword,
)

OUTCOME = dict(text="Hi!", finish_reason="stop", prompt_tokens=5, completion_tokens=2,
               ttft_ms=12.5, duration_ms=40.0, model_name="chat", model_version="1")


def test_a_user_registers_once_and_logs_in_with_any_case_of_email(app: ChatApplication, user: UUID) -> None:
    assert app.authenticate("ada@example.COM", "correct horse") == user
    with pytest.raises(EmailAlreadyRegistered):
        app.register_user("ada@example.com", "another one")
    with pytest.raises(InvalidCredentials):
        app.authenticate("ada@example.com", "wrong password")
    with pytest.raises(InvalidCredentials):
        app.authenticate("nobody@example.com", "correct horse")
    with pytest.raises(InvalidEmail):
        app.register_user("not an email", "correct horse")
    with pytest.raises(WeakPassword):
        app.register_user("bob@example.com", "short")


def test_user_ids_are_random_so_an_address_cannot_be_confirmed_from_one(app: ChatApplication, user: UUID) -> None:
    from domain.ids import user_id_for

    assert user != user_id_for("ada@example.com") and user.version == 4
    assert app.user_id_by_email("ADA@example.com") == user and app.user_id_by_email("eve@example.com") is None
    other = app.register_user("eve@example.com", "correct horse")
    assert other != user and app.authenticate("eve@example.com", "correct horse") == other


def test_an_account_from_before_random_ids_still_logs_in_and_keeps_its_address(app: ChatApplication) -> None:
    from domain.ids import user_id_for
    from domain.user import User

    legacy = User._create(User.Registered, id=user_id_for("old@example.com"), email="old@example.com",
                          password_hash=app.hasher.hash("correct horse"))
    app.save(legacy)
    assert app.user_id_by_email("Old@Example.com") == legacy.id
    assert app.authenticate("old@example.com", "correct horse") == legacy.id
    with pytest.raises(EmailAlreadyRegistered):
        app.register_user("old@example.com", "another one")


def test_seeding_personas_twice_creates_them_once(app: ChatApplication) -> None:
    assert app.seed_personas() == []
    assert app.get_persona(persona_id_for("pirate")).name == "Captain Flint"


def test_a_message_records_the_post_and_a_pinned_reply_request(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user, persona_id_for("pirate"))
    posted = app.post_message(conversation_id, user, "c-1", "  Ahoy there  ")
    events = list(app.events.get(conversation_id))
    assert [type(e).__name__ for e in events] == ["Started", "UserMessagePosted", "ReplyRequested"]
    assert events[1].text == "Ahoy there"
    request = events[2]
    assert request.persona_id == persona_id_for("pirate") and request.persona_version == 1
    assert request.params["temperature"] == 0.6 and request.params["max_tokens"] == 96
    job = app.reply_job(conversation_id, posted.reply_id)
    assert job.messages[0] == {"role": "system", "content": "You are a cheerful pirate. Answer like a pirate would, matey."}
    assert job.messages[1:] == [{"role": "user", "content": "Ahoy there"}]


def test_a_retried_send_returns_the_original_ids_and_records_nothing(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    first = app.post_message(conversation_id, user, "c-1", "Hello")
    again = app.post_message(conversation_id, user, "c-1", "Hello")
    assert (again.message_id, again.reply_id, again.created) == (first.message_id, first.reply_id, False)
    assert len(list(app.events.get(conversation_id))) == 3


def test_a_reply_gets_exactly_one_outcome(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    posted = app.post_message(conversation_id, user, "c-1", "Hello")
    assert app.complete_reply(conversation_id, posted.reply_id, **OUTCOME) is True
    assert app.complete_reply(conversation_id, posted.reply_id, **OUTCOME) is False
    assert app.fail_reply(conversation_id, posted.reply_id, "late failure") is False
    outcomes = [e for e in app.events.get(conversation_id) if isinstance(e, Conversation.ReplyCompleted)]
    assert len(outcomes) == 1 and outcomes[0].model_version == "1"


def test_history_holds_completed_turns_in_order(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    first = app.post_message(conversation_id, user, "c-1", "Hello")
    app.complete_reply(conversation_id, first.reply_id, **OUTCOME)
    second = app.post_message(conversation_id, user, "c-2", "How are you?")
    job = app.reply_job(conversation_id, second.reply_id)
    assert [(m["role"], m["content"]) for m in job.messages[1:]] == [
        ("user", "Hello"), ("assistant", "Hi!"), ("user", "How are you?"),
    ]


def test_a_failed_reply_is_left_out_of_the_history(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    first = app.post_message(conversation_id, user, "c-1", "Hello")
    app.fail_reply(conversation_id, first.reply_id, "Triton is down")
    second = app.post_message(conversation_id, user, "c-2", "Again?")
    roles = [m["role"] for m in app.reply_job(conversation_id, second.reply_id).messages]
    assert roles == ["system", "user", "user"]


def test_invalid_messages_are_refused(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    with pytest.raises(EmptyMessage):
        app.post_message(conversation_id, user, "c-1", "   ")
    with pytest.raises(MessageTooLong):
        app.post_message(conversation_id, user, "c-2", "x" * 101)
    app.post_message(conversation_id, user, "c-3", "first")
    with pytest.raises(ReplyStillPending):
        app.post_message(conversation_id, user, "c-4", "second, too soon")


def test_only_the_owner_posts_into_a_conversation(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_conversation(user)
    intruder = app.register_user("eve@example.com", "correct horse")
    with pytest.raises(ConversationNotFound):
        app.post_message(conversation_id, intruder, "c-1", "hi")
    with pytest.raises(ConversationNotFound):
        app.post_message(persona_id_for("pirate"), user, "c-1", "a persona is not a conversation")


def test_a_reply_can_be_rated_once_finished_and_a_new_rating_replaces_the_old(app: ChatApplication, user: UUID) -> None:
    from domain.conversation_errors import InvalidFeedback

    conversation_id = app.start_conversation(user)
    posted = app.post_message(conversation_id, user, "c-1", "Hello")
    with pytest.raises(InvalidFeedback):
        app.give_feedback(conversation_id, user, posted.reply_id, "up")
    app.complete_reply(conversation_id, posted.reply_id, **OUTCOME)
    app.give_feedback(conversation_id, user, posted.reply_id, "down", "  too short ")

    def feedback() -> dict | None:
        return app.repository.get(conversation_id).reply(posted.reply_id).get("feedback")

    app.give_feedback(conversation_id, user, posted.reply_id, "up")  # a thumb: the comment stays
    assert feedback() == {"rating": "up", "comment": "too short"}
    version = app.repository.get(conversation_id).version
    app.give_feedback(conversation_id, user, posted.reply_id, "up")  # the same again: nothing recorded
    assert app.repository.get(conversation_id).version == version
    app.give_feedback(conversation_id, user, posted.reply_id, "up", "")  # an empty comment removes it
    assert feedback() == {"rating": "up", "comment": ""}
    app.clear_feedback(conversation_id, user, posted.reply_id)  # the rating taken back
    assert feedback() is None
    assert app.branch(conversation_id, user)[-1]["feedback"] is None
    app.clear_feedback(conversation_id, user, posted.reply_id)  # nothing to take back: nothing recorded
    assert [type(e).__name__ for e in app.events.get(conversation_id)][-4:] == [
        "FeedbackGiven", "FeedbackGiven", "FeedbackGiven", "FeedbackCleared"]
    with pytest.raises(InvalidFeedback):
        app.give_feedback(conversation_id, user, posted.reply_id, "sideways")


def test_a_persona_edit_is_a_new_version_and_old_versions_stay_readable(app: ChatApplication, user: UUID) -> None:
    from domain.persona import InvalidPersona, NotPersonaOwner

    persona_id = app.create_persona(user, {"slug": "pal", "name": "Pal", "system_prompt": "Be kind."})
    assert app.edit_persona(persona_id, user, {"system_prompt": "Be very kind.", "temperature": 0.3}) == 2
    versions = app.persona_versions(persona_id, user)
    assert [(v["version"], v["system_prompt"]) for v in versions] == [(1, "Be kind."), (2, "Be very kind.")]
    assert app.edit_persona(persona_id, user, {"temperature": 0.3}) == 2  # no change, no version
    stranger = app.register_user("stranger@example.com", "correct horse")
    with pytest.raises(NotPersonaOwner):
        app.edit_persona(persona_id, stranger, {"name": "Mine"})
    with pytest.raises(InvalidPersona):
        app.edit_persona(persona_id, user, {"slug": "renamed"})
    with pytest.raises(NotPersonaOwner):
        app.edit_persona(persona_id_for("pirate"), user, {"name": "Landlubber"})


def test_a_persona_can_only_name_a_model_the_repository_serves() -> None:
    from domain.persona import InvalidPersona

    app = ChatApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"},
                          served_models=lambda: {"chat", "chat/1", "chat/2"})
    owner = app.register_user("model@example.com", "correct horse")
    fields = {"slug": "mine", "name": "Mine", "system_prompt": "Be kind."}
    for bad in ("../../etc/passwd", "chat/3", "Chat", "/chat", ""):
        with pytest.raises(InvalidPersona, match="served models \\(chat\\)"):
            app.create_persona(owner, {**fields, "model": bad})
    persona_id = app.create_persona(owner, {**fields, "model": "chat/2"})
    with pytest.raises(InvalidPersona, match="served models"):
        app.edit_persona(persona_id, owner, {"model": "demo"})
    assert app.edit_persona(persona_id, owner, {"model": "chat"}) == 2


class ByteWindow:
    """A fake model whose tokens are UTF-8 bytes, in a 200-token window."""

    def __init__(self) -> None:
        self.counted = 0

    def window(self, model: str) -> int:
        return 200

    def count(self, model: str, messages: list[dict[str, str]]) -> int:
        self.counted += 1
        return sum(len(m["content"].encode()) + 4 for m in messages)


def test_a_message_that_cannot_fit_the_context_window_is_refused_when_sent_and_nothing_is_recorded() -> None:
    from domain.conversation_errors import MessageTooLong

    window = ByteWindow()
    app = ChatApplication(env={"PERSISTENCE_MODULE": "eventsourcing.popo"}, prompt_window=window)
    app.seed_personas()
    owner = app.register_user("window@example.com", "correct horse")
    cid = app.start_conversation(owner)
    app.post_message(cid, owner, "m1", "Hi!", sampling={"max_tokens": 20})
    assert window.counted == 0, "a message that clearly fits is not tokenized"
    before = len(list(app.repository.event_store.get(cid)))
    with pytest.raises(MessageTooLong, match="too long for the model.*context of 200"):
        app.post_message(cid, owner, "m2", "é" * 80, sampling={"max_tokens": 20})
    assert len(list(app.repository.event_store.get(cid))) == before, "nothing recorded"
    assert window.counted == 1


def test_seeding_moves_a_built_in_persona_off_an_earlier_default_but_keeps_what_was_chosen(
    app: ChatApplication,
) -> None:
    from domain.ids import persona_id_for
    from domain.persona import BUILTIN_PERSONAS

    assistant = app.get_persona(persona_id_for("assistant"))
    assistant._edit({"system_prompt": "You are a helpful, friendly assistant."})  # as seeded before
    app.save(assistant)
    app.seed_personas()
    upgraded = app.get_persona(persona_id_for("assistant"))
    assert upgraded.system_prompt == BUILTIN_PERSONAS[0]["system_prompt"]
    assert upgraded.version == assistant.version + 1, "the change is a new version"

    upgraded._edit({"system_prompt": "An operator's own prompt."})
    app.save(upgraded)
    app.seed_personas()
    assert app.get_persona(persona_id_for("assistant")).system_prompt == "An operator's own prompt."


def test_an_unknown_address_costs_the_same_password_check_as_a_known_one(app: ChatApplication, user: UUID) -> None:
    from domain.user import InvalidCredentials

    checks: list[str] = []

    class CountingHasher(type(app.hasher)):  # type: ignore[misc]
        def verify(self, hash_: str | bytes, password: str | bytes) -> bool:
            checks.append(str(hash_))
            return super().verify(hash_, password)

    app.hasher = CountingHasher()
    for email in ("ada@example.com", "nobody@example.com"):
        with pytest.raises(InvalidCredentials, match="wrong e-mail address or password"):
            app.authenticate(email, "not the password")
    assert len(checks) == 2, "one argon2 check each, known or not"
