"""Personas and message trees in a real browser: create and edit a persona (every save a
version) and chat with it; resume a reply after a reload, stop it, regenerate it, edit a
message, and move between the branches with < n/m >."""

from __future__ import annotations

import re
import uuid

import pytest
from playwright.async_api import Page, expect

from domain.persona import Persona
from tests.ui.conftest import register, send_message, shot, start_chat

pytestmark = pytest.mark.integration


async def test_a_user_creates_a_persona_edits_it_and_chats_with_it(page: Page, page_errors: list[str]) -> None:
    await register(page)
    await page.get_by_role("link", name="Personas").click()
    await page.get_by_role("link", name="+ New persona").click()
    name, slug = f"Quiz Master {uuid.uuid4().hex[:6]}", f"quiz-{uuid.uuid4().hex[:8]}"
    form = page.locator("#persona-form")
    await form.get_by_label("Name", exact=True).fill(name)
    await form.get_by_label("Avatar").fill("QM")
    await form.get_by_label("Slug").fill(slug)
    await form.get_by_label("Description").fill("Asks you questions.")
    await form.get_by_label("System prompt").fill("You are a quiz master. Ask {{user_name}} one question at a time.")
    await form.get_by_label("Greeting").fill("Ready for a quiz?")
    await form.get_by_label("Conversation starters").fill("Ask me a question\nAnother one")
    await form.get_by_role("button", name="Create").click()
    await expect(page.locator("#flash .flash-text")).to_have_text(f"Created {name}.")
    await expect(page.locator("#persona-version")).to_have_text("v1")

    # an edit the server refuses comes back with the reason, and the form keeps what was typed
    await form.get_by_label("Conversation starters").fill("\n".join(f"Question {i}" for i in range(7)))
    await form.get_by_label("Greeting").fill("Ready for a **hard** quiz?")
    await form.get_by_role("button", name="Save").click()
    await expect(page.locator("#form-error")).to_have_text("Starters are at most 6 texts of 1 to 200 characters")
    await expect(form.get_by_label("Greeting")).to_have_value("Ready for a **hard** quiz?")
    await form.get_by_label("Conversation starters").fill("Ask me a question\nAnother one")
    await form.get_by_role("button", name="Save").click()
    await expect(page.locator("#flash .flash-text")).to_have_text("Saved a new version.")
    await expect(page.locator("#persona-version")).to_have_text("v2")
    await expect(page.locator("#versions li")).to_have_count(2)
    await shot(page, "persona-01-edited")

    await page.goto("/personas")
    card = page.locator(".persona-card", has_text=name)
    await expect(card.locator(".badge")).to_have_text("private")
    await card.get_by_role("button", name="Chat").click()
    await expect(page.locator(".hero-name")).to_have_text(name)
    await expect(page.locator(".greeting strong")).to_have_text("hard")  # Markdown, rendered
    await expect(page.locator("#conn.online")).to_be_visible()
    await page.get_by_role("button", name="Ask me a question").click()
    await expect(page.locator(".turn.user .msg")).to_have_text("Ask me a question")
    await expect(page.locator('.turn.assistant[data-status="complete"] .who')).to_contain_text(name, timeout=60_000)
    await shot(page, "persona-02-chat")
    assert page_errors == []


def long_talker(chat_app) -> str:  # noqa: ANN001
    """A public persona whose replies run for hundreds of tokens, so Stop lands mid-reply."""
    name = f"Long Talker {uuid.uuid4().hex[:6]}"
    persona = Persona(
        slug=f"long-talker-{uuid.uuid4().hex[:8]}", name=name, description="talks at length",
        system_prompt="You are a helpful, friendly assistant.", greeting="Hello.", model="chat",
        temperature=0.8, top_p=0.95, max_tokens=448, min_tokens=448,  # near the 512-token context
    )
    chat_app.save(persona)
    return name


async def stop_when_streaming(page: Page) -> str:
    """Wait for text to stream into the pending reply, press Stop; returns the stopped text."""
    pending = page.locator(".msg.assistant.pending")
    await expect(pending).to_have_text(re.compile(r"\S"), timeout=60_000)
    await page.get_by_role("button", name="Stop").click()
    stopped = page.locator('.turn.assistant[data-status="complete"]').last
    await expect(stopped.locator(".note")).to_have_text("stopped", timeout=60_000)
    await expect(page.get_by_role("button", name="Send")).to_be_visible()
    return await stopped.locator(".msg").inner_text()


async def test_a_reply_is_stopped_regenerated_and_edited_and_the_branches_are_browsed(
    page: Page, page_errors: list[str], chat_app
) -> None:
    name = long_talker(chat_app)
    await register(page)
    await start_chat(page, name)
    conversation_id = page.url.rsplit("/", 1)[1]
    # a reload mid-reply picks it up again (the text so far, then the rest): nothing lost or doubled
    await send_message(page, "Tell me a story.")
    await expect(page.locator(".msg.assistant.pending")).to_have_text(re.compile(r"\S"), timeout=60_000)
    await page.reload()
    await expect(page.locator('.turn.assistant[data-status="complete"]')).to_have_count(1, timeout=60_000)
    stored = await (await page.request.get(f"/api/conversations/{conversation_id}/messages")).json()
    shown = await page.locator('.turn.assistant[data-status="complete"] .msg').inner_text()
    assert " ".join(shown.split()) == " ".join(stored[-1]["text"].split())

    await send_message(page, "Tell me a very long story.")
    first = await stop_when_streaming(page)
    assert first.strip()
    await shot(page, "branches-01-stopped")

    # regenerate: a second reply beside the first
    await page.locator(".turn.assistant").last.get_by_role("button", name="Regenerate").click()
    await expect(page.locator(".msg.assistant.pending")).to_have_count(1)
    second = await stop_when_streaming(page)
    reply = page.locator(".turn.assistant").last
    await expect(reply.locator(".branch-pos")).to_have_text("2/2")
    await reply.get_by_role("button", name="Previous version").click()
    await expect(page.locator(".turn.assistant").last.locator(".branch-pos")).to_have_text("1/2")
    assert await page.locator(".turn.assistant").last.locator(".msg").inner_text() == first
    await page.locator(".turn.assistant").last.get_by_role("button", name="Next version").click()
    await expect(page.locator(".turn.assistant").last.locator(".branch-pos")).to_have_text("2/2")
    assert await page.locator(".turn.assistant").last.locator(".msg").inner_text() == second
    await shot(page, "branches-02-regenerated")

    # edit the question: a new branch with its own reply (the first question keeps its one)
    user = page.locator(".turn.user").last
    await user.locator(".edit summary").click()
    await user.get_by_label("Edited message").fill("Tell me a short story instead.")
    await user.get_by_role("button", name="Save & submit").click()
    await stop_when_streaming(page)
    user = page.locator(".turn.user").last
    await expect(user.locator(".msg")).to_have_text("Tell me a short story instead.")
    await expect(user.locator(".branch-pos")).to_have_text("2/2")
    await expect(page.locator(".turn.assistant").last.locator(".branch-pos")).to_have_count(0)  # one reply
    await user.get_by_role("button", name="Previous version").click()
    user = page.locator(".turn.user").last
    await expect(user.locator(".msg")).to_have_text("Tell me a very long story.")
    await expect(page.locator(".turn.user").first.locator(".branch-pos")).to_have_count(0)
    await expect(user.locator(".branch-pos")).to_have_text("1/2")
    await expect(page.locator(".turn.assistant").last.locator(".branch-pos")).to_have_text("2/2")
    await shot(page, "branches-03-edited")
    assert page_errors == []
