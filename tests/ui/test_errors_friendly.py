"""Errors people can read and dismiss: a paste over the message limit is kept whole and
warned about (with the script) or refused in a sentence (without it); the script's banners
are announced, close with their × and with Esc; the server's flash closes from the
keyboard; a bad import file is explained. On a wide screen and a phone, axe-checked."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.ui.conftest import register, send_message, shot, start_chat
from tests.ui.test_accessibility import PHONE, axe_violations, describe

pytestmark = pytest.mark.integration
LIMIT = 8000  # the stack's max_message_chars (the default)
OVER = "Your message is 8,001 characters long; the limit is 8,000. Shorten it or split it into two messages"


@pytest.fixture(params=["desktop", "phone"])
async def screen(
    request: pytest.FixtureRequest, browser: Browser, api_url: str
) -> AsyncIterator[tuple[Page, str, list[str]]]:
    """A page at either size, allowed to use the clipboard (the paste), CSP bypassed for axe;
    its name, and the script errors it reports."""
    size = PHONE if request.param == "phone" else {"width": 1280, "height": 800}
    context: BrowserContext = await browser.new_context(
        base_url=api_url, viewport=size, is_mobile=request.param == "phone", has_touch=request.param == "phone",
        bypass_csp=True, permissions=["clipboard-read", "clipboard-write"],
    )
    page, errors = await context.new_page(), list[str]()
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page, request.param, errors
    await context.close()


async def paste(page: Page, box_selector: str, text: str) -> None:
    """Paste `text` into the box as a person would: the clipboard, then Ctrl+V."""
    await page.evaluate("(t) => navigator.clipboard.writeText(t)", text)
    await page.locator(box_selector).focus()
    await page.keyboard.press("ControlOrMeta+V")


async def no_axe_violations(page: Page, axe_script: Path, where: str) -> None:
    problems = describe(where, await axe_violations(page, axe_script))
    assert not problems, "\n".join(problems)


async def test_a_paste_over_the_limit_is_kept_whole_and_warned_about(
    screen: tuple[Page, str, list[str]], axe_script: Path
) -> None:
    page, name, page_errors = screen
    await register(page)
    long_text = "x" * (LIMIT + 1)

    # the first message of a new chat (/c)
    await paste(page, "#first-message", long_text)
    await expect(page.locator("#first-message")).to_have_value(long_text)  # nothing cut
    note = page.locator(".over-limit")
    await expect(note).to_be_visible()
    await expect(note).to_contain_text(OVER)
    await expect(note).to_contain_text("nothing was cut")
    await page.get_by_role("button", name="Start chat").click()
    await expect(page).to_have_url(re.compile(r"/c$"))  # not sent
    await expect(page.locator("#first-message")).to_be_focused()
    await no_axe_violations(page, axe_script, f"{name} /c over the limit")
    await shot(page, f"errors-{name}-first-message-over-limit")
    await page.locator("#first-message").press("End")
    await page.locator("#first-message").press("Backspace")
    await expect(note).to_be_hidden()

    # the chat's message box
    await page.locator("#first-message").fill("")
    await start_chat(page)
    await paste(page, "#input", long_text)
    await expect(page.locator("#input")).to_have_value(long_text)
    await expect(page.locator(".over-limit")).to_contain_text(OVER)
    await expect(page.locator("#send")).to_be_disabled()
    await page.locator("#input").press("Enter")
    await expect(page.locator(".turn.user")).to_have_count(0)  # nothing sent
    await no_axe_violations(page, axe_script, f"{name} chat over the limit")
    await shot(page, f"errors-{name}-composer-over-limit")
    await page.locator("#input").fill("Hello!")
    await expect(page.locator(".over-limit")).to_be_hidden()
    await expect(page.locator("#send")).to_be_enabled()
    assert page_errors == []


async def test_without_the_script_a_message_over_the_limit_is_refused_in_a_sentence(
    browser: Browser, api_url: str
) -> None:
    context = await browser.new_context(base_url=api_url, java_script_enabled=False)
    try:
        page = await context.new_page()
        await register(page)
        await page.locator("#first-message").fill("y" * (LIMIT + 1))
        await page.get_by_role("button", name="Start chat").click()
        await expect(page.locator("#error-message")).to_have_text(
            "Your message is 8,001 characters long; the limit is 8,000. Shorten it.")
        await expect(page.get_by_role("link", name="Go back")).to_have_attribute("href", "/c")
        await page.get_by_role("link", name="Your chats").click()
        await expect(page.locator("#conversations a")).to_have_count(0)  # no chat left behind
    finally:
        await context.close()


async def a_retired_persona_chat(page: Page) -> str:
    """A chat with a persona of the user's own, retired since: it answers no more."""
    await page.goto("/personas/new")
    form = page.locator("#persona-form")
    name = f"Gone {uuid.uuid4().hex[:6]}"
    await form.get_by_label("Name", exact=True).fill(name)
    await form.get_by_label("Slug").fill(f"gone-{uuid.uuid4().hex[:8]}")
    await form.get_by_label("System prompt").fill("You answer briefly.")
    await form.get_by_role("button", name="Create").click()
    await expect(page.locator("#persona-version")).to_have_text("v1")
    edit = page.url
    await start_chat(page, name)
    chat = page.url
    await page.goto(edit)
    await page.get_by_text("Retire…").click()
    await page.get_by_role("button", name=f"Retire {name}").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Persona retired.")
    await page.goto(chat)
    await expect(page.locator("#conn.online")).to_be_visible()
    return name


async def test_a_refusal_over_the_socket_is_a_banner_that_closes_with_its_x_or_esc(
    screen: tuple[Page, str, list[str]], axe_script: Path
) -> None:
    page, name, page_errors = screen
    await register(page)
    persona = await a_retired_persona_chat(page)

    await send_message(page, "Are you there?")
    banner = page.locator("#flash")
    await expect(banner).to_have_attribute("role", "alert")
    await expect(banner.locator(".flash-text")).to_have_text(
        f"The persona '{persona}' was retired by its creator and answers no more messages; "
        "start a new chat with another persona.")
    await expect(page.locator("#input")).to_have_value("Are you there?")  # given back, to send elsewhere
    await no_axe_violations(page, axe_script, f"{name} chat with a banner")
    await shot(page, f"errors-{name}-banner")
    await banner.get_by_role("button", name="Dismiss this message").click()
    await expect(banner).to_have_count(0)

    await page.locator("#input").press("Enter")  # refused again: a new banner
    await expect(banner).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(banner).to_have_count(0)
    assert page_errors == []


async def test_the_servers_notice_closes_from_the_keyboard(page: Page) -> None:
    await register(page)
    await page.goto("/account")
    await page.get_by_label("Dark", exact=True).check()
    await page.locator("#theme-form").get_by_role("button", name="Save").click()
    flash = page.locator("#flash")
    await expect(flash).to_have_text(re.compile("The dark theme is on."))
    await page.keyboard.press("Tab")  # the skip link first, then the notice's ×
    await page.keyboard.press("Tab")
    await expect(flash.get_by_label("Dismiss")).to_be_focused()
    await page.keyboard.press("Space")  # a checkbox drawn as ×: no script needed
    await expect(flash).to_have_css("display", "none")  # gone, not faded (a notice fades by itself)

    await page.reload()  # (the flash is one-shot) a new one, closed with Esc this time
    await page.get_by_label("Light", exact=True).check()
    await page.locator("#theme-form").get_by_role("button", name="Save").click()
    await expect(flash).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(flash).to_have_css("display", "none")


@pytest.mark.parametrize("content, says", [
    (b"{not json", "That file is not JSON: choose the conversations.json of a ChatGPT export, "
                   "or a file this app exported."),
    (b'{"hello": "world"}', "Nothing in that file could be imported: choose the conversations.json of a "
                            "ChatGPT export, or a file this app exported."),
])
async def test_a_bad_import_file_is_explained_in_a_sentence(
    page: Page, tmp_path: Path, content: bytes, says: str
) -> None:
    await register(page)
    upload = tmp_path / "conversations.json"
    upload.write_bytes(content)
    await page.locator("#import-form input[type=file]").set_input_files(str(upload))
    await page.locator("#import-form").get_by_role("button", name="Import").click()
    await expect(page.locator("#error-message")).to_have_text(says)
    await expect(page.get_by_role("heading", name="That did not work")).to_be_visible()
    await page.get_by_role("link", name="Go back").click()
    await expect(page).to_have_url(re.compile(r"/c$"))
