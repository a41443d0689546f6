"""Retraining, end to end on the real stack: users chat with and without consent, the
export keeps only what they consented to (scrubbed), a few fine-tuning steps make version
2, which is loaded into the running Triton and rolled out to every new reply while chats
keep flowing, then rolled back, without one reply failing."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
import tritonclient.grpc as grpcclient

from chatbot.ops.launcher import Stack
from chatbot.runtime.config import REPO_ROOT
from domain.persona import Persona
from domain.user import User
from tests.client import ChatClient, collect_reply, send
from tests.waiting import async_eventually
from workers.rollout import REFRESH_S

pytestmark = pytest.mark.integration

SECRET_EMAIL = "alice.secret@example.com"
SECRET_PHONE = "+1 555 867 5309"


def short_persona(chat_app: Any, slug: str) -> str:
    """A persona whose replies are short but never empty: quick to generate, always a record."""
    persona = Persona(slug=f"{slug}-{uuid.uuid4().hex[:8]}", name=slug, description="", greeting="",
                      system_prompt="You are a helpful, friendly assistant.", model="chat",
                      temperature=0.8, top_p=0.95, max_tokens=10, min_tokens=3)
    chat_app.save(persona)
    return str(persona.id)


async def user(api_url: str, consent: bool | None = None) -> ChatClient:
    c = ChatClient(api_url)
    await c.register_and_log_in()
    if consent is not None:
        r = await c.http.put("/api/me/consent", json={"training": consent}, headers=c.headers)
        assert r.status_code == 200 and r.json() == {"training": consent}, r.text
    return c


async def chat(c: ChatClient, conversation_id: str, *texts: str) -> list[str]:
    """Send each text in turn; returns the reply ids."""
    replies = []
    async with c.ws() as ws:
        for text in texts:
            await send(ws, conversation_id, text)
            accepted, _, reply = await collect_reply(ws)
            assert reply["text"].strip()
            replies.append(accepted["reply_id"])
    return replies


async def cli(stack: Stack, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run `chatbot ARGS` against the stack, without blocking the event loop (chats go on)."""
    env = {**os.environ, **stack.settings.to_env()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "chatbot.ops.cli", *args, env=env, cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


class SteadyLoad:
    """Chats running the whole time: `lanes` loops, each taking turns over its users so no
    user passes the stack's 6 messages a minute. Each reply: (sent at, reply id, conversation)."""

    def __init__(self, lanes: list[list[tuple[ChatClient, str]]]) -> None:
        self.lanes = lanes
        self.done: list[tuple[float, str, str]] = []
        self.failures: list[str] = []
        self.stop = asyncio.Event()

    async def lane(self, users: list[tuple[ChatClient, str]]) -> None:
        sockets = [await c.ws().__aenter__() for c, _ in users]
        try:
            n = 0
            while not self.stop.is_set():
                for ws, (_, conversation_id) in zip(sockets, users):
                    if self.stop.is_set():
                        break
                    sent = time.monotonic()
                    n += 1
                    try:
                        await send(ws, conversation_id, f"Tell me something nice, number {n}.")
                        accepted, _, reply = await collect_reply(ws, timeout=60)
                        assert reply["finish_reason"] in {"stop", "length"}, reply
                        self.done.append((sent, accepted["reply_id"], conversation_id))
                    except Exception as e:  # noqa: BLE001 - counted, and the test fails on any
                        self.failures.append(f"{type(e).__name__}: {e}")
                    await asyncio.sleep(max(0.0, 2.7 - (time.monotonic() - sent)))  # each user every ~11 s
        finally:
            for ws in sockets:
                await ws.close()

    def replies_sent_after(self, moment: float) -> list[tuple[float, str, str]]:
        return [d for d in self.done if d[0] > moment]

    async def until(self, moment: float, count: int, timeout: float = 90) -> None:
        def replies() -> int:
            n = len(self.replies_sent_after(moment))
            assert n >= count or not self.failures, self.failures
            return n

        await async_eventually(replies, until=lambda n: n >= count, timeout=timeout, interval=0.2,
                               what=f"{count} replies to messages sent after {moment:.1f}")


def recorded_versions(chat_app: Any, replies: list[tuple[float, str, str]]) -> list[str]:
    """The model version each reply's `ReplyCompleted` recorded (its status if it has none)."""
    versions = []
    for _, reply_id, conversation_id in replies:
        reply = chat_app.repository.get(UUID(conversation_id)).replies[UUID(reply_id)]
        versions.append(reply.get("model_version") if reply["status"] == "complete" else reply["status"])
    return versions


def worker_retries(stack: Stack, reply_ids: set[str]) -> list[str]:
    """The worker's log lines about retrying or giving up on any of `reply_ids` (read from
    the log file the launcher holds open, which another test session may have unlinked)."""
    lines, read = [], 0
    for name, child in stack.children.items():
        log = getattr(child, "_log_file", None)
        if name.startswith("worker") and log is not None:
            read += 1
            log.flush()
            text = Path(f"/proc/self/fd/{log.fileno()}").read_text(errors="replace")
            assert "consuming reply requests" in text, f"{name}'s log is not the one this session writes"
            lines += [line for line in text.splitlines()
                      if ("retrying" in line or "giving up" in line) and any(r in line for r in reply_ids)]
    assert read, "no worker log to read: the stack runs without log files"
    return lines


def triton_states(stack: Stack) -> dict[str, str]:
    client = grpcclient.InferenceServerClient(stack.settings.triton_urls[0])
    try:
        index = client.get_model_repository_index(as_json=True)["models"]
    finally:
        client.close()
    return {m["version"]: m.get("state", "") for m in index if m["name"] == "chat"}


async def test_consented_chats_train_a_new_version_that_rolls_out_and_back_without_a_failed_reply(
    stack: Stack, api_url: str, chat_app: Any, tmp_path: Path,
) -> None:
    persona = short_persona(chat_app, "retrain")
    other_persona = short_persona(chat_app, "retrain-other")
    other_slug = chat_app.get_persona(UUID(other_persona)).slug

    # -- consent: the API, its validation, and the events ----------------------------------
    alice, bob, carol = await user(api_url), await user(api_url), await user(api_url, consent=True)
    assert (await alice.get("/api/me")).json()["training_consent"] is False  # opt-in
    early = await alice.start_conversation(persona)
    await chat(alice, early, "Written before I opted in.")
    for body in ({"training": "yes"}, {}, {"training": True, "extra": 1}):
        r = await alice.http.put("/api/me/consent", json=body, headers=alice.headers)
        assert r.status_code == 400, (body, r.text)
    async with httpx.AsyncClient(base_url=api_url) as anonymous:  # no token, no session cookie
        assert (await anonymous.put("/api/me/consent", json={"training": True})).status_code == 401
    r = await alice.http.put("/api/me/consent", json={"training": True}, headers=alice.headers)
    assert r.status_code == 200 and (await alice.get("/api/me")).json()["training_consent"] is True
    changes = [e.training for e in chat_app.events.get(UUID(alice.user_id)) if isinstance(e, User.TrainingConsentChanged)]
    assert changes == [True]

    # -- chats, feedback --------------------------------------------------------------------
    shared = await alice.start_conversation(persona)
    up, down, unrated = await chat(alice, shared, f"Hi! Mail me at {SECRET_EMAIL} or call {SECRET_PHONE}.",
                                   "What do you like to do on weekends?", "Do you have any pets?")
    other = await alice.start_conversation(other_persona)
    (other_reply,) = await chat(alice, other, "Tell me about the sea.")
    for reply_id, rating, comment in ((up, "up", ""), (down, "down", f"write to {SECRET_EMAIL}")):
        r = await alice.http.post(f"/api/conversations/{shared}/messages/{reply_id}/feedback",
                                  json={"rating": rating, "comment": comment}, headers=alice.headers)
        assert r.status_code == 204, r.text
    bobs = await bob.start_conversation(persona)
    await chat(bob, bobs, "Bob never opted in.")
    carols = await carol.start_conversation(persona)
    await chat(carol, carols, "Carol opted in, then out.")
    r = await carol.http.put("/api/me/consent", json={"training": False}, headers=carol.headers)
    assert r.status_code == 200 and r.json() == {"training": False}

    # -- export -----------------------------------------------------------------------------
    data = tmp_path / "chats.jsonl"
    code, _, err = await cli(stack, "dataset", "export", "-o", str(data))
    assert code == 0, err
    assert "scanning events" in err and "conversations" in err  # the progress bars
    text = data.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert {r["conversation"] for r in records} == {shared, other}  # no early, bob's or carol's chats
    assert {r["id"] for r in records} == {up, down, unrated, other_reply}
    assert SECRET_EMAIL not in text and "867 5309" not in text
    first = next(r for r in records if r["id"] == up)
    assert first["messages"][0] == {"role": "system", "content": "You are a helpful, friendly assistant."}
    assert first["messages"][1] == {"role": "user", "content": "Hi! Mail me at [email] or call [phone]."}
    assert first["feedback"] == {"rating": "up", "comment": ""}
    last = next(r for r in records if r["id"] == unrated)
    assert [m["role"] for m in last["messages"]] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert last["feedback"] is None and last["model"] == "chat/1"
    assert next(r for r in records if r["id"] == down)["feedback"] == {"rating": "down", "comment": "write to [email]"}
    code, _, err = await cli(stack, "dataset", "export", "-o", str(tmp_path / "up.jsonl"), "--rating", "up", "--quiet")
    assert code == 0 and [json.loads(x)["id"] for x in (tmp_path / "up.jsonl").read_text().splitlines()] == [up]
    code, _, _ = await cli(stack, "dataset", "export", "-o", str(tmp_path / "p.jsonl"), "--persona", other_slug, "--quiet")
    assert code == 0 and [json.loads(x)["id"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == [other_reply]
    code, _, err = await cli(stack, "dataset", "export", "-o", str(tmp_path / "x.jsonl"), "--since", "last week")
    assert code == 2 and "ISO 8601" in err

    # -- train --------------------------------------------------------------------------------
    code, out, err = await cli(stack, "train", "--data", str(data), "--max-steps", "3", "--batch-size", "4", "--json")
    assert code == 0, err
    card = json.loads(out)
    version_dir = stack.settings.model_repository / "chat" / "2"
    assert card["version"] == "2" and card["base_version"] == "1" and Path(card["path"]) == version_dir
    assert card["data"]["records"] == 4 and card["data"]["excluded"] == {"rated down": 1}
    assert card["data"]["train_records"] + card["data"]["heldout_records"] == 3
    assert all(isinstance(card["metrics"][k], float) for k in ("heldout_loss_before", "heldout_loss_after"))
    assert (version_dir / "model.py").is_file() and (version_dir / "smollm2" / "model.safetensors").is_file()
    assert (version_dir / "MODEL_CARD.md").is_file()
    assert not (REPO_ROOT / "triton_models" / "chat" / "2").exists()  # the repository's own models untouched

    # -- rollout to 100 % and back, with chats going all the while --------------------------------
    lanes = []
    for _ in range(3):
        lane = []
        for _ in range(4):
            c = await user(api_url)
            lane.append((c, await c.start_conversation(persona)))
        lanes.append(lane)
    load = SteadyLoad(lanes)
    tasks = [asyncio.create_task(load.lane(lane)) for lane in lanes]
    try:
        await load.until(0.0, 3)
        before_rollout = time.monotonic()
        code, out, err = await cli(stack, "models", "rollout", "chat", "2", "--percent", "100")
        assert code == 0, err
        rolled_out = time.monotonic()
        await load.until(rolled_out + REFRESH_S + 0.5, 4)
        code, out, err = await cli(stack, "models", "list", "--json")
        assert code == 0, err
        (listed,) = [m for m in json.loads(out) if m["model"] == "chat"]
        shares = {v["version"]: (v["triton"], v["share"]) for v in listed["versions"]}
        assert shares == {"1": ("READY", 0.0), "2": ("READY", 100.0)}
        assert {"assistant", "pirate", "tutor"} <= {p["slug"] for p in listed["personas"] if not p["pinned"]}
        assert listed["versions"][1]["base_version"] == "1"

        before_rollback = time.monotonic()
        code, out, err = await cli(stack, "models", "rollback", "chat")
        assert code == 0, err
        rolled_back = time.monotonic()
        await load.until(rolled_back + REFRESH_S + 0.5, 4)
    finally:
        load.stop.set()
        await asyncio.gather(*tasks)
        for lane in lanes:
            for c, _ in lane:
                await c.close()
        for c in (alice, bob, carol):
            await c.close()

    assert not load.failures, load.failures
    assert worker_retries(stack, {d[1] for d in load.done}) == []  # not even a failure retried away
    assert all(v in {"1", "2"} for v in recorded_versions(chat_app, load.done)), recorded_versions(chat_app, load.done)
    assert set(recorded_versions(chat_app, [d for d in load.done if d[0] < before_rollout])) == {"1"}
    on_candidate = [d for d in load.done if rolled_out + REFRESH_S + 0.5 < d[0] < before_rollback]
    assert len(on_candidate) >= 4 and set(recorded_versions(chat_app, on_candidate)) == {"2"}
    after = load.replies_sent_after(rolled_back + REFRESH_S + 0.5)
    assert len(after) >= 4 and set(recorded_versions(chat_app, after)) == {"1"}
    state = chat_app.model_rollout("chat")
    assert (state["stable"], state["candidate"], state["percent"]) == ("1", None, 0.0)
    assert triton_states(stack).get("2") != "READY" and triton_states(stack)["1"] == "READY"
    code, _, err = await cli(stack, "models", "rollback", "chat")
    assert code == 1 and "no version of 'chat' is being rolled out" in err
    print(f"\nretraining: {len(load.done)} replies under load, rollout {rolled_out - before_rollout:.1f} s, "
          f"rollback {rolled_back - before_rollback:.1f} s, {len(on_candidate)} replies on version 2; "
          f"held-out loss {card['metrics']['heldout_loss_before']:.3f} -> {card['metrics']['heldout_loss_after']:.3f}, "
          f"training {card['training']['seconds']} s")
