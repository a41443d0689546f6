"""Sessions end when they should (issue 14, D4): log-out ends the session everywhere, a
user sees their sessions and ends any of them, and erasing an account ends all of them;
another API process learns of an end within a second."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from api.auth import Revocations
from api.sessions import SessionStore
from chatbot.ops.launcher import Stack
from projections.readmodels import read_model_recorder

pytestmark = pytest.mark.integration


def log_in(http: httpx.Client, email: str, password: str, agent: str) -> str:
    r = http.post("/api/auth/login", json={"email": email, "password": password}, headers={"user-agent": agent})
    assert r.status_code == 200, r.text
    return str(r.json()["token"])


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def socket_refused(api_url: str, token: str) -> bool:
    try:
        with connect(api_url.replace("http://", "ws://") + "/api/ws", additional_headers=bearer(token),
                     open_timeout=10) as ws:
            ws.recv(timeout=5)
    except (InvalidStatus, ConnectionClosed) as e:
        # closed before the handshake completes: the server answers the upgrade with 403
        return any(code in str(e) for code in ("4401", "403"))
    except TimeoutError:
        return False
    return False


def test_log_out_ends_the_session_and_others_can_be_seen_and_ended(api_url: str) -> None:
    email, password = f"sessions-{uuid.uuid4().hex[:12]}@example.com", "correct horse battery"
    with httpx.Client(base_url=api_url, timeout=30) as http:
        assert http.post("/api/auth/register", json={"email": email, "password": password}).status_code == 201
        laptop, phone, tablet = (log_in(http, email, password, agent) for agent in ("laptop", "phone", "tablet"))
        listed = http.get("/api/me/sessions", headers=bearer(laptop)).json()
        assert [s["user_agent"] for s in listed] == ["tablet", "phone", "laptop"]
        assert [s["current"] for s in listed] == [False, False, True]

        assert http.post("/api/auth/logout", headers=bearer(laptop)).status_code == 204
        assert http.get("/api/me", headers=bearer(laptop)).status_code == 401
        r = http.post("/api/personas", headers=bearer(laptop), json={"slug": f"p-{uuid.uuid4().hex[:8]}",
                                                                     "name": "P", "system_prompt": "Hi."})
        assert r.status_code == 401
        assert socket_refused(api_url, laptop)

        phone_id = next(s["id"] for s in http.get("/api/me/sessions", headers=bearer(tablet)).json()
                        if s["user_agent"] == "phone")
        assert http.delete(f"/api/me/sessions/{phone_id}", headers=bearer(tablet)).status_code == 204
        assert http.get("/api/me", headers=bearer(phone)).status_code == 401
        assert http.delete(f"/api/me/sessions/{phone_id}", headers=bearer(tablet)).status_code == 404
        assert [s["user_agent"] for s in http.get("/api/me/sessions", headers=bearer(tablet)).json()] == ["tablet"]
        assert http.get("/api/me", headers=bearer(tablet)).status_code == 200


def test_an_erased_account_s_tokens_stop_working_at_once(api_url: str) -> None:
    email, password = f"erased-{uuid.uuid4().hex[:12]}@example.com", "correct horse battery"
    with httpx.Client(base_url=api_url, timeout=30) as http:
        assert http.post("/api/auth/register", json={"email": email, "password": password}).status_code == 201
        first, second = log_in(http, email, password, "a"), log_in(http, email, password, "b")
        r = http.request("DELETE", "/api/me", json={"password": password}, headers=bearer(first))
        assert r.status_code == 204, r.text
        r = http.post("/api/personas", headers=bearer(second), json={"slug": f"p-{uuid.uuid4().hex[:8]}",
                                                                     "name": "P", "system_prompt": "Hi."})
        assert r.status_code == 401
        assert socket_refused(api_url, second)


def test_another_process_learns_of_an_ended_session_on_its_next_look(stack: Stack) -> None:
    here = SessionStore(read_model_recorder(stack.settings.eventsourcing_env()), 3600, Revocations())
    there = SessionStore(read_model_recorder(stack.settings.eventsourcing_env()), 3600, Revocations())
    try:
        user = uuid.uuid4()
        session = here.start(user, "test")
        there.refresh()
        assert session not in there.revoked
        assert here.end(user, session) and session in here.revoked
        there.refresh()
        assert session in there.revoked
        late = SessionStore(read_model_recorder(stack.settings.eventsourcing_env()), 3600, Revocations())
        late.refresh()  # a process started after the end still knows of it
        assert session in late.revoked
        late.readmodels.datastore.close()
    finally:
        here.readmodels.datastore.close()
        there.readmodels.datastore.close()


def test_an_open_socket_of_an_ended_session_is_closed_without_waiting_for_a_frame(api_url: str) -> None:
    email, password = f"sockets-{uuid.uuid4().hex[:12]}@example.com", "correct horse battery"
    with httpx.Client(base_url=api_url, timeout=30) as http:
        assert http.post("/api/auth/register", json={"email": email, "password": password}).status_code == 201
        token = log_in(http, email, password, "listening tab")
        with connect(api_url.replace("http://", "ws://") + "/api/ws", additional_headers=bearer(token),
                     open_timeout=10) as ws:
            assert http.post("/api/auth/logout", headers=bearer(token)).status_code == 204
            # the client sends nothing: the server tells it and closes
            frame = json.loads(ws.recv(timeout=10))
            assert frame["type"] == "error" and frame["code"] == "session_ended"
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
