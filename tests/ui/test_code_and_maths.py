"""Code highlighted and maths drawn by the server, and copy buttons, in a real browser:
a reply with a code block and formulas, brought in by importing an export."""

from __future__ import annotations

import json

import pytest
from playwright.async_api import BrowserContext, Page, expect

from tests.fakes import node
from tests.ui.conftest import register, shot

pytestmark = pytest.mark.integration
CODE = "def area(r):\n    return 3.14159 * r ** 2"
REPLY = f"Here is the code:\n\n```python\n{CODE}\n```\n\nThe area is $\\pi r^2$, and\n\n$$A = \\frac{{C^2}}{{4\\pi}}$$"


def export_with_code() -> list[dict]:
    mapping = {
        "u": node("u", None, ["a"], "user", "How do I compute the area of a circle in Python?"),
        "a": node("a", "u", [], "assistant", REPLY),
    }
    return [{"id": "code-and-maths", "title": "Circle area", "mapping": mapping, "current_node": "a"}]


async def test_a_reply_shows_highlighted_code_and_maths_and_copies_them(
    page: Page, context: BrowserContext, page_errors: list[str]
) -> None:
    await context.grant_permissions(["clipboard-read", "clipboard-write"])
    await register(page)
    await page.set_input_files("#import-form input[name=file]", files=[{
        "name": "conversations.json", "mimeType": "application/json", "buffer": json.dumps(export_with_code()).encode(),
    }])
    await page.locator("#import-form").get_by_role("button", name="Import").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Imported 1 conversation.")
    await page.locator("#conversations").get_by_role("link", name="Circle area").click()

    await expect(page.locator(".turn.greeting")).to_have_count(0)  # an imported chat never had the greeting
    reply = page.locator(".turn.assistant .msg").last
    await expect(reply.locator("pre code span.k")).to_have_text(["def", "return"])  # highlighted: the keywords
    assert await reply.locator("pre code span.k").first.evaluate("e => getComputedStyle(e).fontWeight") == "700"
    inline, block = reply.locator('math[display="inline"]'), reply.locator('math[display="block"]')
    await expect(inline).to_be_visible()
    await expect(block.locator("mfrac")).to_have_count(1)
    assert (await inline.bounding_box())["width"] > 10  # drawn by the browser, not left as "$...$"
    assert "$" not in await reply.inner_text()
    await shot(page, "chat-07-code-and-maths")

    await reply.get_by_role("button", name="Copy code").click()
    await expect(reply.get_by_role("button", name="Copy code")).to_have_text("Copied")
    assert await page.evaluate("navigator.clipboard.readText()") == CODE + "\n"
    turn = page.locator(".turn.assistant").last
    await turn.get_by_role("button", name="Copy message").click()
    copied = await page.evaluate("navigator.clipboard.readText()")
    assert copied.startswith("Here is the code:") and "return 3.14159" in copied
    assert page_errors == []
