"""Fine-tune a served model on exported chat records (`chatbot train`).

Design notes
- Supervised fine-tuning, one example per record: the prompt is the record's turns up to
  the reply rendered with the model's own chat template and generation prompt, exactly
  as the worker sends it to Triton; the target is the reply and its end-of-turn token. The
  loss is on the target tokens only (the turns were written by people or by earlier
  replies, which have records of their own). Prompt and target are tokenized apart, the
  way serving sees them: the prompt as one string, then token by token.
- Thumbs-down replies are not trained on (imitating what people disliked is the opposite
  of the point); they are counted in the model card. Replies without a rating are.
- A held-out split by conversation (records of one conversation never straddle it) gives
  the loss before and after on replies the training never saw: the mean cross-entropy per
  target token, over all of them, deterministic.
- Steps, not wall time: `max_steps` batches of `batch_size` records, AdamW with a short
  warmup and cosine decay to 10%, gradient clipping at 1.0. The tokenizer is the base's,
  unchanged, so the worker's prompt fitting and the engine see the same vocabulary.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chatbot.inference.model import LlamaForCausalLM
from chatbot.inference.tokenizer import ChatTokenizer

IGNORE = -100


class FinetuneError(Exception):
    pass


@dataclass
class Example:
    conversation: str
    ids: list[int]  # prompt + target, at most the context window
    labels: list[int]  # IGNORE on the prompt, the token ids on the target


@dataclass
class FinetuneResult:
    records: int = 0
    train_examples: int = 0
    heldout_examples: int = 0
    excluded: dict[str, int] = field(default_factory=dict)
    heldout_tokens: int = 0
    heldout_loss_before: float = float("nan")
    heldout_loss_after: float = float("nan")
    train_loss_first: float = float("nan")
    train_loss_last: float = float("nan")  # mean of the last 10% of steps
    steps: int = 0
    train_tokens: int = 0
    seconds: float = 0.0
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encode(
    tokenizer: ChatTokenizer, messages: list[dict[str, str]], context: int, ended: bool = True,
) -> tuple[list[int], list[int]] | None:
    """(ids, labels) of one record, or None if the reply alone fills the context window.
    `ended`: the reply ended by itself; one cut off at the token cap (finish reason
    "length") did not, so its end-of-turn is not learnt (a model trained on cut replies with
    it learns to stop mid-answer: bench/retrain_quality.py saw it)."""
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert full.startswith(prompt), "the chat template renders the reply after the generation prompt"
    target = tokenizer.encode(full[len(prompt):])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in target:
        end = target.index(tokenizer.eos_token_id)
        target = target[: end + 1] if ended else target[:end]  # the model stops there, or goes on
    prompt_ids = tokenizer.encode(prompt)
    keep = context + 1  # inputs are ids[:-1], predictions ids[1:]
    if len(target) >= keep // 2:
        return None
    ids = (prompt_ids + target)[-keep:]  # the oldest turns give way first
    labels = ([IGNORE] * len(prompt_ids) + target)[-keep:]
    return ids, labels


def split_heldout(conversations: list[str], fraction: float) -> set[str]:
    """The conversations held out: a fixed fraction, chosen by a hash of their id."""
    unique = sorted(set(conversations), key=lambda c: hashlib.sha256(c.encode()).hexdigest())
    if len(unique) < 2:
        return set()
    n = min(len(unique) - 1, max(1, round(len(unique) * fraction)))
    return set(unique[:n])


def prepare(
    records: list[dict[str, Any]], tokenizer: ChatTokenizer, context: int, heldout: float, result: FinetuneResult
) -> tuple[list[Example], list[Example]]:
    examples: list[Example] = []
    for i, record in enumerate(records):
        if (record.get("feedback") or {}).get("rating") == "down":
            result.excluded["rated down"] = result.excluded.get("rated down", 0) + 1
            continue
        ended = record.get("finish_reason") != "length"
        encoded = encode(tokenizer, record["messages"], context, ended)
        if encoded is None:
            result.excluded["reply too long"] = result.excluded.get("reply too long", 0) + 1
            continue
        examples.append(Example(str(record.get("conversation") or f"record-{i}"), *encoded))
    held = split_heldout([e.conversation for e in examples], heldout)
    if not held and len(examples) >= 2:  # one conversation: hold out its last examples instead
        n = max(1, round(len(examples) * heldout))
        return examples[:-n], examples[-n:]
    return [e for e in examples if e.conversation not in held], [e for e in examples if e.conversation in held]


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded inputs and targets: [B, T] each, IGNORE on padding."""
    width = max(len(e.ids) for e in batch) - 1
    x = torch.full((len(batch), width), pad_id, dtype=torch.long)
    y = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.ids) - 1
        x[row, :n] = torch.tensor(e.ids[:-1])
        y[row, :n] = torch.tensor(e.labels[1:])
    return x, y


@torch.no_grad()
def heldout_loss(model: LlamaForCausalLM, examples: list[Example], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Mean cross-entropy per target token over every held-out example, and the token count."""
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        x, y = collate(examples[start : start + batch_size], pad_id)
        logits = model(x)  # [B, T, V]
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE, reduction="sum").item()
        tokens += int((y != IGNORE).sum())
    model.train()
    return (total / tokens if tokens else float("nan")), tokens


def finetune(
    base_dir: Path,
    records: list[dict[str, Any]],
    out_dir: Path,
    *,
    max_steps: int,
    batch_size: int = 8,
    lr: float = 3e-4,
    warmup_steps: int = 5,
    heldout: float = 0.1,
    threads: int = 2,
    seed: int = 1234,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune the HF-layout model in `base_dir` on `records`; save it to `out_dir`."""
    if max_steps < 1:
        raise FinetuneError("--max-steps must be at least 1")
    if batch_size < 1:
        raise FinetuneError("--batch-size must be at least 1")
    if not 0.0 < lr < 1.0:
        raise FinetuneError("--lr must be between 0 and 1")
    if not 0.0 < heldout < 1.0:
        raise FinetuneError("--heldout must be a fraction between 0 and 1")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    started = time.perf_counter()
    result = FinetuneResult(records=len(records), hyperparameters={
        "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "warmup_steps": warmup_steps,
        "heldout": heldout, "threads": threads, "seed": seed, "schedule": "linear warmup, cosine to 10%",
        "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0.0)",
    })
    tokenizer = ChatTokenizer.from_pretrained(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    context = int(model.config.max_position_embeddings)
    train, held = prepare(records, tokenizer, context, heldout, result)
    result.train_examples, result.heldout_examples = len(train), len(held)
    if not train or not held:
        raise FinetuneError(
            f"{len(train)} records to train on and {len(held)} held out: export at least two usable records "
            "(thumbs-down replies are not trained on)"
        )
    pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    result.heldout_loss_before, result.heldout_tokens = heldout_loss(model, held, pad_id, batch_size)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(seed)
    order: list[Example] = []
    losses: list[float] = []
    from tqdm import tqdm

    bar = tqdm(total=max_steps, desc="fine-tune", unit="step", disable=not progress, mininterval=1.0)
    for step in range(max_steps):
        cur_lr = lr * min(1.0, (step + 1) / warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max_steps)))
        for group in opt.param_groups:
            group["lr"] = cur_lr
        batch = []
        while len(batch) < min(batch_size, len(train)):
            if not order:
                order = train[:]
                rng.shuffle(order)
            batch.append(order.pop())
        x, y = collate(batch, pad_id)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        result.train_tokens += int((y != IGNORE).sum())
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{cur_lr:.1e}", refresh=False)
    bar.close()
    result.steps = max_steps
    result.train_loss_first = losses[0]
    tail = losses[-max(1, len(losses) // 10):]
    result.train_loss_last = sum(tail) / len(tail)
    result.heldout_loss_after, _ = heldout_loss(model, held, pad_id, batch_size)
    model.eval()
    model.save_pretrained(out_dir)
    result.seconds = time.perf_counter() - started
    return result
