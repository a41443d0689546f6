"""Fixtures: the whole stack on real servers (embedded PostgreSQL, NATS with JetStream,
Triton with the real model), started once per test session by the launcher that
`chatbot up` uses, on free ports and in a temporary data directory."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatbot.ops.launcher import Stack
from chatbot.ops.servers import MODEL_REPOSITORY, Ports
from chatbot.runtime.config import load_settings
from tests.client import ChatClient

ARTIFACTS = Path(__file__).parent / "artifacts"


def small_kv_cache(config: Path) -> None:
    """8 sequences and a 1 GiB KV cache instead of 32 and 3 GiB: the session's Triton holds
    up to three models at once (chat, the version a test trains, a model a test adds), and
    at 3.4 GiB of KV cache each they, the training and the browser outgrew the machine's
    24 GiB (the kernel killed a model's process). Replies beyond 8 at once wait for a
    slot (the engine queues them)."""
    text = config.read_text()
    for key, value in (("max_num_seqs", "8"), ("kv_cache_mb", "1024")):
        text, n = re.subn(rf'(key: "{key}".*?value: {{ string_value: ")[0-9]+(" }})', rf"\g<1>{value}\g<2>",
                          text, count=1, flags=re.S)
        assert n == 1, f"no {key} parameter in {config}"
    config.write_text(text)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data_dir = tmp_path_factory.mktemp("stack")
    # A short ack wait makes JetStream redeliver a dead worker's request within seconds.
    # Triton serves a copy of the model repository: a test that trains adds versions to it.
    models = tmp_path_factory.mktemp("triton_models")
    shutil.copytree(MODEL_REPOSITORY, models, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    small_kv_cache(models / "chat" / "config.pbtxt")
    settings = dataclasses.replace(
        load_settings(data_dir), ack_wait_s=2.0, messages_per_minute=6, model_repository=models,
        retention_sweep_s=1.0,  # temporary conversations expire within a second of their time
        max_reply_tokens=32,  # the real model writes ~15 tokens/s here: replies stay short
        auth_attempts_per_address=0,  # hundreds of test users register from this one address
    )
    logs = ARTIFACTS / "logs"
    shutil.rmtree(logs, ignore_errors=True)  # each session's logs alone
    stack = Stack(settings, Ports.random(), workers=1, apis=1, log_dir=logs)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def api_url(stack: Stack) -> str:
    return stack.api_urls[0]


@pytest.fixture
async def client(api_url: str) -> ChatClient:
    c = ChatClient(api_url)
    await c.register_and_log_in()
    yield c
    await c.close()


@pytest.fixture
async def other_client(api_url: str) -> ChatClient:
    c = ChatClient(api_url)
    await c.register_and_log_in()
    yield c
    await c.close()


@pytest.fixture(scope="session")
def chat_app(stack: Stack):
    """The write-side application, for checks against the event store itself."""
    from chatbot.eventstore.application import chat_application

    app = chat_application(stack.settings)
    yield app
    app.close()


def pytest_configure(config: pytest.Config) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
