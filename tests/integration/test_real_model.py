"""What users get from the real model (SmolLM2-135M-Instruct), through the whole stack: a
correct answer to a plain question, and a built-in persona that stays in character. Greedy
(temperature 0) through the OpenAI-compatible API, so the replies are reproducible."""

from __future__ import annotations

import re

import openai
import pytest

from tests.client import ChatClient
from tests.integration.test_openai_api import create_key

pytestmark = pytest.mark.integration


async def ask(api_url: str, client: ChatClient, persona: str, question: str) -> str:
    key = (await create_key(client, f"model-{persona}"))["key"]
    async with openai.AsyncOpenAI(base_url=api_url + "/v1", api_key=key, max_retries=0, timeout=180) as ai:
        completion = await ai.chat.completions.create(
            model=persona, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
        )
    return completion.choices[0].message.content or ""


async def test_the_assistant_knows_the_capital_of_france(api_url: str, client: ChatClient) -> None:
    answer = await ask(api_url, client, "assistant", "What is the capital of France?")
    print("assistant:", answer)
    assert "Paris" in answer


async def test_the_pirate_answers_like_a_pirate(api_url: str, client: ChatClient) -> None:
    answer = await ask(api_url, client, "pirate", "Hello! Who are you?")
    print("pirate:", answer)
    assert re.search(r"\b(ahoy|arr+|aye|matey|captain|pirate|ye|me hearties|seas?|ship)\b", answer, re.I), answer
