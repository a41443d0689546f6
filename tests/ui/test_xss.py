"""No script from a persona, a message, a model reply or a streamed token runs in the page:
each attempt is shown as text, in a real browser."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from playwright.async_api import Page, WebSocketRoute, expect

from tests.ui.conftest import register, send_message, shot, start_chat

pytestmark = pytest.mark.integration

SCRIPT = "<script>window.__xss = (window.__xss || []).concat('{where}-script'); alert('{where}')</script>"
IMG = "<img src=x onerror=\"window.__xss = (window.__xss || []).concat('{where}-img'); alert('{where}')\">"
LINK = "[click me](javascript:window.__xss=['{where}-link'])"


def attack(where: str) -> str:
    return " ".join(part.format(where=where) for part in (SCRIPT, IMG, LINK))


async def assert_inert(page: Page, page_errors: list[str]) -> None:
    """Nothing ran, and no live element came out of the attacks."""
    assert await page.evaluate("window.__xss === undefined"), await page.evaluate("window.__xss")
    for selector in ("#thread script", "#thread img", "main img", 'a[href^="javascript"]', "[onerror]", "[onload]"):
        assert await page.locator(selector).count() == 0, selector
    assert page_errors == []


async def test_script_in_a_persona_a_message_and_a_reply_is_rendered_inert(
    page: Page, page_errors: list[str], api_url: str
) -> None:
    await register(page)
    # a persona whose every field attacks
    await page.goto("/personas/new")
    form = page.locator("#persona-form")
    name = f"<script>window.__xss=['name']</script>Mallory {uuid.uuid4().hex[:6]}"
    await form.get_by_label("Name", exact=True).fill(name)
    await form.get_by_label("Avatar").fill(IMG.format(where="avatar"))
    await form.get_by_label("Slug").fill(f"mallory-{uuid.uuid4().hex[:8]}")
    await form.get_by_label("Description").fill(IMG.format(where="description"))
    await form.get_by_label("System prompt").fill("You are helpful.")
    await form.get_by_label("Greeting").fill(attack("greeting"))
    await form.get_by_label("Conversation starters").fill(SCRIPT.format(where="starter"))
    await form.get_by_role("button", name="Create").click()
    await expect(page.locator("#persona-version")).to_have_text("v1")
    await page.goto("/personas")
    await expect(page.locator(".persona-card", has_text="Mallory")).to_contain_text("<img src=x onerror=")
    await assert_inert(page, page_errors)

    # a chat with it: the greeting, the starters and a user message that attack
    await start_chat(page, "Mallory")
    await expect(page.locator(".hero-name")).to_have_text(name)  # the markup, as text
    await expect(page.locator(".greeting")).to_contain_text("<script>window.__xss")
    await expect(page.locator(".greeting")).to_contain_text("click me")
    await expect(page.locator(".starters .chip")).to_have_text(SCRIPT.format(where="starter"))
    await send_message(page, attack("user"))
    await expect(page.locator(".turn.user .msg")).to_have_text(attack("user"))
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    await page.reload()
    await expect(page.locator(".turn.user .msg")).to_have_text(attack("user"))
    await shot(page, "xss-01-persona-and-message")
    await assert_inert(page, page_errors)

    # an assistant message that attacks: earlier turns brought in through the OpenAI API
    created = await page.request.post("/api/keys", data={"name": "xss"})
    assert created.ok, await created.text()
    key = (await created.json())["key"]
    completion = await page.request.post(
        f"{api_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
        data={"model": "assistant", "max_tokens": 8, "messages": [
            {"role": "user", "content": "Show me some HTML."},
            {"role": "assistant", "content": attack("reply") + "\n\n**still Markdown**"},
            {"role": "user", "content": "Thanks!"},
        ]},
    )
    assert completion.ok, await completion.text()
    conversations = await (await page.request.get("/api/conversations")).json()
    await page.goto(f"/c/{conversations[0]['id']}")
    imported = page.locator('.turn.assistant[data-status="complete"]').first
    await expect(imported).to_contain_text("<script>window.__xss")
    await expect(imported.locator("strong")).to_have_text("still Markdown")
    await shot(page, "xss-02-reply")
    await assert_inert(page, page_errors)


async def test_a_streamed_token_that_carries_markup_is_shown_as_text(page: Page, page_errors: list[str]) -> None:
    sockets: list[WebSocketRoute] = []

    def through(ws: WebSocketRoute) -> None:  # the real server, plus frames we add
        ws.connect_to_server()
        sockets.append(ws)

    await page.route_web_socket(re.compile(r"/api/ws$"), through)
    await register(page)
    conversation_id = await start_chat(page)
    reply_id = str(uuid.uuid4())
    token = attack("token")
    sockets[-1].send(json.dumps({"type": "token", "conversation_id": conversation_id, "reply_id": reply_id,
                                 "text": token}))
    bubble = page.locator(f'.msg[data-reply-id="{reply_id}"]')
    await expect(bubble).to_have_text(token)
    await shot(page, "xss-03-streamed-token")
    await assert_inert(page, page_errors)
    sockets[-1].send(json.dumps({"type": "reply", "conversation_id": conversation_id, "reply_id": reply_id,
                                 "text": token, "finish_reason": "stop"}))
    await expect(bubble).to_have_count(0)  # the page is fetched again: the server knows no such reply
    await assert_inert(page, page_errors)
