"""The chat by keyboard: a new chat is ready to type in, a skip link leads past the chat
list to the message box, and the chat's menu closes with Esc or a click elsewhere."""

from __future__ import annotations

import re

import pytest
from playwright.async_api import Page, expect

from tests.ui.conftest import register, send_message, start_chat

pytestmark = pytest.mark.integration


async def test_the_message_box_is_reached_at_once_and_the_menu_closes_with_esc(
    page: Page, page_errors: list[str]
) -> None:
    await register(page)
    await start_chat(page)
    await expect(page.locator("#input")).to_be_focused()  # a new chat: ready to type
    await send_message(page, "Hello!")
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)

    await page.reload()  # a chat with messages: nothing is focused, so the keyboard starts at the top
    await page.keyboard.press("Tab")
    skip = page.get_by_role("link", name="Skip to content")
    await expect(skip).to_be_focused()
    await expect(skip).to_be_visible()  # shown while focused
    await page.keyboard.press("Enter")
    presses = 0
    while not await page.locator("#input").evaluate("e => e === document.activeElement") and presses < 3:
        await page.keyboard.press("Tab")
        presses += 1
    await expect(page.locator("#input")).to_be_focused()  # after at most 3 presses, not 50

    menu = page.locator("#chat-actions")
    await page.get_by_label("Chat actions").click()
    await expect(menu).to_have_attribute("open", "")
    await page.keyboard.press("Escape")
    await expect(menu).not_to_have_attribute("open", "")
    await expect(page.get_by_label("Chat actions")).to_be_focused()
    await page.get_by_label("Chat actions").click()
    await expect(menu).to_have_attribute("open", "")
    await page.locator("#thread").click(position={"x": 20, "y": 20})
    await expect(menu).not_to_have_attribute("open", "")
    assert page_errors == []


async def test_a_chat_starts_by_typing_its_first_message(page: Page, page_errors: list[str]) -> None:
    await register(page)  # lands on /c
    box = page.get_by_label("First message")
    await expect(box).to_be_focused()  # ready to type in, persona choice beside it
    await page.keyboard.type("Hello there!")
    await page.locator(".persona-option", has_text="Captain Flint").locator("input").check()
    await page.get_by_role("button", name="Start chat").click()
    await expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    await expect(page.locator(".turn.user .msg")).to_have_text("Hello there!")
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    await expect(page.locator(".turn.assistant .who")).to_contain_text("Captain Flint")
    await expect(page.locator("#conversations li")).to_have_count(1)  # no empty chat left behind
    assert page_errors == []
