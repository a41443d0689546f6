"""Malformed input found by an outside probe (issue 14, D9): each class gets a 4xx or an
error frame with a clear message, never a 500 or a dropped socket."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from websockets.sync.client import connect

from tests.integration.test_fuzz import Account, new_account

pytestmark = pytest.mark.integration

DEEP = "[" * 1000 + "]" * 1000


@pytest.fixture(scope="module")
def account(api_url: str) -> Account:
    return new_account(api_url)


def answers(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, f"{r.request.method} {r.request.url.path}: {r.status_code} {r.text[:300]}"
    return r.text


@pytest.mark.parametrize("path", ["/api/conversations", "/api/keys", "/api/import", "/api/auth/login",
                                  "/api/auth/register", "/v1/chat/completions"])
def test_json_nested_a_thousand_levels_deep_is_refused(api_url: str, account: Account, path: str) -> None:
    headers = {**account.headers, "content-type": "application/json"}
    if path.startswith("/v1"):
        headers["Authorization"] = f"Bearer {account.api_key}"
        body = json.dumps({"model": "assistant", "messages": [{"role": "user", "content": "hi"}], "user": "x"})
        body = body[:-1] + ', "metadata": ' + DEEP + "}"  # deep inside a field the API ignores
    else:
        body = DEEP
    with httpx.Client(base_url=api_url, timeout=30) as http:
        text = answers(http.post(path, content=body.encode(), headers=headers))
    assert "nest" in text.lower() or "deep" in text.lower() or "json" in text.lower(), text


@pytest.mark.parametrize("path", ["/api/conversations", "/api/auth/login", "/api/import"])
def test_invalid_utf8_in_a_json_body_is_refused(api_url: str, account: Account, path: str) -> None:
    with httpx.Client(base_url=api_url, timeout=30) as http:
        r = http.post(path, content=b'{"title": "\xff\xfe"}', headers={**account.headers, "content-type": "application/json"})
    assert "utf-8" in answers(r).lower() or "json" in r.text.lower()


def test_a_nul_in_a_search_is_refused_clearly(api_url: str, account: Account) -> None:
    with httpx.Client(base_url=api_url, timeout=30) as http:
        text = answers(http.get("/api/conversations", params={"q": "a\x00b"}, headers=account.headers))
        assert "nul" in text.lower() or "character" in text.lower()
        r = http.get("/c", params={"q": "\x00"}, headers=account.headers)
        assert r.status_code < 500, r.text[:300]


def test_a_page_import_of_deep_or_broken_json_is_refused_with_a_message(api_url: str, account: Account) -> None:
    for content in (DEEP.encode(), b'[{"title": "\\ud800", "mapping": {}}]'):
        with httpx.Client(base_url=api_url, timeout=30) as http:
            r = http.post("/api/import", content=content, headers={**account.headers, "content-type": "application/json"})
        assert r.status_code < 500, r.text[:300]


def test_a_binary_frame_of_invalid_utf8_gets_an_error_frame_and_the_socket_stays(api_url: str, account: Account) -> None:
    url = api_url.replace("http://", "ws://") + "/api/ws"
    with connect(url, additional_headers=account.headers, open_timeout=10) as ws:
        ws.send(b"\xff\xfe{")
        frame = json.loads(ws.recv(timeout=10))
        assert frame["type"] == "error" and "utf-8" in frame["message"].lower(), frame
        ws.send(json.dumps({"type": "send", "conversation_id": account.conversation_id,
                            "client_message_id": str(uuid.uuid4()), "text": "still here"}))
        assert json.loads(ws.recv(timeout=30))["type"] == "accepted"


# -- D2: cross-site requests ---------------------------------------------------------------------


def test_a_cookie_session_acts_only_from_this_site_and_only_with_json(api_url: str) -> None:
    email, password = f"csrf-{uuid.uuid4().hex[:12]}@example.com", "correct horse battery"
    evil = {"origin": "https://evil.example"}
    with httpx.Client(base_url=api_url, timeout=30) as http:
        assert http.post("/api/auth/register", json={"email": email, "password": password}).status_code == 201
        # log-in CSRF: another site cannot log the visitor in, even with right credentials
        r = http.post("/api/auth/login", json={"email": email, "password": password}, headers=evil)
        assert r.status_code == 403 and r.json()["code"] == "foreign_origin"
        r = http.post("/api/auth/login", content=json.dumps({"email": email, "password": password}),
                      headers={"content-type": "text/plain"})
        assert r.status_code == 415
        r = http.post("/api/auth/login", json={"email": email, "password": password})
        assert r.status_code == 200 and "session" in http.cookies  # from here on the cookie speaks

        own = {"origin": api_url}
        simple = json.dumps({"name": "x"}).encode()
        for path in ("/api/keys", "/api/conversations", "/api/import"):
            r = http.post(path, content=simple, headers={**evil, "content-type": "text/plain"})
            assert r.status_code == 403, (path, r.status_code, r.text)
            r = http.post(path, content=simple, headers={**own, "content-type": "text/plain"})
            assert r.status_code == 415, (path, r.status_code, r.text)
        r = http.put("/api/me/consent", content=b'{"training": true}', headers={**evil, "content-type": "text/plain"})
        assert r.status_code == 403
        assert http.post("/api/auth/logout", headers=evil).status_code == 403
        r = http.post("/api/conversations", json={}, headers=own)
        assert r.status_code == 201, r.text  # the site's own page, JSON: fine
        token = http.post("/api/auth/login", json={"email": email, "password": password}).json()["token"]
    with httpx.Client(base_url=api_url, timeout=30) as bare:  # a bearer token: no page can attach one
        r = bare.post("/api/conversations", json={}, headers={**evil, "authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text


def test_every_api_error_has_one_shape_and_the_docs_have_a_policy(api_url: str, account: Account) -> None:
    with httpx.Client(base_url=api_url, timeout=30) as http:
        unauthorized = http.get("/api/conversations")  # Litestar's own error
        assert unauthorized.status_code == 401
        missing = http.get(f"/api/conversations/{uuid.uuid4()}", headers=account.headers)  # a domain error
        invalid = http.post("/api/keys", json={"name": 5}, headers=account.headers)  # validation
        for r in (unauthorized, missing, invalid):
            body = r.json()
            assert body["status_code"] == r.status_code and body["code"] and body["detail"], body
        assert (unauthorized.json()["code"], missing.json()["code"], invalid.status_code) == ("unauthorized", "not_found", 400)
        docs = http.get("/schema")
        policy = docs.headers.get("content-security-policy", "")
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert http.get("/schema/openapi.json").headers["x-content-type-options"] == "nosniff"
