"""Model quality figures that need no server: held-out loss and agreement with a reference.

- `heldout_loss`: mean cross-entropy of the last assistant turn of chitchat conversations
  (the dataset the `chitchat-dataset` wheel ships; the first ones are those the demo
  model held out of its training), per token and per character. Tokenizers differ, so only
  the per-character figure compares different models; the per-token one compares
  precisions of one model.
- `top1_agreement`: teacher-forced greedy agreement. The reference model generates a
  greedy reply to each prompt; then, at every position of prompt + reply, both models'
  argmax next tokens are compared. Unlike comparing two free-running generations, one early
  near-tie does not make every later token count as a disagreement.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatbot.inference.model import LlamaForCausalLM
from chatbot.inference.tokenizer import ChatTokenizer

HELDOUT_SYSTEM = "You are a helpful, friendly assistant."
AGREEMENT_PROMPTS = (
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Give me three tips for sleeping better.",
    "What is 12 times 7?",
    "Explain what a noun is in one sentence.",
    "Name a fruit that is yellow.",
    "Why do leaves change colour in autumn?",
)


def heldout_loss(
    model: LlamaForCausalLM, tokenizer: ChatTokenizer, conversations: int = 100, context: int = 512
) -> tuple[float, float, int]:
    """(nats per token, nats per character, tokens) of the last assistant turns."""
    from chatbot.training.finetune import IGNORE, encode
    from chatbot.training.train import load_conversations

    context = min(model.config.max_position_embeddings, context)
    total, tokens, chars = 0.0, 0, 0
    for msgs in load_conversations()[:conversations]:
        turns = msgs[:4] if len(msgs) >= 4 else msgs[:2]
        messages = [{"role": "system", "content": HELDOUT_SYSTEM}] + [
            {"role": "user" if i % 2 == 0 else "assistant", "content": m} for i, m in enumerate(turns)
        ]
        encoded = encode(tokenizer, messages, context)
        if encoded is None:
            continue
        ids, labels = encoded
        with torch.inference_mode():
            logits = model(torch.tensor([ids[:-1]]))
        y = torch.tensor([labels[1:]])
        total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE, reduction="sum").item()
        tokens += int((y != IGNORE).sum())
        chars += len(turns[-1]) + 1  # the reply and its end of turn
    return total / tokens, total / chars, tokens


def greedy_reply(model: LlamaForCausalLM, prompt_ids: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Greedy continuation without a KV cache (a full forward per token: references only)."""
    ids = list(prompt_ids)
    with torch.inference_mode():
        for _ in range(new_tokens):
            token = int(model(torch.tensor([ids]), last_only=True)[0, -1].argmax())
            ids.append(token)
            if token in eos:
                break
    return ids[len(prompt_ids):]


def reference_replies(
    reference: LlamaForCausalLM, tokenizer: ChatTokenizer, prompts: tuple[str, ...] = AGREEMENT_PROMPTS,
    new_tokens: int = 32,
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, greedy reply ids) of the reference model for each prompt."""
    eos = set(reference.config.eos_token_ids) | ({tokenizer.eos_token_id} - {None})
    out = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text)
        out.append((prompt_ids, greedy_reply(reference, prompt_ids, new_tokens, eos)))
    return out


def top1_agreement(
    reference: LlamaForCausalLM, candidate: LlamaForCausalLM, replies: list[tuple[list[int], list[int]]]
) -> tuple[float, int]:
    """(fraction of reply positions where both argmaxes agree, positions compared), teacher-
    forced on the reference's greedy replies (`reference_replies`)."""
    same = total = 0
    for prompt_ids, reply in replies:
        ids = torch.tensor([prompt_ids + reply[:-1]])
        start = len(prompt_ids) - 1  # the logits that predict the reply's first token
        with torch.inference_mode():
            ref = reference(ids)[0, start:].argmax(-1)
            got = candidate(ids)[0, start:].argmax(-1)
        same += int((ref == got).sum())
        total += len(reply)
    return same / total, total
