"""Every page passes axe-core's WCAG 2.0/2.1 A and AA rules, on a wide screen and a phone,
in the light and the dark theme (the system's and the one chosen on the account page).

axe-core comes from npm (the `axe_script` fixture installs it under .cache/axe) and is
injected by Playwright. `add_script_tag` inserts its text inline, which the pages' CSP
(`script-src 'self'`) blocks, so the contexts here bypass the CSP: for the axe run only,
the pages' own markup and styles are the same either way (they have nothing inline)."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, expect

from tests.ui.conftest import register, send_message, shot, start_chat
from tests.ui.test_code_and_maths import export_with_code

pytestmark = pytest.mark.integration

TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
DESKTOP, PHONE = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
# (name, viewport, the system's colour scheme, the theme cookie chosen on the account page)
LOOKS = [
    ("desktop-light", DESKTOP, "light", None),
    ("desktop-dark", DESKTOP, "dark", None),
    ("phone-light", PHONE, "dark", "light"),  # chosen light wins over a dark system
    ("phone-dark", PHONE, "light", "dark"),   # chosen dark wins over a light system
]
RUN_AXE = """async (tags) => {
  const result = await axe.run(document, { runOnly: { type: "tag", values: tags } });
  return result.violations.map((v) => ({
    id: v.id, impact: v.impact, help: v.help,
    nodes: v.nodes.map((n) => ({ target: n.target.join(" "), summary: n.failureSummary })),
  }));
}"""


async def axe_violations(page: Page, axe_script: Path) -> list[dict[str, Any]]:
    await page.add_script_tag(path=str(axe_script))
    return await page.evaluate(RUN_AXE, TAGS)


def describe(where: str, violations: list[dict[str, Any]]) -> list[str]:
    """One line per failing element: page, rule, impact, target and what is wrong."""
    return [
        f"{where}: {v['id']} ({v['impact']}) {n['target']}: {' '.join(n['summary'].split())}"
        for v in violations for n in v["nodes"]
    ]


async def a_user_with_everything(page: Page) -> dict[str, str]:
    """A user with a persona of their own, a chat with a finished reply, and its share link."""
    await register(page)
    await page.goto("/personas/new")
    form = page.locator("#persona-form")
    await form.get_by_label("Name", exact=True).fill("Axe Tester")
    await form.get_by_label("Slug").fill(f"axe-{uuid.uuid4().hex[:8]}")
    await form.get_by_label("Description").fill("Checks pages.")
    await form.get_by_label("System prompt").fill("You answer in one short sentence.")
    await form.get_by_label("Max tokens").fill("8")  # a short reply: the stack writes ~15 tokens/s
    await form.get_by_role("button", name="Create").click()
    await expect(page.locator("#persona-version")).to_have_text("v1")
    persona_id = re.search(r"/personas/([0-9a-f-]{36})/edit", page.url)[1]  # type: ignore[index]
    chat_id = await start_chat(page, "Axe Tester")
    await send_message(page, "Hello!")
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    await page.get_by_label("Chat actions").click()
    await page.get_by_role("button", name="Share a link").click()
    share = await page.locator(".share-link").first.get_attribute("href")
    assert share is not None
    await page.goto("/c")  # and a chat with highlighted code and maths, imported
    await page.set_input_files("#import-form input[name=file]", files=[{
        "name": "conversations.json", "mimeType": "application/json", "buffer": json.dumps(export_with_code()).encode(),
    }])
    await page.locator("#import-form").get_by_role("button", name="Import").click()
    await page.locator("#conversations").get_by_role("link", name="Circle area").click()
    await expect(page.locator("pre code span.k").first).to_be_visible()
    return {"persona": persona_id, "chat": chat_id, "share": share, "code": page.url.rsplit("/", 1)[1]}


async def check_pages(browser: Browser, api_url: str, axe_script: Path, state: Any, made: dict[str, str],
                      look: tuple[str, dict[str, int], str, str | None]) -> list[str]:
    """Every page in one look; the problems found, as lines."""
    name, viewport, scheme, theme = look
    context: BrowserContext = await browser.new_context(
        base_url=api_url, viewport=viewport, color_scheme=scheme,  # type: ignore[arg-type]
        storage_state=state, bypass_csp=True, is_mobile=viewport is PHONE, has_touch=viewport is PHONE,
    )
    if theme:
        await context.add_cookies([{"name": "theme", "value": theme, "url": api_url}])
    problems: list[str] = []
    try:
        page = await context.new_page()
        logged_in = [
            ("list", "/c"), ("chat", f"/c/{made['chat']}"), ("code", f"/c/{made['code']}"), ("personas", "/personas"),
            ("persona-new", "/personas/new"), ("persona-edit", f"/personas/{made['persona']}/edit"),
            ("account", "/account"), ("share", made["share"]), ("not-found", f"/c/{uuid.uuid4()}"),
        ]
        for page_name, path in logged_in:
            await page.goto(path)
            if page_name == "chat":
                await expect(page.locator("#conn.online")).to_be_visible()
                await page.get_by_label("Chat actions").click()  # the menu's controls too
            problems += describe(f"{name} {path}", await axe_violations(page, axe_script))
            if page_name == "list" and viewport is PHONE:  # the chat list, slid out
                await page.locator(".topbar").get_by_title("Chats").click()
                await expect(page.locator("#sidebar")).to_be_visible()
                problems += describe(f"{name} {path} (chat list out)", await axe_violations(page, axe_script))
                await shot(page, f"a11y-{name}-chat-list")
            if page_name in ("chat", "code", "account"):
                await shot(page, f"a11y-{name}-{page_name}")
        await context.clear_cookies()
        if theme:
            await context.add_cookies([{"name": "theme", "value": theme, "url": api_url}])
        for page_name, path in (("login", "/login"), ("register", "/register"), ("not-found", f"/s/{uuid.uuid4()}")):
            await page.goto(path)
            problems += describe(f"{name} {path}", await axe_violations(page, axe_script))
        await shot(page, f"a11y-{name}-not-found")
    finally:
        await context.close()
    return problems


async def test_every_page_passes_axe_at_both_sizes_in_both_themes(
    page: Page, context: BrowserContext, browser: Browser, api_url: str, axe_script: Path
) -> None:
    made = await a_user_with_everything(page)
    state = await context.storage_state()
    problems: list[str] = []
    for look in LOOKS:
        problems += await check_pages(browser, api_url, axe_script, state, made, look)
    assert not problems, "axe found WCAG 2 A/AA violations:\n" + "\n".join(problems)
