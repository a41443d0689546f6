"""The pages on a phone (390 x 844): the page's own content first, the chat list sliding
out from a "Chats" button (no script needed), nothing wider than the screen."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.ui.conftest import import_chats, register, shot
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration
WIDTH, HEIGHT = 390, 844


@pytest.fixture
async def phone(browser: Browser, api_url: str) -> AsyncIterator[Page]:
    context: BrowserContext = await browser.new_context(
        base_url=api_url, viewport={"width": WIDTH, "height": HEIGHT}, is_mobile=True, has_touch=True,
    )
    page = await context.new_page()
    yield page
    await context.close()


async def no_sideways_scroll(page: Page) -> None:
    assert await page.evaluate("document.documentElement.scrollWidth") <= WIDTH


async def test_on_a_phone_the_chat_list_slides_out_and_the_page_comes_first(phone: Page) -> None:
    page = phone
    await register(page)
    await import_chats(page, 12)  # chats with messages: a chat left empty is not listed
    listed = await (await page.request.get("/api/conversations")).json()
    chats = [c["id"] for c in reversed(listed)]  # oldest first, as if started one by one

    await page.goto("/c")
    for first_screen in (page.get_by_role("heading", name="Start a chat"), page.get_by_label("First message")):
        box = await first_screen.bounding_box()  # the page's own content first, not the chat list
        assert box is not None and box["y"] + box["height"] <= HEIGHT / 2, box
    sidebar = page.locator("#sidebar")
    await expect(sidebar).to_be_hidden()
    for card in await page.locator(".persona-option").all():
        box = await card.bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= WIDTH, box
    await no_sideways_scroll(page)
    await shot(page, "phone-01-new-chat")

    await page.locator(".topbar").get_by_title("Chats").click()
    await expect(sidebar).to_be_visible()
    box = await async_eventually(sidebar.bounding_box, until=lambda box: box is not None and box["x"] == 0,
                                 timeout=1, interval=0.02, what="the chat list slid in all the way")
    assert box is not None and box["width"] <= WIDTH, box
    await expect(page.locator(f'#conversations a[href="/c/{chats[-1]}"]')).to_be_in_viewport(ratio=1)
    await shot(page, "phone-02-chat-list")
    await page.mouse.click(WIDTH - 20, HEIGHT // 2)  # the backdrop beside the list closes it
    await expect(sidebar).to_be_hidden()

    await page.goto(f"/c/{chats[0]}")
    await expect(page.locator("#input")).to_be_in_viewport()
    await page.locator(".chat-head").get_by_label("Chats").click()
    await expect(sidebar).to_be_visible()
    await page.keyboard.press("Escape")  # (with the script) Esc closes it too
    await expect(sidebar).to_be_hidden()
    await page.locator(".chat-head").get_by_label("Chats").click()
    await page.locator(f'#conversations a[href="/c/{chats[1]}"]').click()
    await expect(page).to_have_url(re.compile(f"/c/{chats[1]}$"))
    await no_sideways_scroll(page)
    await shot(page, "phone-03-chat")

    for path in ("/personas", "/personas/new", "/account"):
        await page.goto(path)
        await expect(sidebar).to_be_hidden()
        await no_sideways_scroll(page)
