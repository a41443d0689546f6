"""The tensor contract of the Triton model `chat` (chatbot/inference/contract.py): the file
Triton reads (triton_models/chat/config.pbtxt) states exactly it, the model refuses a
configuration that does not, and the worker builds its requests from it."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor

from chatbot.inference.contract import (
    DIMS,
    INPUTS,
    OUTPUTS,
    ContractMismatch,
    check_model_config,
    mismatches,
)
from tests.fakes import chat_model_config, load_chat_model
from workers.inference import OUTPUTS as WORKER_OUTPUTS
from workers.inference import triton_inputs


def test_config_pbtxt_states_exactly_the_contract() -> None:
    config = chat_model_config()
    stated = [(e["name"], e["data_type"], e.get("optional", False), [int(d) for d in e["dims"]]) for e in config["input"]]
    assert stated == [(t.name, t.config_data_type, t.optional, DIMS) for t in INPUTS]
    stated = [(e["name"], e["data_type"], [int(d) for d in e["dims"]]) for e in config["output"]]
    assert stated == [(t.name, t.config_data_type, DIMS) for t in OUTPUTS]
    assert not any(t.optional for t in OUTPUTS), "Triton has no optional outputs"
    assert mismatches(config) == []
    check_model_config(config)


def test_every_difference_is_named() -> None:
    config: dict[str, Any] = chat_model_config()
    inputs = {e["name"]: e for e in config["input"]}
    inputs["seed"]["data_type"] = "TYPE_INT32"
    inputs["messages"]["optional"] = True
    del inputs["background"]["optional"]
    config["input"] = [e for e in config["input"] if e["name"] != "top_k"] + [
        {"name": "user", "data_type": "TYPE_STRING", "dims": ["1"]}
    ]
    config["output"] = [e for e in config["output"] if e["name"] != "text"]
    assert mismatches(config) == [
        "input 'messages' is optional, the contract says required",
        "input 'top_k' (TYPE_INT32) is missing",
        "input 'seed' is TYPE_INT32, the contract says TYPE_INT64",
        "input 'background' is required, the contract says optional",
        "input 'user' is not in the contract",
        "output 'text' (TYPE_STRING) is missing",
    ]
    with pytest.raises(ContractMismatch, match="'chat' does not state the tensors.*input 'top_k'.*output 'text'"):
        check_model_config(config)
    with pytest.raises(ContractMismatch, match="input 'messages' .* missing"):
        check_model_config({"name": "chat", "output": chat_model_config()["output"]})


def test_the_model_refuses_a_configuration_that_disagrees(monkeypatch: pytest.MonkeyPatch) -> None:
    module: Any = load_chat_model(monkeypatch)
    config = chat_model_config(model_dir="/nonexistent")
    config["input"] = [e for e in config["input"] if e["name"] != "stop"]
    with pytest.raises(ContractMismatch, match="input 'stop' \\(TYPE_STRING\\) is missing"):
        module.TritonPythonModel().initialize({"model_config": json.dumps(config), "model_name": "chat"})


def _value(tensor: Any) -> Any:
    raw = tensor._get_content()
    if tensor.datatype() == "BYTES":
        return deserialize_bytes_tensor(raw)[0]
    spec = next(t for t in INPUTS if t.name == tensor.name())
    return np.frombuffer(raw, dtype=spec.numpy_dtype)[0].item()


def test_the_worker_builds_its_requests_from_the_contract() -> None:
    messages = [{"role": "user", "content": "Hi"}]
    params = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.75, "top_k": 3, "seed": 2**40, "min_tokens": 1,
              "stop": ("END", "\n\n"), "background": 1, "persona": "ignored"}
    inputs = triton_inputs(messages, params)
    assert [(t.name(), t.datatype(), t.shape()) for t in inputs] == [(t.name, t.data_type, DIMS) for t in INPUTS]
    assert {t.name(): _value(t) for t in inputs} == {
        "messages": json.dumps(messages).encode(), "max_tokens": 5, "temperature": 0.5, "top_p": 0.75, "top_k": 3,
        "seed": 2**40, "min_tokens": 1, "stop": b'["END", "\\n\\n"]', "background": True,
    }
    # only what is asked for: no stop strings and a foreground request send neither input
    inputs = triton_inputs(messages, {"max_tokens": 7, "stop": [], "background": False})
    assert {t.name(): _value(t) for t in inputs} == {"messages": json.dumps(messages).encode(), "max_tokens": 7}
    assert WORKER_OUTPUTS == tuple(t.name for t in OUTPUTS)
