"""The user a request acts for (`user_id`, api/current_user.py; the pages' viewer,
web/pages/__init__.py): the session's user reaches the handler, and a request without a
session is answered as it always was: 401 with the JSON error body on `/api`, OpenAI's
error on `/v1`, the log-in page for the web pages, before the request's body or query is
looked at. The app runs on fake services; no servers."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import TestClient

import api.app as api_app
from api.auth import issue_token
from chatbot.runtime.config import load_settings
from domain.user import InvalidCredentials
from web.csrf import CSRF_COOKIE, CSRF_FIELD, form_token
from web.pages import page_handlers, template_config

LOG_IN_FIRST = {"status_code": 401, "code": "unauthorized",
                "detail": "log in first: send a valid token or session cookie"}
USER = uuid.UUID("0b6d3f5e-9a51-4c1e-8f3e-1d2c3b4a5f60")


class FakeApp:
    def user_email(self, user_id: uuid.UUID) -> str:
        return f"{user_id.hex[:8]}@example.org"

    def training_consent(self, user_id: uuid.UUID) -> bool:
        return user_id == USER

    def api_key_holder(self, key: str) -> Any:
        raise InvalidCredentials("invalid API key")  # a session token is no API key


def fake_services(settings: Any) -> api_app.Services:
    """A `Services` (handlers' parameters are checked against the type) with only what
    these requests touch."""
    services = object.__new__(api_app.Services)

    async def call(func: Any, *args: Any) -> Any:
        return func(*args)

    async def close() -> None:
        pass

    for name, value in {"settings": settings, "app": FakeApp(), "call": call, "close": close}.items():
        object.__setattr__(services, name, value)
    return services


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient[Any]]:
    settings = load_settings()

    async def create(s: Any) -> api_app.Services:
        return fake_services(s)

    monkeypatch.setattr(api_app.Services, "create", staticmethod(create))
    for name in ("serve_metrics", "setup_tracing", "shutdown_tracing", "setup_logging"):
        monkeypatch.setattr(api_app, name, lambda *a, **k: None)
    app = api_app.create_app(settings, pages=page_handlers(settings), template_config=template_config)
    with TestClient(app) as test_client:
        test_client.app.state.settings = settings
        yield test_client


def token(client: TestClient[Any]) -> str:
    settings = client.app.state.settings
    return issue_token(settings.secret_key, USER, 3600, uuid.uuid4())


def test_the_sessions_user_reaches_the_handler(client: TestClient[Any]) -> None:
    r = client.get("/api/me", headers={"authorization": f"Bearer {token(client)}"})
    assert r.status_code == 200, r.text
    assert r.json() == {"user_id": str(USER), "email": f"{USER.hex[:8]}@example.org", "training_consent": True}


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/me"),
    ("GET", "/api/keys"),
    ("GET", "/api/export"),
    ("DELETE", f"/api/personas/{uuid.uuid4()}"),
    ("GET", f"/api/conversations/{uuid.uuid4()}/messages"),
    ("DELETE", f"/api/conversations/{uuid.uuid4()}/shares/{uuid.uuid4()}"),
])
def test_without_a_session_the_api_answers_401(client: TestClient[Any], method: str, path: str) -> None:
    for headers in ({}, {"authorization": "Bearer not.a-token"}):
        r = client.request(method, path, headers=headers)
        assert (r.status_code, r.json()) == (401, LOG_IN_FIRST), (method, path, r.text)


def test_the_session_is_asked_for_before_the_request_is_validated(client: TestClient[Any]) -> None:
    """Anonymous: 401 whatever the body or query; signed in: a malformed request is 400."""
    assert client.post("/api/personas", json={"name": 5}).json() == LOG_IN_FIRST
    assert client.post("/api/keys", json={"name": 5}).json() == LOG_IN_FIRST
    assert client.get("/api/conversations", params={"limit": "0"}).json() == LOG_IN_FIRST
    signed_in = {"authorization": f"Bearer {token(client)}"}
    assert client.post("/api/personas", json={"name": 5}, headers=signed_in).status_code == 400
    assert client.post("/api/keys", json={"name": 5}, headers=signed_in).status_code == 400
    r = client.get("/api/conversations", params={"limit": "0"}, headers=signed_in)
    assert r.status_code == 400 and "limit" in r.text, r.text


def test_the_openai_routes_ask_for_an_api_key_not_a_session(client: TestClient[Any]) -> None:
    r = client.get("/v1/models", headers={"authorization": f"Bearer {token(client)}"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", r.text


def test_without_a_session_a_page_sends_to_the_log_in_page(client: TestClient[Any]) -> None:
    for path in ("/account", "/personas/new", "/shares", "/c"):
        r = client.get(path, params={"x": "1"} if path == "/c" else None, follow_redirects=False)
        query = "%3Fx%3D1" if path == "/c" else ""
        assert r.status_code == 303 and r.headers["location"] in (f"/login?next={path}{query}",
                                                                   f"/login?next={path}?x=1"), (path, r.headers)
    # a form (its CSRF token valid) comes back to the chats after the log-in
    client.cookies.set(CSRF_COOKIE, "seed")
    csrf = form_token(client.app.state.settings.secret_key, "seed", "")
    for path in (f"/c/{uuid.uuid4()}/rename", "/account/keys", f"/shares/{uuid.uuid4()}/delete"):
        r = client.post(path, data={CSRF_FIELD: csrf, "title": "x"}, follow_redirects=False)
        assert (r.status_code, r.headers.get("location")) == (303, "/login?next=/c"), (path, r.text[:200])
