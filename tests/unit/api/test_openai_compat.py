"""The OpenAI-compatible API's pure logic, in memory: API keys (format, hashing, lookup,
revocation), imported turns in the prompt, pinned sampling overrides, and the translation
of an OpenAI request's messages."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import pytest
from litestar.exceptions import TooManyRequestsException

from api.key_use import WRITE_EVERY_S, KeyUseStore
from api.openai_compat import sampling_of, split_messages
from api.openai_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    openai_error,
)
from domain.application import ChatApplication
from domain.conversation_errors import InvalidSampling, InvalidTurns, MessageTooLong
from domain.ids import persona_id_for
from domain.user import (
    ApiKey,
    ApiKeyAlreadyMade,
    ApiKeyNotFound,
    InvalidApiKeyName,
    InvalidCredentials,
    UserError,
    api_key_aggregate_id,
    hash_api_key_secret,
    new_api_key,
    parse_api_key,
)

# -- keys -------------------------------------------------------------------------------------


def test_a_new_key_carries_its_key_id_and_parses_back() -> None:
    key_id, key = new_api_key()
    assert key.startswith(f"sk-chat-{key_id}-") and len(key_id) == 16
    parsed_id, secret = parse_api_key(key)
    assert parsed_id == key_id and len(secret) >= 40
    assert new_api_key()[1] != key


@pytest.mark.parametrize("key", [
    "", "sk-chat-", "sk-chat-0123456789abcdef", "sk-chat-0123456789abcdef-", "sk-other-0123456789abcdef-x",
    "sk-chat-XYZ3456789abcdef-secret", "sk-chat-0123-secret", "Bearer sk-chat-0123456789abcdef-x",
])
def test_a_malformed_key_is_an_invalid_credential(key: str) -> None:
    with pytest.raises(InvalidCredentials):
        parse_api_key(key)


def test_a_secret_with_dashes_parses_whole() -> None:
    assert parse_api_key("sk-chat-0123456789abcdef-a-b_c") == ("0123456789abcdef", "a-b_c")


def test_only_a_sha256_of_the_secret_is_stored(app: ChatApplication, user: UUID) -> None:
    key = app.create_api_key(user, "laptop")
    key_id, secret = parse_api_key(key)
    stored: ApiKey = app.repository.get(api_key_aggregate_id(key_id))
    assert stored.user_id == user and stored.key_hash == hash_api_key_secret(secret)
    assert len(stored.key_hash) == 64 and secret not in stored.key_hash
    events = [type(e).__name__ for e in app.events.get(user)]
    assert events == ["Registered", "ApiKeyCreated"]
    assert all(secret not in repr(vars(e)) for e in app.events.get(user))
    [listed] = app.api_keys(user)
    assert listed.pop("created_at") is not None
    assert listed == {"key_id": key_id, "name": "laptop", "revoked": False, "list_apart": True}


def test_a_key_opens_the_api_for_its_user_until_it_is_revoked(app: ChatApplication, user: UUID) -> None:
    key, other = app.create_api_key(user, "one"), app.create_api_key(user, "two")
    assert app.user_for_api_key(key) == user == app.user_for_api_key(other)
    key_id = parse_api_key(key)[0]
    app.revoke_api_key(user, key_id)
    app.revoke_api_key(user, key_id)  # again: a no-op
    with pytest.raises(InvalidCredentials):
        app.user_for_api_key(key)
    assert app.user_for_api_key(other) == user
    assert [type(e).__name__ for e in app.events.get(api_key_aggregate_id(key_id))] == ["Created", "Revoked"]
    assert {k["name"]: k["revoked"] for k in app.api_keys(user)} == {"one": True, "two": False}


def test_a_wrong_secret_or_an_unknown_key_id_is_refused(app: ChatApplication, user: UUID) -> None:
    key = app.create_api_key(user, "one")
    key_id, secret = parse_api_key(key)
    with pytest.raises(InvalidCredentials):
        app.user_for_api_key(f"sk-chat-{key_id}-{secret[:-1]}x")
    with pytest.raises(InvalidCredentials):
        app.user_for_api_key(f"sk-chat-{'0' * 16}-{secret}")


def test_a_user_cannot_revoke_another_users_key(app: ChatApplication, user: UUID) -> None:
    other = app.register_user("bob@example.com", "correct horse")
    key = app.create_api_key(user, "one")
    with pytest.raises(ApiKeyNotFound):
        app.revoke_api_key(other, parse_api_key(key)[0])
    assert app.user_for_api_key(key) == user


def test_a_key_needs_a_name(app: ChatApplication, user: UUID) -> None:
    with pytest.raises(InvalidApiKeyName):
        app.create_api_key(user, "   ")


def test_a_keys_chats_are_listed_apart_unless_it_is_made_or_changed_otherwise(app: ChatApplication, user: UUID) -> None:
    apart, listed = app.create_api_key(user, "script"), app.create_api_key(user, "mine", list_apart=False)
    assert app.api_key_holder(apart).list_apart and not app.api_key_holder(listed).list_apart
    key_id = parse_api_key(apart)[0]
    app.set_api_key_listing(user, key_id, False)
    app.set_api_key_listing(user, key_id, False)  # as it is already: no event
    holder = app.api_key_holder(apart)
    assert (holder.user_id, holder.key_id, holder.list_apart) == (user, key_id, False)
    assert {k["name"]: k["list_apart"] for k in app.api_keys(user)} == {"script": False, "mine": False}
    assert [type(e).__name__ for e in app.events.get(api_key_aggregate_id(key_id))] == ["Created", "ListingSet"]
    assert [type(e).__name__ for e in app.events.get(user)][-1] == "ApiKeyListingSet"


def test_the_setting_of_a_revoked_or_anothers_key_cannot_change(app: ChatApplication, user: UUID) -> None:
    other = app.register_user("bob@example.com", "correct horse")
    key_id = parse_api_key(app.create_api_key(user, "one"))[0]
    with pytest.raises(ApiKeyNotFound):
        app.set_api_key_listing(other, key_id, False)
    with pytest.raises(ApiKeyNotFound):
        app.set_api_key_listing(user, "0123456789abcdef", False)
    app.revoke_api_key(user, key_id)
    with pytest.raises(ApiKeyNotFound):
        app.set_api_key_listing(user, key_id, False)
    with pytest.raises(UserError):
        app.set_api_key_listing(user, key_id, "no")  # type: ignore[arg-type]


def test_a_form_sent_twice_makes_one_key(app: ChatApplication, user: UUID) -> None:
    key = app.create_api_key(user, "laptop", client_id="form-1")
    with pytest.raises(ApiKeyAlreadyMade) as again:
        app.create_api_key(user, "laptop", client_id="form-1")
    assert again.value.key_id == parse_api_key(key)[0]
    assert len(app.api_keys(user)) == 1
    app.create_api_key(user, "laptop", client_id="form-2")
    assert len(app.api_keys(user)) == 2


def test_a_keys_use_is_written_at_most_once_a_minute_per_key() -> None:
    now = [1000.0]
    store = KeyUseStore(None, clock=lambda: now[0])  # type: ignore[arg-type]
    assert store.due("a") and not store.due("a") and store.due("b")
    now[0] += WRITE_EVERY_S - 1
    assert not store.due("a")
    now[0] += 1
    assert store.due("a")


async def test_a_forgotten_users_use_is_not_written_and_close_waits_for_writes() -> None:
    store = KeyUseStore(None)  # type: ignore[arg-type]
    written: list[tuple[UUID, str]] = []
    started = asyncio.Event()

    async def slow_call(func, user_id, key_id):  # noqa: ANN001, ANN202 - stands for Services.call
        started.set()
        await asyncio.sleep(0.05)
        written.append((user_id, key_id))

    alice, erased = uuid4(), uuid4()
    store.forgotten.add(erased)  # as forget() leaves it (its DELETE needs a database)
    store.note(erased, "k-erased", slow_call)
    store.note(alice, "k-alice", slow_call)
    await started.wait()
    await store.close(timeout=5)
    assert written == [(alice, "k-alice")] and not store.pending

    async def stuck_call(func, user_id, key_id):  # noqa: ANN001, ANN202
        await asyncio.sleep(60)

    store.note(alice, "k-other", stuck_call)
    await store.close(timeout=0.05)  # a write that does not finish is cancelled, not waited for
    await asyncio.sleep(0.01)  # (the set forgets a task in a callback after it ends)
    assert not store.pending


# -- conversations from a request -------------------------------------------------------------


def test_a_chat_started_with_a_key_listed_apart_is_marked_in_its_first_save(app: ChatApplication, user: UUID) -> None:
    turns = [{"role": "user", "content": "Hello"}]
    marked = app.start_imported_conversation(user, persona_id_for("assistant"), turns, "", "0123456789abcdef")
    plain = app.start_imported_conversation(user, persona_id_for("assistant"), turns)
    assert [type(e).__name__ for e in app.events.get(marked)] == ["Started", "ListedApart", "TurnsImported"]
    assert app.repository.get(marked).listed_apart_by == "0123456789abcdef"
    assert "ListedApart" not in [type(e).__name__ for e in app.events.get(plain)]


def test_imported_turns_and_instructions_become_part_of_the_prompt(app: ChatApplication, user: UUID) -> None:
    turns = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi Ada!"}]
    conversation_id = app.start_imported_conversation(user, persona_id_for("pirate"), turns, "Answer briefly.")
    posted = app.post_message(conversation_id, user, "c-1", "What is my name?")
    job = app.reply_job(conversation_id, posted.reply_id)
    assert job.messages[0]["role"] == "system"
    assert job.messages[0]["content"].startswith("You are a cheerful pirate.")
    assert job.messages[0]["content"].endswith("\n\nAnswer briefly.")
    assert job.messages[1:] == [*turns, {"role": "user", "content": "What is my name?"}]
    events = [type(e).__name__ for e in app.events.get(conversation_id)]
    assert events == ["Started", "TurnsImported", "UserMessagePosted", "ReplyRequested"]


def test_a_conversation_without_earlier_turns_records_no_import(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_imported_conversation(user, persona_id_for("tutor"), [])
    assert [type(e).__name__ for e in app.events.get(conversation_id)] == ["Started"]


def test_imported_turns_are_checked_like_messages(app: ChatApplication, user: UUID) -> None:
    pirate = persona_id_for("pirate")
    with pytest.raises(InvalidTurns):
        app.start_imported_conversation(user, pirate, [{"role": "tool", "content": "42"}])
    with pytest.raises(MessageTooLong):
        app.start_imported_conversation(user, pirate, [{"role": "user", "content": "x" * 101}])


def test_sampling_overrides_are_pinned_in_the_reply_request(app: ChatApplication, user: UUID) -> None:
    conversation_id = app.start_imported_conversation(user, persona_id_for("pirate"), [])
    posted = app.post_message(conversation_id, user, "c-1", "Ahoy", {"temperature": 0.0, "max_tokens": 7, "seed": 3})
    params = app.reply_job(conversation_id, posted.reply_id).params
    assert params == {"temperature": 0.0, "top_p": 0.9, "max_tokens": 7, "seed": 3}
    with pytest.raises(InvalidSampling):
        app.post_message(conversation_id, user, "c-2", "Ahoy", {"top_p": 0.0})


# -- the request's messages -------------------------------------------------------------------


def test_a_requests_messages_split_into_instructions_earlier_turns_and_the_question() -> None:
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"),
        ChatMessage("developer", [ContentPart("text", "No emoji.")]),
        ChatMessage("user", [ContentPart("text", "How "), ContentPart("text", "are you?")]),
    ]
    instructions, turns, text = split_messages(messages)
    assert instructions == "Be brief.\n\nNo emoji."
    assert turns == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert text == "How are you?"


@pytest.mark.parametrize("messages", [
    [],
    [ChatMessage("system", "Be brief.")],
    [ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello!")],
    [ChatMessage("tool", "42"), ChatMessage("user", "Hi")],
    [ChatMessage("user", [ContentPart("image_url")])],
])
def test_a_request_that_does_not_end_with_a_user_text_is_rejected(messages: list[ChatMessage]) -> None:
    with pytest.raises(InvalidTurns):
        split_messages(messages)


def test_only_one_choice_and_sane_sampling_are_accepted() -> None:
    request = ChatCompletionRequest(model="pirate", messages=[], max_tokens=10, max_completion_tokens=5, top_p=0.5)
    assert sampling_of(request) == {"top_p": 0.5, "max_tokens": 5}
    for bad in ({"n": 2}, {"temperature": 3.0}, {"max_tokens": 0}, {"top_p": 0.0}):
        with pytest.raises(InvalidSampling):
            sampling_of(ChatCompletionRequest(model="pirate", messages=[], **bad))  # type: ignore[arg-type]


def test_errors_take_openais_shape_with_the_mapped_status() -> None:
    response = openai_error(None, InvalidCredentials("invalid API key"))  # type: ignore[arg-type]
    assert response.status_code == 401
    assert response.content == {"error": {
        "message": "invalid API key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
    }}
    slow_down = TooManyRequestsException("slow down", headers={"Retry-After": "7"})
    limited = openai_error(None, slow_down)  # type: ignore[arg-type]
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert limited.content["error"]["type"] == "rate_limit_error"
    assert openai_error(None, InvalidTurns("no")).content["error"]["code"] == "rejected"  # type: ignore[arg-type]
