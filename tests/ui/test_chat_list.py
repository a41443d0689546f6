"""The chat list in a real browser: date groups, a page at a time ("More chats", loaded in
place with the script and as a page without it), pins, and a menu per chat (rename, pin,
archive, share, delete) that brings the user back to the page they were on; a chat started
and left empty is not listed. The chats are brought in by importing an export."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.ui.conftest import import_chats, register, shot, start_chat
from web.chat_list import PAGE

pytestmark = pytest.mark.integration
CHATS = PAGE + 5


def item(page: Page, title: str):  # noqa: ANN201
    return page.locator("#conversations li.conv-item").filter(has=page.locator(f'a[title="{title}"]'))


async def open_menu(page: Page, title: str):  # noqa: ANN201
    chat = item(page, title)
    await chat.hover()
    await chat.locator("summary", has_text=f"Actions for {title}").click()
    return chat.locator(".menu-panel")


async def test_the_list_is_grouped_paged_and_each_chat_has_a_menu(
    page: Page, context: BrowserContext, browser: Browser, api_url: str, page_errors: list[str]
) -> None:
    await register(page)
    await import_chats(page, CHATS)
    items = page.locator("#conversations li.conv-item")
    await expect(items).to_have_count(PAGE)
    await expect(page.locator("#conversations h2.conv-group")).to_have_text(["Today"])
    await shot(page, "chat-list-01-grouped")

    # the next page, appended in place when "More chats" scrolls into view: no navigation
    await page.evaluate("window.__samePage = true")
    await page.locator("#more-chats").scroll_into_view_if_needed()
    await expect(items).to_have_count(CHATS)
    await expect(page.locator("#more-chats")).to_have_count(0)
    await expect(page.locator("#conversations h2.conv-group")).to_have_text(["Today"])  # the group goes on
    assert await page.evaluate("window.__samePage === true")
    titles = await page.locator("#conversations li.conv-item .conv-title").all_text_contents()
    assert sorted(titles) == sorted(f"Chat {i}" for i in range(1, CHATS + 1))  # each once

    # the menu: pin, and the pinned chat heads the list; the page stays /c
    menu = await open_menu(page, "Chat 3")
    await shot(page, "chat-list-02-menu")
    await menu.get_by_role("button", name="Pin").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Pinned.")
    await expect(page).to_have_url(re.compile(r"/c$"))
    await expect(page.locator("#conversations h2.conv-group").first).to_have_text("Pinned")
    await expect(page.locator("#pinned .conv-title")).to_have_text(["Chat 3"])
    await expect(page.locator("#pinned [aria-label=Pinned]")).to_have_count(1)
    await page.locator("#more-chats").scroll_into_view_if_needed()  # the pinned chat was on page 2
    await expect(page.locator("#more-chats")).to_have_count(0)
    titles = await page.locator("#conversations .conv-title").all_text_contents()
    assert len(titles) == len(set(titles)) == CHATS  # listed once: pinned, not again on a later page
    pinned = (await (await page.request.get("/api/conversations?pinned=true")).json())
    assert [c["title"] for c in pinned] == ["Chat 3"] and pinned[0]["pinned"] is True

    menu = await open_menu(page, "Chat 7")
    await menu.get_by_title("New title for Chat 7").fill("Seven, renamed")
    await menu.get_by_role("button", name="Rename").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Renamed.")
    await expect(item(page, "Seven, renamed")).to_have_count(1)

    menu = await open_menu(page, "Chat 8")
    await menu.get_by_role("button", name="Archive").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Archived.")
    await page.goto("/c?archived=true")
    await expect(page.locator("#conversations li.conv-item .conv-title")).to_have_text(["Chat 8"])

    await page.goto("/personas")  # a menu used on another page comes back to it
    menu = await open_menu(page, "Chat 9")
    await menu.get_by_text("Delete…").click()
    await menu.get_by_role("button", name="Delete", exact=True).click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Conversation deleted.")
    await expect(page).to_have_url(re.compile(r"/personas$"))
    await expect(item(page, "Chat 9")).to_have_count(0)

    menu = await open_menu(page, "Chat 10")
    await menu.get_by_role("button", name="Share a link").click()
    await expect(page.locator("#flash .flash-text")).to_contain_text("/s/")

    menu = await open_menu(page, "Chat 3")
    await menu.get_by_role("button", name="Unpin").click()
    await expect(page.locator("#pinned")).to_have_count(0)

    # a chat started and left empty is listed while on screen only
    empty = await start_chat(page)
    await expect(page.locator(f'#conversations a.active[href="/c/{empty}"]')).to_have_count(1)
    await page.goto("/c")
    await expect(page.locator(f'#conversations a[href="/c/{empty}"]')).to_have_count(0)
    assert page_errors == []

    # without the script "More chats" opens the next page of the list
    plain = await browser.new_context(base_url=api_url, java_script_enabled=False, storage_state=await context.storage_state())
    try:
        quiet = await plain.new_page()
        await quiet.goto("/c")
        await quiet.locator("#more-chats").click()
        await expect(quiet).to_have_url(re.compile(r"/c\?before=.+&before_id=.+"))
        await expect(quiet.locator(".side-note")).to_contain_text("Older chats")
        rest = CHATS - 2 - PAGE  # less the archived and the deleted chat
        await expect(quiet.locator("#conversations li.conv-item")).to_have_count(rest)
        await expect(quiet.locator("#more-chats")).to_have_count(0)
        r = await quiet.goto("/c?before=2026-12-06T00:00:00Z")
        assert r is not None and r.status == 400  # a cursor is a time and an id
    finally:
        await plain.close()


async def test_the_chat_menu_works_on_a_phone(browser: Browser, api_url: str) -> None:
    context = await browser.new_context(base_url=api_url, viewport={"width": 390, "height": 844}, has_touch=True,
                                        is_mobile=True)
    try:
        page = await context.new_page()
        await register(page)
        await import_chats(page, 3)
        await page.locator(".topbar").get_by_title("Chats").click()
        chat = item(page, "Chat 2")
        await chat.locator("summary.icon-btn").click()  # visible without hovering
        await expect(chat.locator(".menu-panel")).to_be_visible()
        box = await chat.locator(".menu-panel").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, box
        await shot(page, "phone-chat-list-menu")
        await page.keyboard.press("Escape")  # closes the menu, focus back on its button
        await expect(chat.locator(".menu-panel")).to_be_hidden()
        await expect(chat.locator("summary.icon-btn")).to_be_focused()
        await expect(page.locator("#sidebar")).to_be_visible()  # the list stays out
        await chat.locator("summary.icon-btn").click()
        await chat.locator(".menu-panel").get_by_role("button", name="Pin").click()
        await expect(page.locator("#flash .flash-text")).to_have_text("Pinned.")
    finally:
        await context.close()


async def test_chats_made_with_an_api_key_are_listed_apart(page: Page, api_url: str) -> None:
    await register(page)
    await import_chats(page, 1)
    await expect(page.get_by_role("link", name="API chats")).to_have_count(0)  # none yet: no link
    created = await page.request.post("/api/keys", data={"name": "script"})
    assert created.ok, await created.text()
    key = (await created.json())["key"]
    completion = await page.request.post(
        f"{api_url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
        data={"model": "assistant", "max_tokens": 2, "messages": [{"role": "user", "content": "Say hi"}]},
    )
    assert completion.ok, await completion.text()
    made = completion.headers["x-chat-conversation-id"]

    await page.goto("/c")
    await expect(page.locator("#conversations li.conv-item")).to_have_count(1)  # the imported chat only
    await expect(page.locator(f'#conversations a[href="/c/{made}"]')).to_have_count(0)
    await page.get_by_role("link", name="API chats").click()
    await expect(page).to_have_url(re.compile(r"/c\?view=api$"))
    await expect(page.locator(".side-note")).to_contain_text("Chats made with API keys")
    await expect(page.locator("#conversations li.conv-item a")).to_have_attribute("href", f"/c/{made}")
    await shot(page, "chat-list-03-api-chats")
    r = await page.goto("/c?view=everything")
    assert r is not None and r.status == 400
