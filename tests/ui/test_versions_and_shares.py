"""Issue 15's smaller asks in a real browser: a persona version viewed and restored (a new
version, nothing deleted); a share link copied, listed with all of a user's links, and
stopped from that list; the edit box focused, with Cancel and Esc; and branches switched
in place, without the page reloading. At 1200 x 800, and on a phone at 390 x 844."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from domain.persona import Persona
from tests.ui.conftest import register, send_message, shot, start_chat

pytestmark = pytest.mark.integration
PHONE = {"width": 390, "height": 844}


@pytest.fixture
async def phone(browser: Browser, api_url: str) -> AsyncIterator[Page]:
    context = await browser.new_context(base_url=api_url, viewport=PHONE, is_mobile=True, has_touch=True)
    yield await context.new_page()
    await context.close()


def short_talker(chat_app) -> str:  # noqa: ANN001
    """A public persona whose replies stop after a few tokens: these tests need replies to
    be there, not to be long."""
    name = f"Brief {uuid.uuid4().hex[:6]}"
    chat_app.save(Persona(
        slug=f"brief-{uuid.uuid4().hex[:8]}", name=name, description="answers in a few words",
        system_prompt="You are a friendly AI assistant. Give short, correct answers.", greeting="Hello.",
        model="chat", temperature=0.9, top_p=0.95, max_tokens=6,
    ))
    return name


async def chat_with_a_reply(page: Page, persona: str, text: str = "Hello there") -> str:
    """A fresh user's chat with one message and its (short) reply; returns the chat's id."""
    await register(page)
    conversation_id = await start_chat(page, persona)
    await send_message(page, text)
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    return conversation_id


async def create_persona(page: Page, name: str) -> str:
    """Create a persona through its form; returns its id (the edit page it lands on)."""
    await page.goto("/personas/new")
    form = page.locator("#persona-form")
    await form.get_by_label("Name", exact=True).fill(name)
    await form.get_by_label("Slug").fill(f"pal-{uuid.uuid4().hex[:8]}")
    await form.get_by_label("System prompt").fill("You are a calm librarian.")
    await form.get_by_label("Conversation starters").fill("Recommend a book")
    await form.get_by_label("Temperature").fill("0.4")
    await form.get_by_role("button", name="Create").click()
    await expect(page.locator("#persona-version")).to_have_text("v1")
    return re.search(r"/personas/([0-9a-f-]{36})/edit", page.url).group(1)


async def share_from_the_menu(page: Page) -> str:
    """Share the open chat from its menu (the page waits for the read models); returns the
    newest link's URL."""
    await page.get_by_label("Chat actions").click()
    await page.get_by_role("button", name="Share a link").click()
    await expect(page.locator("#flash .flash-text")).to_contain_text("Anyone with this link can read the chat")
    return await page.locator(".share-link").last.get_attribute("href")


async def no_sideways_scroll(page: Page) -> None:
    assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]


async def test_a_persona_version_is_viewed_and_restored_as_a_new_version(page: Page, page_errors: list[str]) -> None:
    await register(page)
    name = f"Librarian {uuid.uuid4().hex[:6]}"
    persona_id = await create_persona(page, name)
    form = page.locator("#persona-form")
    await form.get_by_label("Name", exact=True).fill("Loud Librarian")
    await form.get_by_label("System prompt").fill("You are a very loud librarian.")
    await form.get_by_label("Conversation starters").fill("")
    await form.get_by_label("Temperature").fill("1.1")
    await form.get_by_role("button", name="Save").click()
    await expect(page.locator("#persona-version")).to_have_text("v2")
    await expect(page.locator("#version-2 .badge")).to_have_text("current")
    await expect(page.locator("#version-2").get_by_role("button", name="Restore this version")).to_have_count(0)

    # v1 as it was, every field, behind its summary
    first = page.locator("#version-1")
    await expect(first.locator(".version-fields")).to_be_hidden()
    await first.locator("summary").click()
    fields = first.locator(".version-fields")
    await expect(fields).to_be_visible()
    for shown in (name, "You are a calm librarian.", "Recommend a book", "0.4", "private", "chat"):
        await expect(fields).to_contain_text(shown)
    await shot(page, "versions-01-viewed")

    await first.get_by_role("button", name="Restore this version").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Restored v1 as v3.")
    await expect(page.locator("#persona-version")).to_have_text("v3")
    await expect(form.get_by_label("Name", exact=True)).to_have_value(name)
    await expect(form.get_by_label("System prompt")).to_have_value("You are a calm librarian.")
    await expect(form.get_by_label("Conversation starters")).to_have_value("Recommend a book")
    await expect(form.get_by_label("Temperature")).to_have_value("0.4")
    await expect(page.locator("#versions > li")).to_have_count(3)  # nothing deleted
    await shot(page, "versions-02-restored")

    # v1 once more: the persona is that already, so nothing is recorded
    await page.locator("#version-1 summary").click()
    await page.locator("#version-1").get_by_role("button", name="Restore this version").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("The persona is as v1 was already: nothing changed.")
    await expect(page.locator("#persona-version")).to_have_text("v3")

    # a version that never was: 404, on the page route and in the API
    token = await page.locator('input[name="_csrf"]').first.input_value()
    missing = await page.request.post(f"/personas/{persona_id}/versions/9/restore", form={"_csrf": token})
    assert missing.status == 404 and "no version 9 (it has 1 to 3)" in await missing.text()  # named
    missing = await page.request.post(f"/api/personas/{persona_id}/versions/9/restore")
    assert missing.status == 404 and "no version 9" in (await missing.json())["detail"]
    restored = await page.request.post(f"/api/personas/{persona_id}/versions/2/restore")
    assert restored.ok, await restored.text()
    assert ((await restored.json())["version"], (await restored.json())["name"]) == (4, "Loud Librarian")
    assert page_errors == []


async def test_a_share_link_is_copied_listed_with_the_others_and_stopped_there(
    page: Page, context: BrowserContext, page_errors: list[str], chat_app, api_url: str
) -> None:
    await context.grant_permissions(["clipboard-read", "clipboard-write"])
    conversation_id = await chat_with_a_reply(page, short_talker(chat_app), "Tell me about lighthouses")
    link = await share_from_the_menu(page)
    await page.get_by_label("Chat actions").click()
    assert re.fullmatch(re.escape(api_url.rstrip("/")) + r"/s/[0-9a-f-]{36}", link), link  # the full URL
    copy = page.locator("#chat-actions").get_by_role("button", name="Copy the link")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == link
    await shot(page, "shares-01-copied-in-the-menu")

    # the list of all the user's links: a second chat's link is there too, newest first
    await page.evaluate("navigator.clipboard.writeText('')")
    await start_chat(page)
    second = await share_from_the_menu(page)
    await page.get_by_role("link", name="Shared", exact=True).click()
    await expect(page).to_have_url(re.compile(r"/shares$"))
    items = page.locator("#share-list .share-item")
    await expect(items).to_have_count(2)
    await expect(items.first.locator(".share-link")).to_have_attribute("href", second)
    mine = items.filter(has=page.locator(f'a[href="{link}"]'))
    await expect(mine.locator(".share-title")).to_have_attribute("href", f"/c/{conversation_id}")
    await mine.get_by_role("button", name="Copy the link").click()
    await expect(mine.get_by_role("button", name="Copy the link")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == link
    await shot(page, "shares-02-list")

    await mine.get_by_role("button", name="Stop sharing").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("That link no longer works.")
    await expect(items).to_have_count(1)
    assert (await page.request.get(link)).status == 404
    await items.get_by_role("button", name="Stop sharing").click()
    await expect(page.locator("#no-shares")).to_be_visible()
    await page.goto("/account")  # the account page leads there too
    await page.locator("#shares-link").click()
    await expect(page).to_have_url(re.compile(r"/shares$"))
    assert page_errors == []


async def test_on_a_phone_the_share_links_and_versions_fit_the_screen(phone: Page) -> None:
    page = phone
    await register(page)
    await start_chat(page)
    await share_from_the_menu(page)
    await page.goto("/shares")
    await expect(page.locator("#share-list .share-item")).to_have_count(1)
    await expect(page.get_by_role("button", name="Copy the link")).to_be_visible()
    await expect(page.get_by_role("button", name="Stop sharing")).to_be_in_viewport()
    await no_sideways_scroll(page)
    await shot(page, "phone-shares")

    await create_persona(page, "Pocket Librarian")
    await page.locator("#persona-form").get_by_label("Temperature").fill("0.9")
    await page.locator("#persona-form").get_by_role("button", name="Save").click()
    await expect(page.locator("#persona-version")).to_have_text("v2")
    await page.locator("#version-1 summary").click()
    await expect(page.locator("#version-1").get_by_role("button", name="Restore this version")).to_be_visible()
    await no_sideways_scroll(page)
    await shot(page, "phone-versions")


async def check_the_edit_box(page: Page, text: str) -> None:
    """Edit focuses the text at its end; Cancel, then Esc, close it and put the text back."""
    user = page.locator(".turn.user").last
    box, area = user.locator("details.edit"), user.get_by_label("Edited message")
    await user.locator(".edit summary").click()
    await expect(area).to_be_focused()
    assert await area.evaluate("a => [a.selectionStart, a.selectionEnd]") == [len(text), len(text)]
    await page.keyboard.type(" and more")
    await expect(area).to_have_value(f"{text} and more")
    await expect(user.get_by_role("button", name="Cancel")).to_be_visible()
    await shot(page, f"edit-01-open-{page.viewport_size['width']}")
    await user.get_by_role("button", name="Cancel").click()
    await expect(box).not_to_have_attribute("open", "")
    await expect(user.locator(".edit summary")).to_be_focused()

    await user.locator(".edit summary").click()
    await expect(area).to_have_value(text)  # what Cancel put back
    await expect(area).to_be_focused()
    await page.keyboard.type(" again")
    await page.keyboard.press("Escape")
    await expect(box).not_to_have_attribute("open", "")
    await expect(area).to_have_value(text)


async def test_the_edit_box_takes_focus_and_cancel_or_esc_put_the_text_back(
    page: Page, phone: Page, page_errors: list[str], chat_app
) -> None:
    persona = short_talker(chat_app)
    await chat_with_a_reply(page, persona)
    await check_the_edit_box(page, "Hello there")
    await chat_with_a_reply(phone, persona, "Hi from a phone")
    await check_the_edit_box(phone, "Hi from a phone")
    await no_sideways_scroll(phone)
    assert page_errors == []


async def test_branches_switch_in_place_without_a_reload(
    page: Page, browser: Browser, api_url: str, page_errors: list[str], chat_app
) -> None:
    conversation_id = await chat_with_a_reply(page, short_talker(chat_app))
    first = await page.locator(".turn.assistant").last.get_attribute("data-message-id")
    await page.locator(".turn.assistant").last.get_by_role("button", name="Regenerate").click()
    reply = page.locator(".turn.assistant").last
    await expect(reply.locator(".branch-pos")).to_have_text("2/2", timeout=60_000)
    second = await reply.get_attribute("data-message-id")
    assert second != first

    await page.evaluate("window.__marker = 'same page'")  # gone if the page were loaded again
    await reply.get_by_role("button", name="Previous version").click()
    await expect(page.locator(".turn.assistant").last.locator(".branch-pos")).to_have_text("1/2")
    await expect(page.locator(".turn.assistant").last).to_have_attribute("data-message-id", first)
    await expect(page).to_have_url(re.compile(rf"/c/{conversation_id}#m-{first}$"))
    await expect(page.locator(f"#m-{first}")).to_be_in_viewport()
    await expect(page.locator(f"#m-{first}").get_by_role("button", name="Next version")).to_be_focused()
    assert await page.evaluate("window.__marker") == "same page"
    await shot(page, "branches-switched-in-place")
    await page.locator(".turn.assistant").last.get_by_role("button", name="Next version").click()
    await expect(page.locator(".turn.assistant").last.locator(".branch-pos")).to_have_text("2/2")
    await expect(page.locator(".turn.assistant").last).to_have_attribute("data-message-id", second)
    assert await page.evaluate("window.__marker") == "same page"

    # without the script the form posts and the page loads again, at the switched message
    plain = await browser.new_context(base_url=api_url, java_script_enabled=False,
                                      storage_state=await page.context.storage_state())
    still = await plain.new_page()
    await still.goto(f"/c/{conversation_id}")
    await still.locator(".turn.assistant").last.get_by_role("button", name="Previous version").click()
    await expect(still).to_have_url(re.compile(rf"/c/{conversation_id}#m-{first}$"))
    await expect(still.locator(".turn.assistant").last.locator(".branch-pos")).to_have_text("1/2")
    await plain.close()
    assert page_errors == []
