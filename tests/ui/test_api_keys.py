"""API keys on the account page, in a real browser: a key made with a name is shown once
(never stored by the browser) with a Copy button, opens `/v1`, then shows its last use; its
setting changes and it is revoked, on a wide screen and on a phone."""

from __future__ import annotations

import re

import httpx
import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.ui.conftest import register, shot
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration
KEY_RE = re.compile(r"^sk-chat-[0-9a-f]{16}-\S+$")


async def models_status(api_url: str, key: str) -> int:
    async with httpx.AsyncClient(base_url=api_url, timeout=30) as http:
        return (await http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})).status_code


async def last_use_shown(page: Page, row_text: str) -> str:
    """Reload the account page until the key's last use is not "never" (it is written in
    the background); the text shown."""
    last_used = page.locator(".key", has_text=row_text).locator(".last-used")

    async def shown() -> str:
        await page.goto("/account")
        return await last_used.inner_text()

    return await async_eventually(shown, until=lambda shown: shown != "never", timeout=10, interval=0.2,
                                  what="the key's last use shown")


async def test_a_key_made_on_the_account_page_is_shown_once_used_changed_and_revoked(
    page: Page, context: BrowserContext, page_errors: list[str], api_url: str
) -> None:
    await context.grant_permissions(["clipboard-read", "clipboard-write"])
    await register(page)
    await page.goto("/account")
    form = page.locator("#key-form")
    await expect(form.get_by_label("List the chats this key starts apart")).to_be_checked()  # on by default
    await form.get_by_label("Name").fill("my script")
    sent = {name: await form.locator(f"input[name={name}]").input_value() for name in ("_csrf", "client_id")}
    async with page.expect_response(lambda r: r.request.method == "POST" and "/account/keys" in r.url) as made:
        await form.get_by_role("button", name="Make a key").click()
    assert (await made.value).headers["cache-control"] == "no-store"

    # Shown once, in the page itself, with a Copy button that copies it whole.
    await expect(page.locator("#new-key")).to_be_in_viewport()  # the page lands on it
    secret = await page.locator("#new-key-secret").inner_text()
    assert KEY_RE.match(secret), secret
    assert secret not in page.url and all(secret not in c["value"] for c in await context.cookies())
    copy = page.get_by_role("button", name="Copy the key")
    await copy.click()
    await expect(copy).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == secret
    row = page.locator(".key", has_text="my script")
    await expect(row.locator(".last-used")).to_have_text("never")
    await expect(row).to_contain_text("its chats listed apart")
    await shot(page, "account-01-new-key")

    # The same form sent again (a reload of that page re-posts it) makes no second key.
    again = await page.request.post("/account/keys", form={**sent, "name": "my script", "list_apart": "on"},
                                    max_redirects=0)
    assert again.status == 303 and again.headers["location"] == "/account#api-keys"
    await page.goto("/account")
    await expect(page.locator("#flash .flash-text")).to_contain_text("was made already and shown once")
    await expect(page.locator(".key")).to_have_count(1)
    await expect(page.locator("#new-key")).to_have_count(0)  # never shown again
    await page.goto("/account/keys")  # the address that page had, visited later
    await expect(page).to_have_url(re.compile(r"/account#api-keys$"))

    # Forms that cannot be used say why, and change nothing.
    csrf = sent["_csrf"]
    for path, form, flash in (
        ("/account/keys", {"_csrf": csrf, "client_id": "another", "name": " "}, "No key was made: name is required."),
        ("/account/keys/0123456789abcdef/revoke", {"_csrf": csrf}, "You have no such key: nothing was revoked."),
    ):
        refused = await page.request.post(path, form=form, max_redirects=0)
        assert refused.status == 303, (path, refused.status)
        await page.goto("/account")
        await expect(page.locator("#flash .flash-text")).to_have_text(flash)
    await expect(page.locator(".key")).to_have_count(1)

    # Used: /v1 opens with it, and the page shows when.
    assert await models_status(api_url, secret) == 200
    assert re.match(r"^\d{1,2} [A-Z][a-z]{2} \d{4}, \d\d:\d\d UTC$", await last_use_shown(page, "my script"))

    # Its chats go into the chat list from now on; then it is revoked.
    await row.get_by_role("button", name="Show its chats in the list").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Chats this key starts will be in your chat list.")
    await expect(row).to_contain_text("its chats in the chat list")
    await expect(row.get_by_role("button", name="List its chats apart")).to_be_visible()
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.goto("/account#api-keys")
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than a phone
    await shot(page, "account-02-keys-phone")
    await page.set_viewport_size({"width": 1200, "height": 800})

    await row.get_by_text("Revoke…").click()
    await row.get_by_role("button", name="Revoke", exact=True).click()
    await expect(page.locator("#flash .flash-text")).to_contain_text("is revoked")
    await expect(row.locator(".badge")).to_have_text("revoked")
    await expect(row.get_by_role("button")).to_have_count(0)
    assert await models_status(api_url, secret) == 401
    await shot(page, "account-03-key-revoked")
    assert page_errors == []
