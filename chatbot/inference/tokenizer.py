"""Chat tokenizer: `tokenizers` for the vocabulary, Jinja for the chat template, and an
incremental detokenizer that only ever emits whole characters.

Design notes
- Files are the Hugging Face layout: `tokenizer.json` (the `tokenizers` model) and
  `tokenizer_config.json` (`bos_token`, `eos_token`). Special tokens may be plain
  strings or HF `AddedToken` dicts ({"content": ...}).
- The chat template comes from `chat_template.jinja` when the folder has one
  (transformers 5 writes it there and no longer into tokenizer_config.json), else from
  tokenizer_config.json's `chat_template`: a string, or a list of {name, template}
  dicts of which we take "default", as transformers does when no name is asked for. A
  folder with no template is refused (`UnsupportedCheckpoint`) instead of given
  ChatML: a base model or another model's template would be served a prompt format it
  was never trained on. `ChatTokenizer(...)` built in code still defaults to ChatML,
  the template of the demo model it trains.
- The chat template is rendered like `transformers` does it: an immutable *sandboxed*
  Jinja environment (templates come with downloaded models and are untrusted code),
  `trim_blocks`/`lstrip_blocks`, a `raise_exception` helper and a `tojson` filter. The
  rendered prompt already contains BOS if the template wants one, so `encode` adds no
  special tokens.
- `StreamDecoder`: byte-level BPE tokens (and byte-fallback tokens of SentencePiece
  vocabularies) can split one UTF-8 character over several tokens. Decoding a partial
  character yields U+FFFD, so a delta is emitted only when the decoded text does not
  end in U+FFFD. Decoding is done over a short window (the previous emit point onward),
  diffing the window decoded with and without the new tokens, as vLLM/TGI do: this keeps
  each step O(window) instead of O(sequence) and also survives decoders that strip a
  leading space at the start of a decode (SentencePiece "▁").
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from chatbot.inference.checkpoint import UnsupportedCheckpoint

# ChatML, the template of the demo model (written into its tokenizer_config.json) and the
# default of a tokenizer built in code; never a fallback for a folder that has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _token_content(tok: Any) -> str | None:
    if tok is None or isinstance(tok, str):
        return tok
    assert isinstance(tok, dict) and "content" in tok, f"unexpected special token entry: {tok!r}"
    return str(tok["content"])


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def make_template_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def read_chat_template(model_dir: Path, tokenizer_config: dict[str, Any]) -> str:
    """The folder's default chat template: `chat_template.jinja`, else tokenizer_config's
    `chat_template`; `UnsupportedCheckpoint` when there is none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        text = jinja.read_text(encoding="utf-8")
        if text.strip():
            return text
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise UnsupportedCheckpoint(
                f"{model_dir}: tokenizer_config.json has chat templates {sorted(map(str, named))} "
                "but none named 'default'"
            )
        template = named["default"]
    if not isinstance(template, str) or not template.strip():
        raise UnsupportedCheckpoint(
            f"{model_dir} has no chat template (neither chat_template.jinja nor a chat_template in "
            "tokenizer_config.json): it is probably a base model, not a chat model"
        )
    return template


class ChatTokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str = CHATML_TEMPLATE,
        bos_token: str | None = None,
        eos_token: str | None = "<|im_end|>",
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self._template = make_template_env().from_string(chat_template)
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        assert eos_token is None or self.eos_token_id is not None, f"eos token {eos_token!r} is not in the vocabulary"

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ChatTokenizer:
        model_dir = Path(model_dir)
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        return cls(
            tokenizer,
            chat_template=read_chat_template(model_dir, cfg),
            bos_token=_token_content(cfg.get("bos_token")),
            eos_token=_token_content(cfg.get("eos_token")),
        )

    def save_pretrained(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(model_dir / "tokenizer.json"))
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.eos_token,
            "model_max_length": 512,
            "chat_template": self.chat_template,
        }
        (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The tokens the model reads for `messages`: the chat template, ready for the
        assistant's turn (what the engine feeds and the prompt builder counts)."""
        return self.encode(self.apply_chat_template(messages))

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def encode(self, text: str) -> list[int]:
        # no special tokens: the template already placed BOS where the model expects it
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Token ids in, text deltas out; every delta is whole characters (valid UTF-8)."""

    # how many already-emitted tokens to re-decode as context for the next delta
    _CONTEXT = 4

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # tokens before this index have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly "")."""
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            # keep a little context so the next window decodes word boundaries correctly
            self.prefix_offset = max(self.read_offset, len(self.ids) - self._CONTEXT)
            self.read_offset = len(self.ids)
            return delta
        return ""  # incomplete character (or a token with no text): hold it back

    def flush(self) -> str:
        """At the end of a stream: emit whatever is held back, even a dangling U+FFFD."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :]
