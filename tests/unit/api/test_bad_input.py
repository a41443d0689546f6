"""Bad input that once got past validation: frames that msgspec refuses with something other
than a DecodeError, and text that PostgreSQL cannot store."""

from __future__ import annotations

import msgspec
import pytest

from api.chat_socket import ChatSession, frame_decoder

DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize("raw", [DEEP, '{"type": "dance", "x": ' + DEEP + "}", '{"type": "stop", "reply_id": ' + DEEP + "}"])
def test_a_deeply_nested_frame_is_explained_as_malformed(raw: str) -> None:
    with pytest.raises(msgspec.DecodeError) as failed:
        frame_decoder.decode(raw)  # the typed decoder stops at the first wrong value
    with pytest.raises(RecursionError):
        msgspec.json.decode(raw)  # why explain() catches RecursionError: it is no DecodeError
    assert ChatSession.explain(raw, failed.value) == ("malformed", "a frame nests too deeply")


def test_deep_nesting_before_the_type_tag_fails_the_typed_decoder_itself() -> None:
    # the decoder walks the object looking for "type": chat_socket.on_frame catches this
    with pytest.raises(RecursionError):
        frame_decoder.decode('{"a":' * 5000 + "1" + "}" * 5000)


def test_text_with_nul_is_refused_before_it_reaches_the_read_models(app, user) -> None:
    # PostgreSQL text cannot hold U+0000: stored, such an event would stop the projector
    from domain.conversation_errors import InvalidCharacters
    from domain.persona import InvalidPersona

    conversation_id = app.start_conversation(user)
    with pytest.raises(InvalidCharacters, match="NUL"):
        app.post_message(conversation_id, user, "c-1", "hello\x00there")
    with pytest.raises(InvalidPersona, match="NUL"):
        app.create_persona(user, {"slug": "nul-bot", "name": "Nul\x00", "system_prompt": "Be kind."})
    with pytest.raises(InvalidPersona, match="NUL"):
        app.create_persona(user, {"slug": "nul-bot", "name": "Nul", "system_prompt": "Be kind.", "starters": ["a\x00"]})
    assert app.post_message(conversation_id, user, "c-2", "hello there").created
