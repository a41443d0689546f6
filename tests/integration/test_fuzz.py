"""Bad input against the live API: thousands of generated websocket frames on one socket,
and schemathesis over every operation of the OpenAPI schema.

Every bad frame must be answered by exactly one `error` frame with a code that says what
was wrong, and the socket must stay usable: after all of them a valid `send` is accepted
on the same connection. No HTTP operation may answer 5xx to any input. Both are bounded
(a few thousand frames, a few dozen cases per operation) to run in a few minutes."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from chatbot.ops.launcher import Stack
from tests.waiting import eventually

pytestmark = pytest.mark.integration

MAX_FRAME = 64 * 1024  # Settings.max_frame_bytes
KNOWN_TYPES = {"send", "stop"}
FUZZ = settings(
    deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck), print_blob=True,
)


@dataclass
class Account:
    token: str
    api_key: str
    conversation_id: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def account(api_url: str) -> Account:
    return new_account(api_url)


def new_account(api_url: str) -> Account:
    """A user of its own, with an API key and a conversation (rate limits are per user)."""
    email, password = f"fuzz-{uuid.uuid4().hex[:12]}@example.com", "correct horse battery"
    with httpx.Client(base_url=api_url, timeout=30) as http:
        assert http.post("/api/auth/register", json={"email": email, "password": password}).status_code == 201
        token = http.post("/api/auth/login", json={"email": email, "password": password}).json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        key = http.post("/api/keys", json={"name": "fuzz"}, headers=headers).json()["key"]
        conversation = http.post("/api/conversations", json={}, headers=headers).json()["id"]
    return Account(token, key, conversation)


class Socket:
    """One websocket for the whole run. Should the server close it, the frame that did it
    fails the test, and a new connection lets hypothesis go on to shrink that frame."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url, self.headers = url, headers
        self.ws = self.connect()
        self.closed_by: list[str | bytes] = []

    def connect(self) -> ClientConnection:
        return connect(self.url, additional_headers=self.headers, max_size=None, open_timeout=30)

    def answer(self, payload: str | bytes) -> dict[str, Any]:
        try:
            self.ws.send(payload)
            return dict(json.loads(self.ws.recv(timeout=30)))
        except ConnectionClosed as e:
            self.closed_by.append(payload)
            self.ws = self.connect()
            raise AssertionError(f"the server closed the socket ({e}) after {payload[:300]!r}") from None


@pytest.fixture(scope="module")
def socket(api_url: str, account: Account) -> Iterator[Socket]:
    sock = Socket(api_url.replace("http://", "ws://") + "/api/ws", account.headers)
    yield sock
    sock.ws.close()


def assert_error(frame: dict[str, Any], codes: set[str], payload: str | bytes) -> None:
    assert frame.get("type") == "error", f"{frame} answered {payload[:200]!r}"
    assert frame["code"] in codes, f"code {frame['code']!r}, expected one of {codes}, for {payload[:200]!r}"
    assert isinstance(frame.get("message"), str) and frame["message"], frame


# -- strategies: (payload, the error codes that may answer it) ----------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40)
small_ints = st.integers(-(2**63), 2**63 - 1)
plain = st.none() | st.booleans() | small_ints | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40)
json_values = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=25,
)
not_strings = st.recursive(
    st.none() | st.booleans() | small_ints | st.floats(allow_nan=False, allow_infinity=False),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3), max_leaves=8,
)


def parses_as_typed_object(text: str) -> bool:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict) and isinstance(value.get("type"), str)


@st.composite
def garbage(draw: st.DrawFn) -> tuple[str | bytes, set[str]]:
    """Text and binary frames that are no JSON object with a type: not JSON at all, other
    JSON values, objects without a type, invalid UTF-8, unicode of every plane."""
    payload: str | bytes = draw(st.one_of(
        st.text(max_size=300),
        st.binary(max_size=300),
        json_values.filter(lambda v: not (isinstance(v, dict) and isinstance(v.get("type"), str))).map(json.dumps),
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "type"), plain, max_size=4).map(json.dumps),
        st.builds(lambda t: json.dumps({"type": t}), not_strings),
    ))
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    if parses_as_typed_object(text):  # a rare accident: leave it to the other strategies
        payload = "{" + text
    return payload, {"malformed"}


@st.composite
def unknown_types(draw: st.DrawFn) -> tuple[str, set[str]]:
    frame = draw(st.dictionaries(st.text(max_size=12).filter(lambda k: k != "type"), plain, max_size=5))
    frame["type"] = draw(st.text(max_size=30).filter(lambda t: t not in KNOWN_TYPES))
    return json.dumps(frame), {"unknown_type"}


def valid_send() -> dict[str, Any]:
    return {"type": "send", "conversation_id": str(uuid.uuid4()), "client_message_id": "c-1", "text": "hello"}


def valid_stop() -> dict[str, Any]:
    return {"type": "stop", "reply_id": str(uuid.uuid4())}


@st.composite
def wrong_fields(draw: st.DrawFn) -> tuple[str, set[str]]:
    """A known frame with a field missing, of the wrong type, or an unknown field added."""
    frame = draw(st.sampled_from([valid_send, valid_stop]))()
    fields = sorted(k for k in frame if k != "type")
    how = draw(st.sampled_from(["drop", "retype", "add"]))
    if how == "drop":
        del frame[draw(st.sampled_from(fields))]
    elif how == "retype":
        frame[draw(st.sampled_from(fields))] = draw(not_strings)
    else:
        frame[draw(st.text(min_size=1, max_size=12).filter(lambda k: k not in frame))] = draw(plain)
    return json.dumps(frame), {"invalid"}


@st.composite
def bad_values(draw: st.DrawFn) -> tuple[str, set[str]]:
    """Strings where a UUID or a bounded id belongs, and unicode in every field."""
    frame = draw(st.sampled_from([valid_send, valid_stop]))()
    key = "conversation_id" if frame["type"] == "send" else "reply_id"
    frame[key] = draw(st.text(max_size=60).filter(lambda s: not looks_like_uuid(s)))
    if frame["type"] == "send" and draw(st.booleans()):
        frame["client_message_id"] = draw(st.sampled_from(["", "x" * 101]))
    return json.dumps(frame, ensure_ascii=draw(st.booleans())), {"invalid"}


def looks_like_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


@st.composite
def nested(draw: st.DrawFn) -> tuple[str, set[str]]:
    """Deep nesting, at the top or inside a field, up to the frame size limit."""
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    depth = draw(st.integers(1, (MAX_FRAME - 100) // len(opener + closer)))
    inner = opener * depth + "1" + closer * depth
    if draw(st.booleans()):
        return inner, {"malformed"}
    return json.dumps(valid_stop())[:-1] + ', "reply_id": ' + inner + "}", {"invalid", "malformed"}


@st.composite
def huge(draw: st.DrawFn) -> tuple[str, set[str]]:
    """Frames over the limit, counted in bytes (multi-byte characters count more)."""
    char = draw(st.sampled_from(["x", "é", "語", "🦜"]))
    size = draw(st.integers(MAX_FRAME // len(char.encode()) + 1, 300_000 // len(char.encode())))
    frame = valid_send()
    frame["text"] = char * size
    return json.dumps(frame, ensure_ascii=False), {"frame_too_large"}


@st.composite
def unknown_ids(draw: st.DrawFn) -> tuple[str, set[str]]:
    """Well-formed stops of replies that are not this user's."""
    return json.dumps({"type": "stop", "reply_id": str(draw(st.uuids()))}), {"not_found"}


FRAMES = st.one_of(garbage(), unknown_types(), wrong_fields(), bad_values(), nested(), unknown_ids())


def test_thousands_of_bad_frames_get_clear_errors_and_the_socket_stays_usable(
    socket: Socket, account: Account, stack: Stack,
) -> None:
    seen: dict[str, int] = {}

    @settings(FUZZ, max_examples=2500)
    @given(FRAMES)
    def every_bad_frame_gets_one_error(case: tuple[str | bytes, set[str]]) -> None:
        payload, codes = case
        frame = socket.answer(payload)
        assert_error(frame, codes, payload)
        seen[frame["code"]] = seen.get(frame["code"], 0) + 1

    @settings(FUZZ, max_examples=40)
    @given(huge())
    def every_huge_frame_is_refused(case: tuple[str, set[str]]) -> None:
        payload, codes = case
        assert_error(socket.answer(payload), codes, payload)

    every_bad_frame_gets_one_error()
    every_huge_frame_is_refused()
    assert sum(seen.values()) >= 2000 and {"malformed", "unknown_type", "invalid", "not_found"} <= set(seen), seen

    # the same socket, still usable: a valid send is accepted and answered
    assert socket.closed_by == []
    cmid = str(uuid.uuid4())
    accepted = socket.answer(json.dumps({
        "type": "send", "conversation_id": account.conversation_id, "client_message_id": cmid, "text": "Still there?",
    }))
    assert accepted["type"] == "accepted" and accepted["client_message_id"] == cmid, accepted
    while (frame := json.loads(socket.ws.recv(timeout=120)))["type"] != "reply":
        assert frame["type"] == "token", frame
    assert frame["reply_id"] == accepted["reply_id"] and frame["text"]
    assert all(child.alive() for child in stack.children.values())


# -- every HTTP operation, by schemathesis ------------------------------------------------------


def test_no_operation_answers_any_input_with_a_server_error(api_url: str, account: Account) -> None:
    # schemathesis' pytest loader (`from_fixture`) does not work with this pytest: one test
    # walks the operations itself, each with its own hypothesis run, and reports every
    # operation that failed, not only the first.
    schema = schemathesis.openapi.from_url(f"{api_url}/schema/openapi.json")
    # what ends the session (log-out, deleting the account) last: the rest runs logged in
    ends_session = {("POST", "/api/auth/logout"), ("DELETE", "/api/me"), ("DELETE", "/api/me/sessions")}
    operations = sorted((result.ok() for result in schema.get_all_operations()),
                        key=lambda op: (op.method.upper(), op.path) in ends_session)
    assert len(operations) >= 20, [op.label for op in operations]
    failures: dict[str, str] = {}
    statuses: Counter[int] = Counter()
    for operation in operations:
        # logged in: the session token for /api, an API key for the OpenAI-compatible /v1
        token = account.api_key if operation.path.startswith("/v1") else account.token

        @settings(FUZZ, max_examples=25)
        @given(case=operation.as_strategy())
        def no_server_error(case: Any) -> None:
            response = case.call(base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
            statuses[response.status_code] += 1
            # and every status it answers is one the schema documents (api/openapi_errors.py)
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance, response_schema_conformance])

        try:
            no_server_error()
        except Exception as e:  # noqa: BLE001 - collect them all, then fail once
            failures[operation.label] = str(e)[:2000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
    print(f"{sum(statuses.values())} calls over {len(operations)} operations: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 10 * len(operations)
    assert sum(n for status, n in statuses.items() if status < 300) > 0  # some inputs were valid and logged in


ODD_TEXT = "nul\x00 bell\x07 tab\t rtl\u202e zero-width\u200b e\u0301 🦜 語 \U0010fffd"


def test_a_message_of_odd_characters_is_refused_or_projected_never_wedging_the_projector(
    api_url: str, stack: Stack,
) -> None:
    account = new_account(api_url)  # the other tests' sends count against their user's limit
    socket = Socket(api_url.replace("http://", "ws://") + "/api/ws", account.headers)
    frame = socket.answer(json.dumps({
        "type": "send", "conversation_id": account.conversation_id, "client_message_id": str(uuid.uuid4()),
        "text": ODD_TEXT,
    }))
    with httpx.Client(base_url=api_url, headers=account.headers, timeout=30) as http:
        # a later, ordinary conversation must reach the read models either way
        other = http.post("/api/conversations", json={}, headers=account.headers).json()["id"]
        eventually(lambda: any(c["id"] == other for c in http.get("/api/conversations").json()), timeout=20,
                   interval=0.1, what="the later conversation listed (else the projector stopped applying events)")
        if frame["type"] == "error":
            assert frame["code"] == "rejected" and "NUL" in frame["message"], frame
        else:
            assert frame["type"] == "accepted", frame
            texts = [m["text"] for m in http.get(f"/api/conversations/{account.conversation_id}/messages").json()]
            assert ODD_TEXT in texts
    socket.ws.close()
    assert all(child.alive() for child in stack.children.values())
