"""The server-rendered pages over plain HTTP: sessions, CSRF protection of every form,
POST-redirect-GET, security headers, and the pages nobody may see without logging in."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx
import pytest

from tests.fakes import chatgpt_export
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration
PASSWORD = "correct horse battery"


@dataclass
class Visitor:
    """A browser-like client (cookies kept, redirects not followed) and its account."""

    http: httpx.AsyncClient
    email: str


def token_in(html: str) -> str:
    match = re.search(r'name="_csrf" value="([0-9a-f]{64})"', html)
    assert match, "the page has no CSRF token"
    return match.group(1)


@pytest.fixture
async def visitor(api_url: str) -> AsyncIterator[Visitor]:
    """Someone who registered and logged in through the pages."""
    http = httpx.AsyncClient(base_url=api_url, timeout=30)
    email = f"web-{uuid.uuid4().hex[:12]}@example.com"
    token = token_in((await http.get("/register")).text)
    r = await http.post("/register", data={"_csrf": token, "email": email, "password": PASSWORD,
                                           "password_again": PASSWORD})
    assert r.status_code == 303 and r.headers["location"] == "/c", r.text
    assert "session" in http.cookies
    page = await http.get("/c")
    assert page.status_code == 200 and email in page.text
    yield Visitor(http, email)
    await http.aclose()


async def form_token(http: httpx.AsyncClient, path: str = "/c") -> str:
    return token_in((await http.get(path)).text)


async def test_pages_need_a_session_and_send_strangers_to_the_login(api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        r = await http.get("/")
        assert r.status_code == 303 and r.headers["location"] == "/login"
        r = await http.get("/c?q=x")
        assert r.status_code == 303 and r.headers["location"] == "/login?next=/c%3Fq%3Dx"
        for path in ("/personas", "/personas/new", f"/c/{uuid.uuid4()}"):
            assert (await http.get(path)).status_code == 303, path
        login = await http.get("/login")
        assert login.status_code == 200 and login.headers["content-type"].startswith("text/html")
        csp = login.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert login.headers["x-content-type-options"] == "nosniff"
        assert "csrf" in http.cookies
        r = await http.get(f"/s/{uuid.uuid4()}")
        assert r.status_code == 404 and "Not found" in r.text


async def test_a_form_without_its_token_is_refused(visitor: Visitor, api_url: str) -> None:
    http, token = visitor.http, await form_token(visitor.http)
    await http.post("/logout", data={"_csrf": token})
    anonymous = token_in((await http.get("/login")).text)
    await http.post("/login", data={"_csrf": anonymous, "email": visitor.email, "password": PASSWORD})
    token = token_in((await http.get("/c")).text)
    assert (await http.post("/c", data={})).status_code == 403
    assert (await http.post("/c", data={"_csrf": "0" * 64})).status_code == 403
    r = await http.post("/logout", data={})
    assert r.status_code == 403 and "Form expired" in r.text
    # a token from another browser (another csrf cookie) does not work here
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as other:
        foreign = token_in((await other.get("/login")).text)
    assert (await http.post("/c", data={"_csrf": foreign})).status_code == 403
    # nor does one taken before logging in
    assert (await http.post("/c", data={"_csrf": anonymous})).status_code == 403
    r = await http.post("/c", data={"_csrf": token})
    assert r.status_code == 303 and re.fullmatch(r"/c/[0-9a-f-]{36}", r.headers["location"])
    # the JSON API is not a form: a Bearer token needs no CSRF token
    login = await http.post("/api/auth/login", json={"email": "nobody@example.com", "password": "x"})
    assert login.status_code == 401


async def test_logging_in_goes_back_to_the_page_asked_for_but_never_off_site(visitor: Visitor) -> None:
    http, email = visitor.http, visitor.email
    r = await http.post("/logout", data={"_csrf": token_in((await http.get("/c")).text)})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert "session" not in http.cookies
    for asked, landed in (("/personas", "/personas"), ("//evil.example/x", "/c"), ("https://evil.example", "/c")):
        token = token_in((await http.get("/login", params={"next": asked})).text)
        r = await http.post("/login", data={"_csrf": token, "email": email, "password": PASSWORD, "next": asked})
        assert r.status_code == 303 and r.headers["location"] == landed, asked
        http.cookies.delete("session")
    token = token_in((await http.get("/login")).text)
    r = await http.post("/login", data={"_csrf": token, "email": email, "password": "wrong"})
    assert r.status_code == 401 and "Wrong e-mail address or password." in r.text


async def test_a_chat_is_shared_read_only_and_the_link_can_be_withdrawn(visitor: Visitor, api_url: str) -> None:
    http, token = visitor.http, await form_token(visitor.http)
    conversation = (await http.post("/c", data={"_csrf": token})).headers["location"]
    r = await http.post(f"{conversation}/messages", data={"_csrf": token, "text": "Tell me about *owls*",
                                                          "client_message_id": str(uuid.uuid4())})
    assert r.status_code == 303
    r = await http.post(f"{conversation}/shares", data={"_csrf": token})
    assert r.status_code == 303
    page = (await http.get(conversation)).text
    share = re.search(r'href="https?://[^"/]+(/s/[0-9a-f-]{36})"', page).group(1)  # the full URL, to copy
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as stranger:
        shared = await stranger.get(share)
        assert shared.status_code == 200 and "Tell me about *owls*" in shared.text  # user text is not Markdown
        assert "Start your own chat" in shared.text and 'name="_csrf"' not in shared.text
    r = await http.post(f"{conversation}{share.replace('/s/', '/shares/')}/delete", data={"_csrf": token})
    assert r.status_code == 303
    assert (await http.get(share)).status_code == 404


async def test_a_chat_is_started_by_its_first_message_and_a_refused_one_leaves_no_chat(visitor: Visitor) -> None:
    http = visitor.http

    async def chats() -> int:
        return (await http.get("/c")).text.count('class="conv-title"')

    page = (await http.get("/c")).text
    assert '<textarea name="text" id="first-message"' in page and "autofocus" in page  # ready to type in
    before = await chats()
    r = await http.post("/c", data={"_csrf": await form_token(http), "text": "What is the capital of France?",
                                    "client_message_id": f"first-{uuid.uuid4().hex[:8]}"})
    assert r.status_code == 303 and re.fullmatch(r"/c/[0-9a-f-]{36}", r.headers["location"])
    async def chat_page() -> str:  # (the page waits a bounded time for the read models: poll, they are eventual)
        return (await http.get(r.headers["location"])).text

    chat = await async_eventually(chat_page, until=lambda chat: 'data-role="assistant"' in chat, timeout=10,
                                  interval=0.1, what="the chat page with its reply")  # requested with the message
    assert '<div class="msg user">What is the capital of France?</div>' in chat
    assert await chats() == before + 1

    r = await http.post("/c", data={"_csrf": await form_token(http), "text": "x" * 8001})
    assert r.status_code == 400  # too long: refused before any chat is made
    r = await http.post("/c", data={"_csrf": await form_token(http), "text": "a NUL \x00 inside"})
    assert r.status_code == 400  # refused by the conversation: the chat made for it is gone again
    # (deleted in the events at once; the list follows the read models)
    await async_eventually(chats, until=lambda n: n == before + 1, timeout=10, interval=0.1,
                           what=f"{before + 1} chats listed on the page")


async def test_a_chatgpt_export_is_imported_from_the_page(visitor: Visitor, api_url: str) -> None:
    http, token = visitor.http, await form_token(visitor.http)
    upload = {"file": ("conversations.json", json.dumps(chatgpt_export()).encode(), "application/json")}
    r = await http.post("/c/import", data={"_csrf": token}, files=upload)
    assert r.status_code == 303 and r.headers["location"] == "/c"
    page = await http.get("/c")
    assert "Imported 1 conversation. Skipped 2 that could not be imported:" in page.text
    assert ">Tides</span></a>" in page.text
    r = await http.post("/c/import", data={"_csrf": token}, files=upload)  # the same file again
    assert r.status_code == 303
    page = await http.get("/c")
    assert "Imported 0 conversations. Left out 1 conversation imported before. Skipped 2" in page.text
    assert page.text.count(">Tides</span></a>") == 1
    everything = (await http.get("/api/export")).content  # the app's own "Export all" file is read too
    r = await http.post("/c/import", data={"_csrf": token},
                        files={"file": ("conversations.json", everything, "application/json")})
    assert r.status_code == 303
    assert "Imported 0 conversations. Left out 1 conversation imported before." in (await http.get("/c")).text
    r = await http.post("/c/import", data={"_csrf": token},
                        files={"file": ("conversations.json", b"{not json", "application/json")})
    assert r.status_code == 400 and "That file is not JSON" in r.text


async def test_the_account_page_sets_consent_starts_temporary_chats_and_erases_the_account(
    visitor: Visitor, api_url: str
) -> None:
    page = await visitor.http.get("/account")
    assert page.status_code == 200 and 'id="erase-form"' in page.text and 'id="training"' in page.text
    assert 'id="training" checked' not in page.text  # off until the user opts in
    r = await visitor.http.post("/account/consent", data={"_csrf": token_in(page.text), "training": "on"})
    assert r.status_code == 303 and r.headers["location"] == "/account"
    assert 'id="training" checked' in (await visitor.http.get("/account")).text

    # a temporary chat, kept for a day
    token = await form_token(visitor.http)
    r = await visitor.http.post("/c", data={"_csrf": token, "keep": "1d"})
    assert r.status_code == 303, r.text
    chat_id = r.headers["location"].rsplit("/", 1)[-1]
    r = await visitor.http.post("/c", data={"_csrf": token, "keep": "forever and ever"})
    assert r.status_code == 400
    bearer = await visitor.http.post("/api/auth/login", json={"email": visitor.email, "password": PASSWORD})
    headers = {"Authorization": f"Bearer {bearer.json()['token']}"}
    async with httpx.AsyncClient(base_url=api_url, timeout=30, headers=headers) as api:
        conversation = (await api.get(f"/api/conversations/{chat_id}")).json()
        assert conversation["expires_at"] is not None
    # it says so, with its time, in the chat and in the list
    expires = datetime.fromisoformat(conversation["expires_at"]).astimezone(timezone.utc)
    shown = f"{expires.day} {expires:%b %Y, %H:%M} UTC"
    chat = (await visitor.http.get(f"/c/{chat_id}")).text
    assert f'<span class="badge temp" id="expiry">temporary · deleted {shown}</span>' in chat
    assert f'title="Temporary: deleted {shown}">temporary</span>' in chat  # its row in the list
    r = await visitor.http.post("/c", data={"_csrf": await form_token(visitor.http), "keep": ""})
    assert r.status_code == 303, r.text
    lasting = r.headers["location"]
    assert 'id="expiry"' not in (await visitor.http.get(lasting)).text

    # erasing needs the password and the confirmation; then the session is gone for good
    token = token_in((await visitor.http.get("/account")).text)
    r = await visitor.http.post("/account/delete", data={"_csrf": token, "password": "wrong", "confirm": "erase"})
    assert r.status_code == 303 and r.headers["location"] == "/account"
    assert (await visitor.http.get("/c")).status_code == 200  # nothing was erased
    r = await visitor.http.post("/account/delete", data={"_csrf": token, "password": PASSWORD})
    assert r.status_code == 303 and r.headers["location"] == "/account"  # not confirmed
    r = await visitor.http.post("/account/delete", data={"_csrf": token, "password": PASSWORD, "confirm": "erase"})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert (await visitor.http.get("/c")).status_code == 303  # logged out
    again = await visitor.http.post("/api/auth/login", json={"email": visitor.email, "password": PASSWORD})
    assert again.status_code == 401


async def test_the_account_page_lists_the_sessions_and_logs_out_another_browser(visitor: Visitor, api_url: str) -> None:
    async with httpx.AsyncClient(base_url=api_url, timeout=30, headers={"user-agent": "the other browser"}) as other:
        token = token_in((await other.get("/login")).text)
        r = await other.post("/login", data={"_csrf": token, "email": visitor.email, "password": PASSWORD})
        assert r.status_code == 303 and (await other.get("/c")).status_code == 200
        page = (await visitor.http.get("/account")).text
        assert "the other browser" in page and "this browser" in page
        end = re.search(r'action="(/account/sessions/[0-9a-f-]{36}/end)"', page)
        assert end, "another session has a log-out button"
        r = await visitor.http.post(end.group(1), data={"_csrf": token_in(page)})
        assert r.status_code == 303
        assert (await other.get("/c")).status_code == 303, "the other browser's cookie no longer works"
        assert (await visitor.http.get("/c")).status_code == 200, "this one's still does"
