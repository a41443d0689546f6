"""The chat in a real browser: register, start a chat, watch the reply stream in, rate it,
export and share it, and manage conversations (search, rename, archive, delete), against
the real stack."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from playwright.async_api import Browser, Page, WebSocket, expect

from tests.ui.conftest import register, send_message, shot, start_chat
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration


def record_frames(page: Page) -> list[dict[str, Any]]:
    """Every frame the page's chat socket receives, in order."""
    frames: list[dict[str, Any]] = []

    def on_socket(ws: WebSocket) -> None:
        ws.on("framereceived", lambda payload: frames.append(json.loads(payload)))

    page.on("websocket", on_socket)
    return frames


async def test_a_user_registers_starts_a_chat_and_watches_the_reply_stream_in(
    page: Page, page_errors: list[str]
) -> None:
    frames = record_frames(page)
    email = await register(page)
    await expect(page.locator("#me")).to_have_text(email)
    await shot(page, "chat-01-new-chat")

    await start_chat(page)
    await expect(page.locator(".greeting")).to_contain_text("How can I help you today?")
    await expect(page.locator(".starters .chip").first).to_be_visible()
    await send_message(page, "Hello! How are you today?")
    await expect(page.locator(".turn.user .msg")).to_have_text("Hello! How are you today?")
    # (Stop shows while the reply is written; a short reply can finish before a check sees it,
    # so the streamed frames below are what prove the streaming.)
    await expect(page.locator(".starters")).to_have_count(0)

    reply = page.locator('.turn.assistant[data-status="complete"]')
    await expect(reply).to_have_count(1, timeout=60_000)
    await expect(page.locator("#send")).to_be_visible()
    kinds = [f["type"] for f in frames if f.get("type") != "resumed"]
    assert kinds[0] == "accepted" and kinds[-1] == "reply", kinds
    tokens = [f for f in frames if f["type"] == "token"]
    assert tokens, "the reply arrived without streamed tokens"
    final = next(f for f in frames if f["type"] == "reply")
    assert "".join(t["text"] for t in tokens) == final["text"]
    shown = await reply.locator(".msg").inner_text()
    assert " ".join(shown.split()) == " ".join(final["text"].split())  # rendered, same words
    # the chat is titled after its first message, in the header and the sidebar
    titled = re.compile(r"^Hello! How are you today")
    await expect(page.locator("#chat-title")).to_have_text(titled)
    await expect(page.locator("#conversations a.active")).to_have_text(titled)
    await shot(page, "chat-02-reply-streamed")

    # rate it: thumbs up, then a thumbs down with a comment
    await reply.get_by_role("button", name="Good reply").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Thanks for the feedback.")
    await expect(page.locator('.turn.assistant').get_by_role("button", name="Good reply")).to_have_attribute(
        "aria-pressed", "true"
    )
    await page.locator(".turn.assistant .fb-comment summary").click()
    await page.get_by_label("Rating").select_option("down")
    await page.get_by_label("Feedback comment").fill("Too short.")
    await page.locator(".turn.assistant .fb-comment").get_by_role("button", name="Send").click()
    bad = page.locator('.turn.assistant').get_by_role("button", name="Bad reply")
    good = page.locator('.turn.assistant').get_by_role("button", name="Good reply")
    await expect(bad).to_have_attribute("aria-pressed", "true")
    await expect(page.locator(".turn.assistant .fb-note")).to_have_text("Your comment: Too short.")  # shown
    await good.click()  # the other thumb: the rating changes, the comment stays
    await expect(good).to_have_attribute("aria-pressed", "true")
    await expect(page.locator(".turn.assistant .fb-note")).to_have_text("Your comment: Too short.")
    await expect(page.get_by_label("Feedback comment")).to_have_value("Too short.")  # and can be edited
    await shot(page, "chat-03-feedback-comment")
    await good.click()  # the pressed thumb again: the rating is taken back, with its comment
    await expect(page.locator("#flash .flash-text")).to_have_text("Rating removed.")
    await expect(good).to_have_attribute("aria-pressed", "false")
    await expect(bad).to_have_attribute("aria-pressed", "false")
    await expect(page.locator(".turn.assistant .fb-note")).to_have_count(0)

    # the page is server-rendered: a reload shows the same conversation
    await page.reload()
    await expect(page.locator(".turn.user .msg")).to_have_text("Hello! How are you today?")
    await expect(page.locator('.turn.assistant[data-status="complete"] .msg')).to_have_text(re.compile(r"\S"))
    assert page_errors == []


async def test_a_chat_is_exported_and_shared_read_only_until_the_link_is_withdrawn(
    page: Page, page_errors: list[str], browser: Browser, api_url: str
) -> None:
    await register(page)
    await start_chat(page)
    await send_message(page, "Tell me about lighthouses")
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    reply = await page.locator('.turn.assistant[data-status="complete"] .msg').inner_text()

    await page.get_by_label("Chat actions").click()
    markdown = await page.request.get(await page.get_by_role("link", name="Markdown").get_attribute("href"))
    assert markdown.ok and "Tell me about lighthouses" in await markdown.text()
    await page.get_by_role("button", name="Share a link").click()
    await expect(page.locator("#flash .flash-text")).to_contain_text("Anyone with this link can read the chat: http")
    await page.get_by_label("Chat actions").click()
    link = await page.locator(".share-link").get_attribute("href")

    stranger = await browser.new_context(base_url=api_url)  # not logged in
    shared = await stranger.new_page()
    await shared.goto(link)
    # the chat's title when it was shared: the first message's, or the model's if it came first
    shared_title = await shared.locator("#share-title").inner_text()
    assert shared_title in ("Tell me about lighthouses", await page.locator("#chat-title").inner_text()), shared_title
    await expect(shared.locator(".turn.user .msg")).to_have_text("Tell me about lighthouses")
    assert await shared.locator(".turn.assistant .msg").inner_text() == reply
    await expect(shared.locator("form")).to_have_count(0)  # read-only
    await shot(shared, "share-01-shared-chat")

    await page.get_by_role("button", name="Stop sharing").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("That link no longer works.")
    await page.get_by_label("Dismiss").click()  # any notice can be dismissed, without script
    await expect(page.locator("#flash")).to_be_hidden()
    response = await shared.goto(link)
    assert response is not None and response.status == 404
    await stranger.close()
    assert page_errors == []


async def test_conversations_are_searched_renamed_archived_and_deleted(page: Page, page_errors: list[str]) -> None:
    await register(page)
    lighthouses = await start_chat(page)
    await send_message(page, "Tell me about lighthouses")
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    await start_chat(page, "Captain Flint")
    conversation_id = page.url.rsplit("/", 1)[1]

    search = page.get_by_label("Search chats")
    await search.fill("lighthouses")
    await search.press("Enter")
    await expect(page.locator("#conversations li")).to_have_count(1)  # (titled by the model, maybe "Lighthouses")
    await expect(page.locator(f'#conversations a[href="/c/{lighthouses}"]')).to_have_count(1)
    await search.fill("no chat says this")
    await search.press("Enter")
    await expect(page.locator("#conversations")).to_contain_text("No chats match.")
    await shot(page, "manage-01-search")

    await page.goto(f"/c/{conversation_id}")
    await page.get_by_label("Chat actions").click()
    await page.get_by_label("Title").fill("Pirate talk")
    await page.get_by_role("button", name="Rename").click()
    await expect(page.locator("#chat-title")).to_have_text("Pirate talk")
    await expect(page.locator("#conversations a.active")).to_have_text("Pirate talk")

    await page.get_by_label("Chat actions").click()
    await page.get_by_role("button", name="Archive").click()
    await expect(page.locator(".chat-head .badge")).to_have_text("archived")
    await expect(page.locator("#conversations")).not_to_contain_text("Pirate talk")
    await page.goto("/c?archived=true")
    await expect(page.locator("#conversations")).to_contain_text("Pirate talk")
    await shot(page, "manage-02-archived")

    await page.goto(f"/c/{conversation_id}")
    await page.get_by_label("Chat actions").click()
    await page.get_by_role("button", name="Unarchive").click()
    await expect(page.locator("#conversations")).to_contain_text("Pirate talk")
    await page.get_by_label("Chat actions").click()
    await page.locator("#chat-actions .confirm summary").click()
    await page.get_by_role("button", name="Delete", exact=True).click()
    await expect(page).to_have_url(re.compile(r"/c$"))
    await expect(page.locator("#flash .flash-text")).to_have_text("Conversation deleted.")
    await expect(page.locator("#conversations")).not_to_contain_text("Pirate talk")
    response = await page.goto(f"/c/{conversation_id}")
    assert response is not None and response.status == 404

    await page.get_by_role("link", name="Back to your chats").click()
    await page.get_by_role("button", name="Log out").click()
    await expect(page).to_have_url(re.compile(r"/login$"))
    await page.goto("/c")
    await expect(page).to_have_url(re.compile(r"/login\?next=/c$"))
    assert page_errors == []


async def test_a_message_near_or_over_the_limit_is_counted_and_never_cut(page: Page, page_errors: list[str]) -> None:
    await register(page)
    await start_chat(page)
    box, counter = page.get_by_label("Message", exact=True), page.locator("#count")
    await box.fill("a" * 7000)
    await expect(counter).to_be_hidden()
    await box.fill("a" * 7500)
    await expect(counter).to_have_text("7,500 / 8,000")
    await box.fill("a" * 8120)  # as a paste over the limit lands
    assert len(await box.input_value()) == 8120, "nothing is cut"
    await expect(counter).to_have_text("8,120 / 8,000")
    await expect(page.locator(".over-limit")).to_have_text(  # the sentence above the composer
        "Your message is 8,120 characters long; the limit is 8,000. Shorten it or split it into two messages:"
        " nothing was cut.")
    await expect(page.locator("#send")).to_be_disabled()
    await box.press("Enter")
    await expect(page.locator(".turn.user")).to_have_count(0)  # not sent
    await box.fill("Short again")
    await expect(counter).to_be_hidden()
    await expect(page.locator("#send")).to_be_enabled()
    assert page_errors == []


async def test_the_title_the_model_writes_appears_in_the_page_without_a_reload(
    page: Page, page_errors: list[str]
) -> None:
    frames = record_frames(page)
    await register(page)
    await start_chat(page)
    await send_message(page, "What do penguins eat in winter?")
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    titled = await async_eventually(  # the model's title follows the reply by a second or two
        lambda: [f for f in frames if f.get("type") == "title"], timeout=30, interval=0.1,
        what="a title frame (else the model's title was not kept: see the worker's log)")
    title = titled[0]["title"]
    assert title != "What do penguins eat in winter?"
    await expect(page.locator("#chat-title")).to_have_text(title)  # the same page, not reloaded
    await expect(page.locator("#conversations a.active")).to_have_text(title)
    await shot(page, "chat-06-model-title")
    await page.reload()  # and the server renders it too
    await expect(page.locator("#chat-title")).to_have_text(title)
    assert page_errors == []
