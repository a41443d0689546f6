"""Session tokens, websocket frame classification and subjects."""

from __future__ import annotations

import json
import uuid

import msgspec

from api.auth import REVOKED, Session, issue_token, verify_token
from api.chat_socket import ChatSession, frame_decoder
from api.schemas import SendFrame
from chatbot.bus.messaging import partition_of

SECRET = b"k" * 32


def test_a_token_verifies_with_its_secret_only_until_it_expires_or_its_session_ends() -> None:
    user, session = uuid.uuid4(), uuid.uuid4()
    token = issue_token(SECRET, user, 60, session)
    assert verify_token(SECRET, token) == Session(user, session)
    assert verify_token(b"x" * 32, token) is None
    assert verify_token(SECRET, token[:-2] + "AA") is None
    assert verify_token(SECRET, "garbage") is None
    assert verify_token(SECRET, issue_token(SECRET, user, -1, session)) is None
    REVOKED.add([session])
    assert verify_token(SECRET, token) is None, "an ended session's token no longer works"
    assert verify_token(SECRET, issue_token(SECRET, user, 60, uuid.uuid4())) is not None, "another session does"


def explain(raw: str) -> tuple[str, str]:
    try:
        frame_decoder.decode(raw)
    except msgspec.DecodeError as e:
        return ChatSession.explain(raw, e)
    raise AssertionError("the frame decoded")


def test_frames_are_classified_as_malformed_unknown_or_invalid() -> None:
    assert explain("{oops")[0] == "malformed"
    assert explain('"a string"')[0] == "malformed"
    assert explain('{"no_type": 1}')[0] == "malformed"
    assert explain('{"type": "dance"}')[0] == "unknown_type"
    code, message = explain('{"type": "send", "conversation_id": "nope"}')
    assert code == "invalid" and "conversation_id" in message
    frame = frame_decoder.decode(json.dumps({
        "type": "send", "conversation_id": str(uuid.uuid4()), "client_message_id": "a", "text": "hi",
    }))
    assert isinstance(frame, SendFrame)


def test_a_conversation_always_maps_to_the_same_partition() -> None:
    cid = uuid.uuid4()
    assert partition_of(cid, 8) == partition_of(str(cid), 8)
    spread = {partition_of(uuid.uuid4(), 8) for _ in range(200)}
    assert spread == set(range(8))


def test_a_regenerated_delta_yields_only_the_text_the_client_lacks() -> None:
    from chatbot.bus.messaging import TokenDelta, unseen_text

    assert unseen_text(TokenDelta("r", 0, "Hello"), 0) == ("Hello", 5)
    assert unseen_text(TokenDelta("r", 0, "Hel"), 5) == ("", 5)  # all seen before
    assert unseen_text(TokenDelta("r", 3, "lo there"), 5) == (" there", 11)  # overlaps
