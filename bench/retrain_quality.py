"""Reply quality before and after retraining the real model on its users' consented chats.

The whole loop as an operator runs it, on a stack of its own in a temporary directory whose
model repository is a copy of triton_models/ (hard links where the file system allows: the
trained version is a new folder of the copy, never of the project's repository):
  1. users who consented to training (`PUT /api/me/consent`) chat over the websocket with
     the default persona (the assistant, sampled as users get it): CHATS, ordinary
     requests unlike bench/quality.py's checkable ones, some of two turns; each user
     rates every other reply that ended by itself up and the first few cut off at the
     cap down (a reply that stops mid-sentence is what people dislike most here);
  2. `chatbot dataset export`, then `chatbot train --model chat` (a full fine-tune of
     SmolLM2-135M-Instruct, chatbot/training/finetune.py) into version 2; the held-out loss
     before and after comes from its model card;
  3. bench/quality.py's prompts and scoring on version 1 (nothing rolled out: Triton's
     newest loaded version), then, after `chatbot models rollout chat 2 --percent 100`,
     on version 2; with the held-out chitchat loss of each version's weights. A probe
     reply before each run checks which version wrote it. Side by side: pass rate per
     category and overall, both held-out losses, and the same sample exchanges of each.

The fine-tune learns from the model's own sampled replies (temperature 0.2), thumbs-down
ones left out: it can sharpen what the model already does and teach the reply length the
cap imposed; it cannot teach facts the model lacks. Scores move by a few prompts from run
to run (sampling), so a difference of one or two prompts is noise.

Run: `.venv/bin/python bench/retrain_quality.py [--steps 24] [--lr 5e-5] [--batch-size 8]`
(54 minutes on 2 cores shared with other test suites, load 3-8; an idle machine should
need about a third of that: the replies are most of it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.quality import (  # noqa: E402
    MAX_TOKENS,
    Results,
    by_category,
    heldout,
    print_samples,
    run_cases,
)
from chatbot.ops.launcher import Stack  # noqa: E402
from chatbot.ops.servers import MODEL_REPOSITORY, Ports  # noqa: E402
from chatbot.runtime.config import REPO_ROOT, load_settings  # noqa: E402
from domain.ids import persona_id_for  # noqa: E402
from tests.client import ChatClient, collect_reply, send  # noqa: E402
from workers.rollout import REFRESH_S  # noqa: E402

MODEL = "chat"
USERS = 12  # each chats in CONCURRENT lanes, one conversation after another
CONCURRENT = 4
DOWN_AT_MOST = 6  # thumbs-down: the first replies cut off at the cap, at most this many
CLI_TIMEOUT_S = 1800  # `chatbot train` on 2 shared cores: minutes; a bound, not an estimate

# One conversation each: the turns a user sends, one after another (none of them is one of
# bench/quality.py's prompts).
CHATS: list[list[str]] = [
    ["Can you suggest a name for my new kitten?"],
    ["How do I make a good cup of tea?"],
    ["Give me one tip for staying focused while studying."],
    ["What is a good way to start the morning?"],
    ["I'm planning a trip to the mountains.", "What should I pack?"],
    ["Write a short poem about autumn leaves."],
    ["How can I get better at remembering names?"],
    ["What are some easy vegetables to grow at home?"],
    ["Explain what a rainbow is in simple words."],
    ["I can't sleep well lately.", "What could help me relax before bed?"],
    ["Recommend a hobby I can do indoors."],
    ["How do I politely say no to a friend?"],
    ["What is a healthy snack for the afternoon?"],
    ["Tell me a fun fact about octopuses."],
    ["How should I prepare for a job interview?"],
    ["I want to learn to cook.", "What is a simple first recipe?"],
    ["Why do cats purr?"],
    ["Give me an idea for a birthday present for my sister."],
    ["How can I save a little money each month?"],
    ["What is a good stretch after sitting all day?"],
    ["Describe the ocean in two sentences."],
    ["I'm nervous about speaking in public.", "How do I calm down before a talk?"],
    ["What makes a good friend?"],
    ["How do I clean a cast iron pan?"],
    ["Suggest a board game for a family evening."],
    ["What should I read if I like mystery stories?"],
    ["How do bees make honey?"],
    ["I just moved to a new city.", "How can I meet new people?"],
    ["Write a one-line thank-you note to a teacher."],
    ["What is the best way to water houseplants?"],
    ["How can I stop procrastinating?"],
    ["Tell me something interesting about the moon."],
    ["What is a nice thing to do on a rainy day?"],
    ["My phone battery drains fast.", "What settings should I change?"],
    ["How do I start running if I'm a beginner?"],
    ["Why is it important to drink water?"],
    ["Give me a simple breakfast idea."],
    ["How do I write a good email subject line?"],
    ["What are clouds made of?"],
    ["I want to learn a new language.", "How much should I practise each day?"],
    ["Suggest a name for a small bakery."],
    ["How can I be kinder to myself?"],
    ["What is a good way to organise my desk?"],
    ["Tell me a short joke about computers."],
    ["How do plants know which way is up?"],
    ["I'm bored at home this weekend.", "Any ideas for something creative?"],
    ["What should I keep in a first aid kit?"],
    ["How do I make my handwriting neater?"],
]


@dataclasses.dataclass
class Chatted:
    """What the consenting users did: replies, how they ended, ratings given."""

    conversations: int = 0
    replies: int = 0
    finish: Counter[str] = dataclasses.field(default_factory=Counter)
    ratings: Counter[str] = dataclasses.field(default_factory=Counter)


def copy_repository(tmp: Path) -> Path:
    """The project's model repository, hard-linked file by file (copied where links fail)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    copy = tmp / "triton_models"
    shutil.copytree(MODEL_REPOSITORY, copy, copy_function=link,
                    ignore=shutil.ignore_patterns("__pycache__", ".*.lock", ".staging-*"))
    extra = sorted(p.name for p in (copy / MODEL).iterdir() if p.is_dir() and p.name != "1")
    assert not extra, f"triton_models/{MODEL} holds versions {extra}: this bench starts from version 1 alone"
    return copy


async def consenting_user(url: str) -> ChatClient:
    client = ChatClient(url)
    await client.register_and_log_in()
    r = await client.http.put("/api/me/consent", json={"training": True}, headers=client.headers)
    assert r.status_code == 200 and r.json() == {"training": True}, r.text
    return client


async def rate(client: ChatClient, conversation: str, reply_id: str, rating: str) -> None:
    r = await client.http.post(f"/api/conversations/{conversation}/messages/{reply_id}/feedback",
                               json={"rating": rating}, headers=client.headers)
    assert r.status_code == 204, r.text


async def converse(client: ChatClient, turns: list[str], index: int, chatted: Chatted) -> None:
    """One conversation with the default persona, its replies rated as the docstring says."""
    conversation = await client.start_conversation(str(persona_id_for("assistant")))
    async with client.ws() as ws:
        for i, text in enumerate(turns):
            await send(ws, conversation, text)
            accepted, _, reply = await collect_reply(ws, timeout=300)
            assert reply["finish_reason"] in {"stop", "length"}, reply
            chatted.replies += 1
            chatted.finish[reply["finish_reason"]] += 1
            rating = None
            if reply["finish_reason"] == "length" and chatted.ratings["down"] < DOWN_AT_MOST:
                rating = "down"
            elif reply["finish_reason"] == "stop" and (index + i) % 2 == 0:
                rating = "up"
            if rating:
                chatted.ratings[rating] += 1  # counted before the await: other lanes read it meanwhile
                await rate(client, conversation, accepted["reply_id"], rating)
            if i + 1 < len(turns):  # the next turn follows the recorded reply
                await client.messages_when(conversation, lambda ms, n=2 * (i + 1): len(ms) == n and all(
                    m["status"] != "pending" for m in ms), timeout=60)
    chatted.conversations += 1


async def chat_with_consent(url: str) -> Chatted:
    """USERS consenting users share CHATS, CONCURRENT of them chatting at a time."""
    chatted = Chatted()
    lanes = asyncio.Semaphore(CONCURRENT)

    async def user(u: int) -> None:
        async with lanes:
            client = await consenting_user(url)
            try:
                for index in range(u, len(CHATS), USERS):
                    await converse(client, CHATS[index], index, chatted)
            finally:
                await client.close()

    await asyncio.gather(*(user(u) for u in range(USERS)))
    return chatted


async def served_version(url: str) -> str:
    """The model version that writes a new reply of the default persona now (a probe)."""
    client = ChatClient(url)
    await client.register_and_log_in()
    try:
        conversation = await client.start_conversation(str(persona_id_for("assistant")))
        async with client.ws() as ws:
            await send(ws, conversation, "Hello!")
            await collect_reply(ws, timeout=300)
        messages = await client.messages_when(conversation, lambda ms: len(ms) == 2 and ms[1]["model"], timeout=60)
        return str(messages[1]["model"])
    finally:
        await client.close()


def cli(stack: Stack, *args: str) -> str:
    """`chatbot ARGS` against the stack, as an operator runs it; its stdout."""
    env = {**os.environ, **stack.settings.to_env()}
    proc = subprocess.run([sys.executable, "-m", "chatbot.ops.cli", *args], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S)
    if proc.returncode != 0:
        raise SystemExit(f"chatbot {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def measure(stack: Stack, version: str, weights: Path) -> tuple[Results, tuple[float, float, int]]:
    """bench/quality.py's cases on the version the stack serves now, and its chitchat loss."""
    served = asyncio.run(served_version(stack.api_urls[0]))
    assert served == f"{MODEL}/{version}", f"replies come from {served}, not {MODEL}/{version}"
    started = time.monotonic()
    results = asyncio.run(run_cases(stack.api_urls[0]))
    print(f"  {len(results)} prompts on version {version} in {time.monotonic() - started:.0f} s", flush=True)
    return results, heldout(weights)


def side_by_side(before: Results, after: Results, losses: dict[str, tuple[float, float]]) -> None:
    """Pass rate per category and overall, and the losses, of version 1 and version 2."""
    print(f"\n{'':<34} {'version 1':>12} {'version 2':>12}")
    a, b = by_category(before), by_category(after)
    for category in a:
        cells = [f"{sum(oks):>2}/{len(oks):<2} {100 * sum(oks) / len(oks):>4.0f}%" for oks in (a[category], b[category])]
        print(f"{category:<34} {cells[0]:>12} {cells[1]:>12}")
    totals = [f"{sum(ok for *_, ok in r):>2}/{len(r):<2} {100 * sum(ok for *_, ok in r) / len(r):>4.0f}%"
              for r in (before, after)]
    print(f"{'all':<34} {totals[0]:>12} {totals[1]:>12}")
    for name, (v1, v2) in losses.items():
        print(f"{name:<34} {v1:>12.3f} {v2:>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps of `chatbot train` (default 24)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (default 5e-5)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per step (default 8)")
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1 or not 0.0 < args.lr < 1.0:
        parser.error("--steps and --batch-size are at least 1, --lr between 0 and 1")
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chatretrain") as tmp:
        repository = copy_repository(Path(tmp))
        settings = dataclasses.replace(
            load_settings(Path(tmp)), messages_per_minute=1_000_000, tokens_per_day=0, auth_attempts_per_address=0,
            model_repository=repository, max_reply_tokens=MAX_TOKENS,
        )
        stack = Stack(settings, Ports.random(), log_dir=Path(tmp) / "logs")
        print("starting the stack…", flush=True)
        stack.start()
        try:
            started = time.monotonic()
            chatted = asyncio.run(chat_with_consent(stack.api_urls[0]))
            print(f"  {chatted.conversations} conversations, {chatted.replies} replies by consenting users in "
                  f"{time.monotonic() - started:.0f} s", flush=True)
            data = Path(tmp) / "chats.jsonl"
            cli(stack, "dataset", "export", "-o", str(data), "--quiet")
            started = time.monotonic()
            card = json.loads(cli(stack, "train", "--model", MODEL, "--data", str(data), "--max-steps", str(args.steps),
                                  "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--json"))
            trained_s = time.monotonic() - started
            assert card["version"] == "2" and card["base_version"] == "1", card
            print(f"  version 2 trained in {trained_s:.0f} s", flush=True)
            before = measure(stack, "1", repository / MODEL / "1" / "smollm2")
            cli(stack, "models", "rollout", MODEL, "2", "--percent", "100")
            time.sleep(2 * REFRESH_S + 1)  # every worker has seen the rollout
            after = measure(stack, "2", repository / MODEL / "2" / "smollm2")
        finally:
            stack.stop()
    report(chatted, card, trained_s, before, after, time.monotonic() - began)


def report(chatted: Chatted, card: dict[str, Any], trained_s: float, before: tuple[Results, tuple[float, float, int]],
           after: tuple[Results, tuple[float, float, int]], seconds: float) -> None:
    d, m, t = card["data"], card["metrics"], card["training"]
    h = t["hyperparameters"]
    print(f"\nRetraining SmolLM2-135M-Instruct on its users' consented chats (default persona, replies of at most "
          f"{MAX_TOKENS} tokens)")
    print(f"chats: {chatted.conversations} conversations, {chatted.replies} replies "
          f"({chatted.finish['stop']} ended by themselves, {chatted.finish['length']} cut off at the cap), "
          f"rated {chatted.ratings['up']} up and {chatted.ratings['down']} down")
    print(f"export: {d['records']} records in {d['conversations']} conversations; trained on {d['train_records']}, "
          f"held out {d['heldout_records']}, left out {d['excluded'] or 'none'}")
    print(f"train: full fine-tune, {t['steps']} steps of {h['batch_size']} records, lr {h['lr']:g} "
          f"({h['schedule']}), {t['train_tokens']} target tokens, {t['seconds']:.0f} s in training "
          f"({trained_s:.0f} s for the command); training loss {m['train_loss_first']:.3f} first step, "
          f"{m['train_loss_last']:.3f} last steps")
    (r1, (_, c1, _)), (r2, (_, c2, _)) = before, after
    side_by_side(r1, r2, {
        f"held-out replies, nats/token ({m['heldout_tokens']})": (m["heldout_loss_before"], m["heldout_loss_after"]),
        "held-out chitchat, nats/character": (c1, c2),
    })
    for version, results in (("1", r1), ("2", r2)):
        print(f"\nSample exchanges, version {version}:")
        print_samples(results, 6)
    print(f"\nwhole run: {seconds / 60:.1f} minutes")


if __name__ == "__main__":
    main()
