"""`chatbot models add`: a user's own checkpoint, a folder or a GGUF file, served by the
running stack as a model that personas can name."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from chatbot.inference.default_model import CACHE, GGUF_MEMBER
from chatbot.ops.launcher import Stack
from tests.client import ChatClient, collect_reply, send
from tests.fakes import tiny_qwen2

pytestmark = pytest.mark.integration


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.settings.to_env()}
    return subprocess.run([sys.executable, "-m", "chatbot.ops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=300)


async def test_an_added_checkpoint_is_served_to_a_persona_that_names_it(
    stack: Stack, client: ChatClient, tmp_path: Path
) -> None:
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    persona = {"slug": f"tiny-{uuid.uuid4().hex[:6]}", "name": "Tiny", "system_prompt": "Be brief.",
               "model": name, "max_tokens": 8}
    refused = await client.http.post("/api/personas", json=persona, headers=client.headers)
    assert refused.status_code == 400 and "served models" in refused.text  # not in the repository yet

    checkpoint = await asyncio.to_thread(tiny_qwen2, tmp_path / "checkpoint")
    added = await asyncio.to_thread(cli, stack, "models", "add", str(checkpoint), "--name", name, "--json")
    assert added.returncode == 0, added.stderr
    card = json.loads(added.stdout)
    assert card["version"] == "1" and card["architecture"] == "Qwen2ForCausalLM"
    assert card["loaded_in"] == list(stack.settings.triton_urls)  # loaded into the running Triton

    r = await client.http.post("/api/personas", json=persona, headers=client.headers)
    assert r.status_code == 201, r.text
    conversation_id = await client.start_conversation(r.json()["id"])
    async with client.ws() as ws:
        await send(ws, conversation_id, "Hello")
        _, _, reply = await collect_reply(ws)
    assert reply["type"] == "reply" and reply["finish_reason"] in {"stop", "length"}, reply
    messages = await client.messages_when(conversation_id, lambda ms: len(ms) == 2 and ms[1]["status"] == "complete")
    assert messages[1]["model"] == f"{name}/1"  # written by the added model, not the default one


def test_a_gguf_file_is_converted_checked_and_added_and_a_broken_one_refused(stack: Stack, tmp_path: Path) -> None:
    gguf = CACHE / Path(GGUF_MEMBER).name
    if not gguf.is_file():
        pytest.fail(f"the default model's GGUF is not in {CACHE}: run `make model`")
    repository = tmp_path / "models"
    shutil.copytree(stack.settings.model_repository, repository,
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors", "[2-9]*"))
    added = cli(stack, "models", "add", str(gguf), "--name", "smol", "--no-load",
                "--model-repository", str(repository), "--json")
    assert added.returncode == 0, added.stderr
    card = json.loads(added.stdout)
    assert card["architecture"] == "LlamaForCausalLM" and 130_000_000 < card["parameters"] < 140_000_000
    assert card["loaded_in"] == []
    assert (repository / "smol" / "1" / "weights" / "model.safetensors").is_file()

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[:1_000_000])
    refused = cli(stack, "models", "add", str(truncated), "--name", "broken", "--model-repository", str(repository))
    assert refused.returncode != 0 and "chatbot models add:" in refused.stderr
    assert not (repository / "broken").exists()
