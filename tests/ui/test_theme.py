"""The colour theme: the system's by default, or light or dark as chosen on the account
page or in the sidebar (a cookie, so it holds after a reload and before logging in), on a
wide screen and a phone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.ui.conftest import register, shot
from tests.ui.test_accessibility import PHONE

pytestmark = pytest.mark.integration
LIGHT_BG, DARK_BG = "rgb(247, 247, 248)", "rgb(23, 24, 27)"  # --bg of each palette (style.css)


@pytest.fixture(params=["desktop", "phone"])
async def screen(
    request: pytest.FixtureRequest, browser: Browser, api_url: str
) -> AsyncIterator[tuple[Page, str]]:
    phone = request.param == "phone"
    context: BrowserContext = await browser.new_context(
        base_url=api_url, viewport=PHONE if phone else {"width": 1200, "height": 800}, is_mobile=phone,
        has_touch=phone, color_scheme="light",
    )
    yield await context.new_page(), request.param
    await context.close()


async def background(page: Page) -> str:
    return await page.evaluate("getComputedStyle(document.documentElement).backgroundColor")


async def choose_on_the_account_page(page: Page, label: str, note: str) -> None:
    await page.goto("/account")
    await page.locator("#theme-form").get_by_label(label, exact=True).check()
    await page.locator("#theme-form").get_by_role("button", name="Save").click()
    await expect(page).to_have_url("/account")
    await expect(page.locator("#flash .flash-text")).to_have_text(note)


async def test_a_chosen_theme_holds_and_auto_follows_the_system(screen: tuple[Page, str]) -> None:
    page, name = screen
    await register(page)
    assert await background(page) == LIGHT_BG  # the system's (light) to start with
    await page.emulate_media(color_scheme="dark")
    assert await background(page) == DARK_BG  # ... and it follows the system
    await page.emulate_media(color_scheme="light")

    await choose_on_the_account_page(page, "Dark", "The dark theme is on.")
    await page.reload()
    await expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    assert await background(page) == DARK_BG  # dark on a light system
    await expect(page.locator("#theme-form").get_by_label("Dark", exact=True)).to_be_checked()
    await shot(page, f"theme-{name}-account-dark")
    await page.goto("/c")
    await shot(page, f"theme-{name}-list-dark")

    # the sidebar's switch, from the chat list (on a phone, slid out first)
    if name == "phone":
        await page.locator(".topbar").get_by_title("Chats").click()
    switch = page.locator("#theme-switch")
    await expect(switch.get_by_role("button", name="Dark")).to_have_attribute("aria-pressed", "true")
    await switch.get_by_role("button", name="Light").click()
    await expect(page).to_have_url("/c")  # back where it was
    await expect(page.locator("html")).to_have_attribute("data-theme", "light")
    await page.emulate_media(color_scheme="dark")
    assert await background(page) == LIGHT_BG  # light on a dark system
    await shot(page, f"theme-{name}-list-light")

    await choose_on_the_account_page(page, "Follow the system's setting",
                                     "The theme now follows your system's setting.")
    await expect(page.locator("html")).not_to_have_attribute("data-theme", "light")
    assert await background(page) == DARK_BG  # the system's again (dark, emulated)
    await page.emulate_media(color_scheme="light")
    assert await background(page) == LIGHT_BG


async def test_the_theme_holds_before_logging_in(page: Page) -> None:
    await register(page)
    await choose_on_the_account_page(page, "Dark", "The dark theme is on.")
    await page.locator("#sidebar").get_by_role("button", name="Log out").click()
    await expect(page).to_have_url("/login")
    assert await background(page) == DARK_BG
    await shot(page, "theme-login-dark")


async def test_an_unknown_theme_is_refused_and_a_foreign_next_is_ignored(page: Page) -> None:
    await register(page)
    await page.goto("/account")
    token = await page.locator("#theme-form input[name=_csrf]").input_value()
    refused = await page.request.post("/theme", form={"_csrf": token, "theme": "neon", "next": "/account"})
    assert refused.status == 400 and "Choose a theme: system, light or dark." in await refused.text()
    moved = await page.request.post("/theme", form={"_csrf": token, "theme": "dark", "next": "//evil.example/"},
                                    max_redirects=0)
    assert moved.status == 303 and moved.headers["location"] == "/account"
