"""The words people read when something is refused: sentences with the numbers that help,
never an id or the framework's terse wording; the theme cookie taken only when valid."""

from __future__ import annotations

from types import SimpleNamespace
from uuid import uuid4

import pytest

from domain.conversation import Conversation
from domain.conversation_errors import MessageTooLong, ReplyNotFound
from web.pages.common import FormError, text_field, theme_of
from web.pages.errors import BY_TYPE, back_path, sentence


def test_a_domain_message_becomes_a_sentence() -> None:
    assert sentence("wait for the current reply to finish before sending") == \
        "Wait for the current reply to finish before sending."
    assert sentence("already a sentence.") == "Already a sentence."
    assert sentence("  ") == ""


def test_a_message_over_the_limit_says_by_how_much_and_what_to_do() -> None:
    with pytest.raises(MessageTooLong) as refused:
        Conversation.check_message("x" * 8001, 8000)
    assert sentence(str(refused.value)) == \
        "Your message is 8,001 characters long; the limit is 8,000. Shorten it or split it into two messages."
    with pytest.raises(MessageTooLong, match="split it into several messages"):
        Conversation.check_message("x" * 16_001, 8000)


def test_a_form_field_over_its_limit_is_named_with_both_lengths() -> None:
    with pytest.raises(FormError) as refused:
        text_field({"text": "y" * 8001}, "text", 8000, label="your message")
    assert sentence(str(refused.value)) == "Your message is 8,001 characters long; the limit is 8,000. Shorten it."


def test_a_refusal_that_carries_only_an_id_gets_a_sentence_of_its_own() -> None:
    reply_id = str(uuid4())
    assert reply_id not in BY_TYPE[type(ReplyNotFound(reply_id))]


def request(headers: dict[str, str], cookies: dict[str, str] | None = None) -> SimpleNamespace:
    return SimpleNamespace(headers=headers, cookies=cookies or {})


def test_go_back_leads_only_to_a_page_of_this_site() -> None:
    here = {"host": "chat.example"}
    assert back_path(request({**here, "referer": "http://chat.example/c?q=x"})) == "/c?q=x"  # type: ignore[arg-type]
    assert back_path(request({**here, "referer": "https://evil.example/c"})) is None  # type: ignore[arg-type]
    assert back_path(request(here)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("cookie, theme", [("dark", "dark"), ("light", "light"), ("neon", None), (None, None)])
def test_the_theme_cookie_is_taken_only_when_it_names_a_theme(cookie: str | None, theme: str | None) -> None:
    assert theme_of(request({}, {"theme": cookie} if cookie else {})) == theme  # type: ignore[arg-type]
