"""Fakes and tiny stand-ins that more than one test file uses: tiny random models and a
tokenizer trained in-process, a fake `triton_python_backend_utils` to load the Triton chat
model with, a ChatGPT export, and what a socket session sent. Heavy imports (torch,
transformers, the inference package) are made where used, so the UI and integration tests
that import the export pay nothing for the rest."""

from __future__ import annotations

import shutil
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from api.chat_socket import ChatSession
    from chatbot.inference import ChatTokenizer, Engine, LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
CHAT_MODEL = REPO / "triton_models" / "chat"
SMOLLM2 = CHAT_MODEL / "1" / "smollm2"


# ---- tiny models and a tokenizer ------------------------------------------------------------


def tiny_config(**kw: object) -> LlamaConfig:
    """A two-layer Llama of hidden size 64 (vocab 300 unless `kw` says otherwise)."""
    from chatbot.inference import LlamaConfig

    base: dict[str, object] = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2,
    )
    base.update(kw)
    return LlamaConfig(**base)  # type: ignore[arg-type]


def tiny_model(seed: int = 0, **kw: object) -> LlamaForCausalLM:
    """Our Llama of `tiny_config(**kw)` with random weights from `seed`."""
    import torch

    from chatbot.inference import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**kw))
    model.init_weights(std=0.2)  # larger than training init: logits that actually vary
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> ChatTokenizer:
    """A BPE tokenizer of 300 tokens trained in-process (import it as a fixture)."""
    from chatbot.training.train import train_bpe

    # ASCII-heavy corpus: emoji and CJK stay split into byte tokens, which is the hard case
    corpus = ["hello there how are you doing today", "i am fine thanks", "what do you like"] * 50
    return train_bpe(iter(corpus), vocab_size=300)


def make_engine(
    tokenizer: ChatTokenizer, never_eos: bool = False, max_seq_len: int = 128, **kwargs: int
) -> Engine:
    """A started engine on a tiny model for `tokenizer`; `never_eos`: replies run to their length."""
    import torch

    from chatbot.inference import Engine

    model = tiny_model(vocab_size=tokenizer.vocab_size, tie_word_embeddings=not never_eos,
                       eos_token_id=tokenizer.eos_token_id)
    if never_eos:
        # huge logits everywhere except EOS (logit 0): sampling practically never ends a sequence
        with torch.no_grad():
            model.lm_head.weight.mul_(100.0)
            model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    engine = Engine(model, tokenizer, max_seq_len=max_seq_len, **{"max_batch_size": 4, **kwargs})
    engine.start()
    return engine


def tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """A random two-layer Qwen2 with SmolLM2's tokenizer and chat template, saved in `folder`."""
    import torch
    import transformers

    config = transformers.Qwen2Config(
        vocab_size=49152, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (SMOLLM2 / name).is_file():
            shutil.copy2(SMOLLM2 / name, folder / name)
    return folder


# ---- the Triton chat model, with a fake `triton_python_backend_utils` -----------------------


class FakeTensor:
    def __init__(self, name: str, array: object) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> object:
        return self.array


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor] | None = None, error: object = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors or []}
        self.error = error


class FakeError:
    def __init__(self, message: str) -> None:
        self.message = message


class FakeSender:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.sent: list[tuple[FakeResponse, int]] = []
        self.closed = threading.Event()
        self.cancel_after = cancel_after

    def send(self, response: FakeResponse, flags: int = 0) -> None:
        self.sent.append((response, flags))
        if flags == 1:
            self.closed.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.sent) >= self.cancel_after


class FakeRequest:
    def __init__(self, inputs: dict[str, object], sender: FakeSender) -> None:
        self.inputs, self.sender = inputs, sender

    def get_response_sender(self) -> FakeSender:
        return self.sender


class FakeMetric:
    def __init__(self, kind: str, labels: dict[str, str]) -> None:
        self.kind, self.labels, self.value = kind, labels, 0.0

    def increment(self, value: float) -> None:
        assert self.kind == "counter" and value >= 0, "counters only go up"
        self.value += value

    def set(self, value: float) -> None:
        assert self.kind == "gauge", "only gauges are set"
        self.value = value


class FakeMetricFamily:
    COUNTER, GAUGE = "counter", "gauge"
    registry: dict[str, FakeMetricFamily] = {}  # name -> family, like the server's registry

    def __init__(self, name: str, description: str, kind: str) -> None:
        assert name not in self.registry, f"metric family {name} registered twice"
        self.name, self.kind, self.metrics = name, kind, list[FakeMetric]()
        self.registry[name] = self

    def Metric(self, labels: dict[str, str]) -> FakeMetric:  # noqa: N802 (pb_utils' name)
        metric = FakeMetric(self.kind, labels)
        self.metrics.append(metric)
        return metric


def metric_value(name: str, **labels: str) -> float:
    """The sum of the fake metric family's metrics that carry `labels`."""
    family = FakeMetricFamily.registry[name]
    return sum(m.value for m in family.metrics if labels.items() <= m.labels.items())


def fake_pb_utils() -> object:
    import types

    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = FakeTensor  # type: ignore[attr-defined]
    pb.InferenceResponse = FakeResponse  # type: ignore[attr-defined]
    pb.TritonError = FakeError  # type: ignore[attr-defined]
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # type: ignore[attr-defined]
    pb.get_input_tensor_by_name = (  # type: ignore[attr-defined]
        lambda req, name: FakeTensor(name, req.inputs[name]) if name in req.inputs else None
    )
    log = types.SimpleNamespace(log_info=print, log_warn=print, log_error=print, log_verbose=print)
    pb.Logger = log  # type: ignore[attr-defined]
    FakeMetricFamily.registry.clear()
    pb.MetricFamily = FakeMetricFamily  # type: ignore[attr-defined]
    return pb


def chat_model_config(**parameters: str) -> dict[str, object]:
    """triton_models/chat/config.pbtxt as JSON, the way Triton hands it to the model in
    `args["model_config"]`, with these `parameters` instead of its own."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    text_format.Parse((CHAT_MODEL / "config.pbtxt").read_text(), config)
    as_json = json_format.MessageToDict(config, preserving_proto_field_name=True)
    as_json["parameters"] = {k: {"string_value": v} for k, v in parameters.items()}
    return as_json


def load_chat_model(monkeypatch: pytest.MonkeyPatch) -> object:
    """triton_models/chat/1/model.py as a module, with a fake `triton_python_backend_utils`."""
    import importlib.util
    import sys

    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils())
    spec = importlib.util.spec_from_file_location("triton_chat_model", CHAT_MODEL / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ---- a ChatGPT export -----------------------------------------------------------------------


def node(key: str, parent: str | None, children: list[str], role: str | None, text: Any = None) -> dict[str, Any]:
    """One node of a ChatGPT export's `mapping`."""
    message = None
    if role is not None:
        content = {"content_type": "text", "parts": [text]} if not isinstance(text, dict) else text
        message = {"id": key, "author": {"role": role}, "content": content, "create_time": 1.7e9}
    return {"id": key, "message": message, "parent": parent, "children": children}


def chatgpt_export() -> list[dict[str, Any]]:
    """The shape of ChatGPT's conversations.json: an empty root, a system message, an
    edited first question (two branches), a tool call, and an image part."""
    mapping = {
        "root": node("root", None, ["sys"], None),
        "sys": node("sys", "root", ["u1", "u1b"], "system", ""),
        "u1": node("u1", "sys", ["a1"], "user", "What is a tide?"),
        "a1": node("a1", "u1", [], "assistant", "The rise and fall of the sea."),
        "u1b": node("u1b", "sys", ["tool"], "user", "What causes tides?"),
        "tool": node("tool", "u1b", ["a2"], "tool", "search results"),
        "a2": node("a2", "tool", ["u3"], "assistant", "Mostly the Moon's gravity."),
        "u3": node("u3", "a2", [], "user", {"content_type": "multimodal_text",
                                             "parts": [{"asset_pointer": "file-1"}, "And this picture?"]}),
    }
    return [
        {"title": "Tides", "create_time": 1.7e9, "mapping": mapping, "current_node": "u3"},
        {"title": "Broken", "mapping": "not a mapping"},
        {"title": "Empty", "mapping": {"r": node("r", None, [], "system", "")}, "current_node": "r"},
    ]


# ---- a socket session run against fake services ---------------------------------------------


def frames(session: ChatSession) -> list[dict[str, Any]]:
    """The frames the session has put in its outbox since last asked."""
    out = []
    while not session.outbox.empty():
        out.append(session.outbox.get_nowait())
    return out


# ---- what the API's reply stream reads: the read model's rows of replies -------------------


class FakeReadModels:
    """The reply rows `QuietReplies` looks up, and how it looked them up."""

    def __init__(self) -> None:
        self.rows: dict[uuid.UUID, dict[str, Any]] = {}
        self.lookups = 0  # queries
        self.looked_up: list[list[uuid.UUID]] = []

    def messages_by_id(self, message_ids: list[uuid.UUID]) -> list[dict[str, Any]]:
        self.lookups += 1
        self.looked_up.append(list(message_ids))
        return [{"id": i, **self.rows[i]} for i in message_ids if i in self.rows]


class FakeServices:
    """The `Services` of an API process, as far as the reply stream uses them."""

    def __init__(self) -> None:
        self.readmodels = FakeReadModels()
        self.quiet_replies = None

    async def call(self, func: Any, *args: Any) -> Any:
        return func(*args)
