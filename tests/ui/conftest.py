"""Fixtures for the UI tests: Debian's chromium driven by Playwright against the real stack.

The browser is the distribution's (`/usr/bin/chromium`), not one Playwright downloads: when
it is missing and we may install packages (root with apt-get), it is installed; otherwise
the UI tests are skipped with the reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.conftest import ARTIFACTS
from tests.fakes import node

CHROMIUM = Path("/usr/bin/chromium")
AXE_VERSION = "4.14.1"
AXE = Path(__file__).parents[2] / ".cache" / "axe"  # git-ignored
SCREENSHOTS = ARTIFACTS / "screenshots"
PASSWORD = "correct horse battery"
expect.set_options(timeout=15_000)


def install_chromium() -> str | None:
    """Install Debian's chromium; None when done, else why it could not be."""
    apt = shutil.which("apt-get")
    if apt is None:
        return "apt-get is not available"
    if os.geteuid() != 0:
        return "installing packages needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "-q", "chromium", "fonts-noto-color-emoji"]  # emoji: avatars, buttons
    for attempt in (install, [apt, "update", "-q"], install):
        done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and attempt[1] == "install":
            return None
    return f"apt-get install chromium failed: {done.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def chromium() -> str:
    if not CHROMIUM.exists():
        problem = install_chromium()
        if problem is not None or not CHROMIUM.exists():
            pytest.skip(f"UI tests need Debian's chromium at {CHROMIUM}: {problem or 'not installed'}")
    return str(CHROMIUM)


@pytest.fixture(scope="session")
def axe_script() -> Path:
    """axe-core's script (npm, pinned), installed under .cache/axe when missing."""
    script = AXE / "node_modules" / "axe-core" / "axe.min.js"
    if not script.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("the accessibility check needs npm to install axe-core")
        done = subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(AXE),
                               f"axe-core@{AXE_VERSION}"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and script.exists(), f"npm install axe-core failed: {done.stderr[-500:]}"
    return script


@pytest.fixture(scope="session")
async def browser(chromium: str) -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        # --no-sandbox: chromium refuses its sandbox when run as root (as the tests are here)
        browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        await browser.close()


@pytest.fixture
async def context(browser: Browser, api_url: str) -> AsyncIterator[BrowserContext]:
    context = await browser.new_context(base_url=api_url, viewport={"width": 1200, "height": 800})
    yield context
    await context.close()


@pytest.fixture
async def page(context: BrowserContext) -> Page:
    return await context.new_page()


@pytest.fixture
async def page_errors(page: Page) -> list[str]:
    """Uncaught script errors and dialogs (an `alert` would mean injected script ran)."""
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(f"error: {e}"))

    async def on_dialog(dialog) -> None:  # noqa: ANN001
        errors.append(f"dialog: {dialog.message}")
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    return errors


async def shot(page: Page, name: str) -> Path:
    """Save a screenshot of the page under tests/artifacts/screenshots/."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{re.sub(r'[^a-z0-9_-]+', '-', name.lower())}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    return path


async def register(page: Page) -> str:
    """Register a fresh user through the pages; returns the e-mail address."""
    email = f"ui-{uuid.uuid4().hex[:12]}@example.com"
    await page.goto("/register")
    await page.get_by_label("E-mail").fill(email)
    await page.get_by_label("Password", exact=True).fill(PASSWORD)
    await page.get_by_label("Password again").fill(PASSWORD)
    await page.get_by_role("button", name="Create account").click()
    await expect(page).to_have_url(re.compile(r"/c$"))
    return email


async def start_chat(page: Page, persona_name: str | None = None) -> str:
    """Start a chat from /c (with the named persona); returns the conversation id."""
    if not page.url.endswith("/c"):
        await page.goto("/c")
    if persona_name:
        await page.locator(".persona-option", has_text=persona_name).locator("input").check()
    await page.get_by_role("button", name="Start chat").click()
    await expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}$"))
    await expect(page.locator("#conn.online")).to_be_visible()  # the socket is up
    return page.url.rsplit("/", 1)[1]


async def send_message(page: Page, text: str) -> None:
    await page.get_by_label("Message", exact=True).fill(text)
    await page.get_by_label("Message", exact=True).press("Enter")


def export_of(n: int) -> list[dict]:
    """`n` conversations of one exchange each, titled "Chat 1" to "Chat n"."""
    return [{
        "id": f"list-{i}", "title": f"Chat {i}", "current_node": "a",
        "mapping": {"u": node("u", None, ["a"], "user", f"Question {i}"),
                    "a": node("a", "u", [], "assistant", f"Answer {i}")},
    } for i in range(1, n + 1)]


async def import_chats(page: Page, n: int) -> None:
    """Bring in `n` chats (export_of) through the import form on /c."""
    await page.goto("/c")
    await page.set_input_files("#import-form input[name=file]", files=[{
        "name": "conversations.json", "mimeType": "application/json", "buffer": json.dumps(export_of(n)).encode(),
    }])
    await page.locator("#import-form").get_by_role("button", name="Import").click()
    chats = f"{n} conversation{'s' if n != 1 else ''}"
    await expect(page.locator("#flash .flash-text")).to_have_text(f"Imported {chats}.", timeout=60_000)
