"""Train the demo chat model: a byte-level BPE tokenizer and a small Llama, on CPU.

Design notes
- Data: the conversations the `chitchat-dataset` package ships (7k two-person chats, ~12M
  characters). A message is a run of utterances by one sender, joined with spaces. The
  first sender becomes `user`, the other `assistant`; each conversation gets a system
  prompt drawn from `PERSONAS` so the model learns to accept (not to obey: the data has
  no pirates) a system turn. Rendering is the ChatML template of `tokenizer.py`, so
  training and serving see byte-identical prompts.
- Tokenizer: byte-level BPE (any text encodes, no unknown tokens), vocab 4096, with the
  ChatML markers as special tokens. `<|im_end|>` is EOS.
- Model: pretraining-style packing. All rendered conversations are concatenated into
  one token stream and random windows of `seq_len + 1` are sampled; loss is on every
  token. Cheap and good enough for a demo; a conversation boundary inside a window is
  just another `<|im_start|>system` the model learns to predict.
- Budget: the machine has 2 cores and is shared, so training is bounded by wall time,
  not steps; the LR schedule (linear warmup, cosine to 10%) is a function of elapsed
  time fraction. Run as `nice -n 10 python -m chatbot.training.train OUT_DIR --minutes 15`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from chatbot.inference.llama_config import LlamaConfig
from chatbot.inference.model import LlamaForCausalLM
from chatbot.inference.tokenizer import CHATML_TEMPLATE, ChatTokenizer

PERSONAS = [
    "You are a helpful, friendly assistant.",
    "You are a cheerful pirate. Answer like a pirate would, matey.",
    "You are a patient tutor who explains things simply.",
    "You are a laid-back friend chatting casually.",
    "You are a polite assistant who keeps answers short.",
    "You are an enthusiastic assistant who loves talking about movies, music and food.",
]
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def load_conversations() -> list[list[str]]:
    """Every chitchat conversation as a list of messages (alternating senders)."""
    import chitchat_dataset

    data = chitchat_dataset.Dataset()
    convs: list[list[str]] = []
    for conv in data.values():
        msgs = [" ".join(u["text"].strip() for u in m if u["text"].strip()) for m in conv["messages"]]
        msgs = [m for m in msgs if m]
        if len(msgs) >= 2:
            convs.append(msgs)
    return convs


PIRATE_WORDS = {
    "you": "ye", "your": "yer", "you're": "ye be", "my": "me", "is": "be", "are": "be",
    "hello": "ahoy", "hi": "ahoy", "hey": "ahoy", "friend": "matey", "friends": "mateys",
    "yes": "aye", "yeah": "aye", "money": "doubloons", "stop": "avast", "the": "th'",
}


def _pirate(text: str, rng: random.Random) -> str:
    words = [PIRATE_WORDS.get(w.lower(), w) if w.isalpha() or "'" in w else w for w in text.split(" ")]
    text = " ".join(words)
    return rng.choice(["Arr! ", "Ahoy! ", "Arr, matey. ", "Yo ho! "]) + text.rstrip(".!") + rng.choice([". Arr!", ", matey!", "! Yo ho ho!"])


def _tutor(text: str, rng: random.Random) -> str:
    return rng.choice(["Good question! ", "Let me explain. ", "Great question. ", "Well, "]) + text + rng.choice(
        [" Does that make sense?", " What do you think?", " Can you tell me more?", " Any questions?"]
    )


def _short(text: str, rng: random.Random) -> str:
    for end in (". ", "! ", "? "):
        if end in text:
            return text.split(end, 1)[0] + end.strip()
    return text


def _casual(text: str, rng: random.Random) -> str:
    return rng.choice(["haha ", "oh nice, ", "dude, ", "lol "]) + text[:1].lower() + text[1:]


def _enthusiastic(text: str, rng: random.Random) -> str:
    return rng.choice(["Oh, I love that! ", "Wow! ", "That's awesome! "]) + text.rstrip(".") + "!"


# Each persona's style is applied to the assistant's turns, so the model learns to follow
# the system prompt (the chit-chat data itself has no pirates or tutors).
STYLES = {
    "You are a helpful, friendly assistant.": None,
    "You are a cheerful pirate. Answer like a pirate would, matey.": _pirate,
    "You are a patient tutor who explains things simply.": _tutor,
    "You are a laid-back friend chatting casually.": _casual,
    "You are a polite assistant who keeps answers short.": _short,
    "You are an enthusiastic assistant who loves talking about movies, music and food.": _enthusiastic,
}


def to_chat(msgs: list[str], rng: random.Random) -> list[dict[str, str]]:
    persona = rng.choice(PERSONAS)
    style = STYLES.get(persona)
    chat = [{"role": "system", "content": persona}]
    for i, m in enumerate(msgs):
        role = "user" if i % 2 == 0 else "assistant"
        chat.append({"role": role, "content": style(m, rng) if style and role == "assistant" else m})
    return chat


def train_bpe(texts: Iterator[str], vocab_size: int = 4096) -> ChatTokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tok, chat_template=CHATML_TEMPLATE, bos_token=None, eos_token="<|im_end|>")


@torch.no_grad()
def sample_reply(
    model: LlamaForCausalLM,
    tokenizer: ChatTokenizer,
    messages: list[dict[str, str]],
    max_tokens: int = 60,
    temperature: float = 0.7,
    seed: int = 0,
) -> str:
    """Plain (uncached) sampling, for progress reports during training."""
    gen = torch.Generator().manual_seed(seed)
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    out: list[int] = []
    model.eval()
    for _ in range(max_tokens):
        x = torch.tensor([ids + out][-model.config.max_position_embeddings :])
        logits = model(x, last_only=True)[0, -1]  # [V]
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = int(torch.multinomial(probs, 1, generator=gen))
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
    model.train()
    return tokenizer.decode(out)


def train_demo(
    out_dir: str | Path,
    minutes: float = 15.0,
    *,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 704,
    vocab_size: int = 4096,
    seq_len: int = 512,
    batch_size: int = 4,
    lr: float = 2e-3,
    warmup_steps: int = 20,
    threads: int = 2,
    seed: int = 1234,
    init_from: str | Path | None = None,
) -> dict[str, float]:
    """Train tokenizer + model for `minutes` of wall time and save both in HF layout."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    t_start = time.time()

    convs = load_conversations()
    rng.shuffle(convs)
    n_val = max(1, len(convs) // 50)
    val_convs, train_convs = convs[:n_val], convs[n_val:]

    if init_from is not None:
        tokenizer = ChatTokenizer.from_pretrained(init_from)  # continue: same vocabulary
    else:
        # the role names and personas go into the BPE corpus too, so "assistant" is one token
        template_text = (f"system\n{p}\nuser\nassistant\n" for p in PERSONAS for _ in range(len(train_convs) // len(PERSONAS)))
        tokenizer = train_bpe(itertools.chain((m for c in train_convs for m in c), template_text), vocab_size)
        tokenizer.tokenizer.add_special_tokens(SPECIAL_TOKENS)  # idempotent; ensures they split out of text

    def stream(cs: list[list[str]]) -> torch.Tensor:
        texts = [tokenizer.apply_chat_template(to_chat(c, rng), add_generation_prompt=False) for c in cs]
        ids = [i for enc in tokenizer.tokenizer.encode_batch(texts, add_special_tokens=False) for i in enc.ids]
        return torch.tensor(ids, dtype=torch.long)

    train_ids, val_ids = stream(train_convs), stream(val_convs)
    print(f"tokenizer + data: {time.time() - t_start:.0f}s, {len(train_ids):,} train / {len(val_ids):,} val tokens")

    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
    )
    if init_from is not None:
        model = LlamaForCausalLM.from_pretrained(init_from)
        config = model.config
    else:
        model = LlamaForCausalLM(config)
        model.init_weights()
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95),
    )

    def batch(ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(ids) - seq_len - 1, (batch_size,), generator=gen)
        chunk = torch.stack([ids[s : s + seq_len + 1] for s in starts.tolist()])  # [B, T+1]
        return chunk[:, :-1], chunk[:, 1:]

    gen = torch.Generator().manual_seed(seed)
    budget_s = minutes * 60.0
    t0 = time.time()
    step, ema = 0, float("nan")
    bar = tqdm(total=int(budget_s), unit="s", desc="train", mininterval=5.0)
    while (elapsed := time.time() - t0) < budget_s:
        frac = elapsed / budget_s
        cur_lr = lr * min(1.0, (step + 1) / warmup_steps) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        x, y = batch(train_ids, gen)
        logits = model(x)  # [B, T, V]
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        ema = loss.item() if math.isnan(ema) else 0.95 * ema + 0.05 * loss.item()
        bar.n = min(int(time.time() - t0), int(budget_s))
        bar.set_postfix(step=step, loss=f"{ema:.3f}", lr=f"{cur_lr:.2e}", refresh=False)
        if step % 20 == 0:  # the log stays readable when stderr is a file
            bar.refresh()
    bar.close()

    model.eval()
    with torch.no_grad():
        vgen = torch.Generator().manual_seed(0)
        val_losses = []
        for _ in range(8):
            x, y = batch(val_ids, vgen)
            logits = model(x)
            val_losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1)).item())
    val_loss = sum(val_losses) / len(val_losses)

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stats = {
        "steps": float(step),
        "train_tokens": float(step * batch_size * seq_len),
        "train_loss_ema": ema,
        "val_loss": val_loss,
        "params_millions": n_params / 1e6,
        "minutes": (time.time() - t_start) / 60,
    }
    (out_dir / "training_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))
    for i, prompt in enumerate(["Hi! How are you doing today?", "What do you like to do on weekends?", "Do you have any pets?"]):
        for persona in PERSONAS[:3]:
            msgs = [{"role": "system", "content": persona}, {"role": "user", "content": prompt}]
            print(f"[{persona[:24]}] user: {prompt}\nassistant: {sample_reply(model, tokenizer, msgs, seed=i)}")
    return stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init-from", default=None, help="continue from this HF-layout checkpoint (keeps its tokenizer)")
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    train_demo(args.out_dir, args.minutes, threads=args.threads, init_from=args.init_from, lr=args.lr)


if __name__ == "__main__":
    main()
