"""Reply quality of the served model, through the whole stack, and held-out loss.

Starts the stack on embedded servers in a temporary directory (as the tests do), with the
model repository as installed (SmolLM2-135M-Instruct) or, with `--model demo`, a copy whose
`chat` model serves the 4 M-parameter demo model instead. Then:
  - a fixed set of prompts with checkable answers, each sent over the websocket to the
    default persona (the assistant, sampled as users get it; the persona check uses the
    pirate), every reply scored by keywords: simple facts, one-word instructions,
    arithmetic, persona adherence, and a two-turn memory check; prints the pass rate per
    category and ten exchanges verbatim;
  - held-out loss on chitchat conversations (the first 100, which the demo model held
    out of its training): mean cross-entropy of the last assistant turn per token and per
    character (tokenizers differ, so only the per-character figure compares models).

Run: `.venv/bin/python bench/quality.py [--model smollm2|demo|both]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
import shutil
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.inference.model import LlamaForCausalLM  # noqa: E402
from chatbot.inference.tokenizer import ChatTokenizer  # noqa: E402
from chatbot.ops.launcher import Stack  # noqa: E402
from chatbot.ops.servers import MODEL_REPOSITORY, Ports  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402
from domain.ids import persona_id_for  # noqa: E402
from tests.client import ChatClient, collect_reply, send  # noqa: E402

MAX_TOKENS = 48
Results = list[tuple[str, list[tuple[str, str]], bool]]  # (category, [(user, bot)], passed)

# (category, turns, any-of keywords that make the last reply a pass); persona checks name
# the persona slug first.
FACTS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is the capital of Germany?", ["berlin"]),
    ("What is the capital of Spain?", ["madrid"]),
    ("Who wrote Romeo and Juliet?", ["shakespeare"]),
    ("What planet do we live on?", ["earth"]),
    ("What is the largest planet in our solar system?", ["jupiter"]),
    ("What gas do plants take in from the air?", ["carbon dioxide", "co2"]),
    ("What is the chemical symbol for water?", ["h2o"]),
    ("How many days are in a week?", ["seven", "7"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("Which animal is known as the king of the jungle?", ["lion"]),
    ("What is the freezing point of water in Celsius?", ["0", "zero"]),
    ("Who painted the Mona Lisa?", ["leonardo", "da vinci"]),
]
INSTRUCTIONS = [
    ("Reply with only the word yes.", ["yes"]),
    ("Say the word hello and nothing else.", ["hello"]),
    ("What is the opposite of hot? Answer in one word.", ["cold"]),
    ("What is the opposite of up? Answer in one word.", ["down"]),
    ("Name a fruit that is yellow. One word only.", ["banana", "lemon"]),
    ("Is the sun hot or cold? One word.", ["hot"]),
    ("Translate 'thank you' into French.", ["merci"]),
    ("Spell the word cat backwards.", ["tac"]),
]
ARITHMETIC = [
    ("What is 2 + 2?", ["4", "four"]),
    ("What is 3 + 5?", ["8", "eight"]),
    ("What is 10 - 4?", ["6", "six"]),
    ("What is 6 times 7?", ["42", "forty-two", "forty two"]),
    ("What is 12 times 7?", ["84", "eighty-four", "eighty four"]),
    ("What is 100 divided by 4?", ["25", "twenty-five", "twenty five"]),
    ("What is 9 + 10?", ["19", "nineteen"]),
    ("What is half of 50?", ["25", "twenty-five", "twenty five"]),
]
PIRATE = r"\b(ahoy|arr+|aye|matey|mateys|captain|pirate|ye|yer|me hearties|seas?|ship|treasure|sail\w*)\b"
PERSONA = [
    ("Hello! Who are you?", PIRATE),
    ("What do you do all day?", PIRATE),
    ("Tell me about your favourite place.", PIRATE),
    ("What should I have for lunch?", PIRATE),
    ("Do you like the ocean?", PIRATE),
]
MEMORY = [
    (["My name is Alice.", "What is my name?"], ["alice"]),
    (["My favourite colour is green.", "What is my favourite colour?"], ["green"]),
    (["I live in Paris.", "Which city do I live in?"], ["paris"]),
    (["I have a dog called Rex.", "What is my dog called?"], ["rex"]),
    (["I am 30 years old.", "How old am I?"], ["30", "thirty"]),
]


def cases() -> list[tuple[str, str, list[str], str | list[str]]]:
    """(category, persona slug, turns, keywords or a pattern)."""
    out: list[tuple[str, str, list[str], str | list[str]]] = []
    out += [("facts", "assistant", [q], k) for q, k in FACTS]
    out += [("instructions", "assistant", [q], k) for q, k in INSTRUCTIONS]
    out += [("arithmetic", "assistant", [q], k) for q, k in ARITHMETIC]
    out += [("persona (pirate)", "pirate", [q], p) for q, p in PERSONA]
    out += [("two-turn memory", "assistant", turns, k) for turns, k in MEMORY]
    return out


def passes(reply: str, expected: str | list[str]) -> bool:
    if isinstance(expected, str):
        return re.search(expected, reply, re.I) is not None
    return any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", reply, re.I) for k in expected)


async def run_cases(url: str) -> Results:
    """Every case through the websocket as a new user: (category, [(user, bot)], passed)."""
    client = ChatClient(url)
    await client.register_and_log_in()
    results = []
    try:
        for category, slug, turns, expected in cases():
            cid = await client.start_conversation(str(persona_id_for(slug)))
            exchange = []
            async with client.ws() as ws:
                for i, text in enumerate(turns):
                    await send(ws, cid, text)
                    _, _, reply = await collect_reply(ws, timeout=300)
                    exchange.append((text, reply["text"]))
                    if i + 1 < len(turns):  # the next turn waits for this reply to be recorded
                        await client.messages_when(cid, lambda ms: len(ms) == 2 * (i + 1) and all(
                            m["status"] != "pending" for m in ms), timeout=60)
            results.append((category, exchange, passes(exchange[-1][1], expected)))
    finally:
        await client.close()
    return results


def heldout(model_dir: Path, conversations: int = 100) -> tuple[float, float, int]:
    """Mean loss of the last assistant turn per token and per character, and the tokens."""
    from chatbot.training.evaluate import heldout_loss

    return heldout_loss(LlamaForCausalLM.from_pretrained(model_dir), ChatTokenizer.from_pretrained(model_dir), conversations)


def repository_for(model: str, tmp: Path) -> Path:
    """The installed repository, or a copy whose `chat` model serves the demo weights."""
    if model == "smollm2":
        return MODEL_REPOSITORY
    copy = tmp / "triton_models"
    shutil.copytree(MODEL_REPOSITORY, copy, ignore=shutil.ignore_patterns("__pycache__", "smollm2", ".*.lock"))
    config = copy / "chat" / "config.pbtxt"
    text = re.sub(r'(key:\s*"model_dir".*?string_value:\s*)"[^"]+"', r'\1"demo"', config.read_text(), flags=re.S)
    text = re.sub(r'(key:\s*"max_seq_len".*?string_value:\s*)"\d+"', r'\1"0"', text, flags=re.S)
    config.write_text(text)
    return copy


def evaluate(model: str) -> None:
    with tempfile.TemporaryDirectory(prefix="chatquality") as tmp:
        repository = repository_for(model, Path(tmp))
        weights = repository / "chat" / "1" / ("smollm2" if model == "smollm2" else "demo")
        per_token, per_char, n = heldout(weights)
        settings = dataclasses.replace(
            load_settings(Path(tmp)), messages_per_minute=1_000_000, tokens_per_day=0, auth_attempts_per_address=0,
            model_repository=repository, max_reply_tokens=MAX_TOKENS,
        )
        stack = Stack(settings, Ports.random(), log_dir=Path(tmp) / "logs")
        print(f"\n== {model}: starting the stack…", flush=True)
        stack.start()
        try:
            results = asyncio.run(run_cases(stack.api_urls[0]))
        finally:
            stack.stop()
    print(f"\nQuality of {model} ({len(results)} prompts, replies of at most {MAX_TOKENS} tokens, "
          "default persona sampling)")
    print(f"{'category':<20} {'passed':>8}")
    for category, oks in by_category(results).items():
        print(f"{category:<20} {sum(oks):>3}/{len(oks):<4} {100 * sum(oks) / len(oks):>5.0f}%")
    total = sum(ok for _, _, ok in results)
    print(f"{'all':<20} {total:>3}/{len(results):<4} {100 * total / len(results):>5.0f}%")
    print(f"held-out loss on 100 chitchat conversations: {per_token:.3f} nats/token, "
          f"{per_char:.3f} nats/character ({n} tokens)")
    print("\nSample exchanges:")
    print_samples(results)



def by_category(results: Results) -> dict[str, list[bool]]:
    """Pass or fail of each prompt, per category, in the order of `cases()`."""
    grouped: dict[str, list[bool]] = defaultdict(list)
    for category, _, ok in results:
        grouped[category].append(ok)
    return dict(grouped)


def print_samples(results: Results, count: int = 10) -> None:
    """`count` exchanges verbatim, spread over the categories (the same prompts every run)."""
    for category, exchange, ok in results[::max(1, len(results) // count)][:count]:
        for text, reply in exchange:
            print(f"  [{category}{'' if ok else ', failed'}] user: {text}\n      bot: {reply.strip()!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "demo", "both"], default="both")
    args = parser.parse_args()
    for model in (["smollm2", "demo"] if args.model == "both" else [args.model]):
        evaluate(model)


if __name__ == "__main__":
    main()
