"""The tensor contract of the Triton model `chat`: its inputs and outputs, stated once.

Design notes
- Three places speak it: triton_models/chat/config.pbtxt (Triton reads that file, so it
  stays), the model (triton_models/chat/1/model.py parses the inputs and builds the
  outputs) and its client, the inference worker (workers/inference.py builds the inputs
  and asks for the outputs). The model and the worker take the tensors from here; the
  model checks in `initialize` that the configuration Triton loaded states exactly these
  tensors (`check_model_config`), and tests/unit/inference/test_inference_contract.py checks that
  config.pbtxt does.
- A tensor is its name, its data type as the client protocol spells it ("BYTES", "INT32",
  "INT64", "FP32", "BOOL"; a model configuration spells them "TYPE_STRING", "TYPE_INT32",
  ...: `config_data_type`), the numpy dtype of its array, and, for an input, whether a
  request may leave it out. Every tensor holds one value: dims [1] (the model batches
  internally, its max_batch_size is 0).
- Inputs are listed in the order the model reads them, which decides which error a
  request with several bad inputs gets: `messages` (UTF-8 JSON, a list of {"role",
  "content"}), the sampling values (each named like its `SamplingParams` field), `stop`
  (UTF-8 JSON, a list of strings) and `background` (true: no one waits on the reply).
- Outputs come with every streamed response, in this order: `text` (the UTF-8 delta),
  `finish_reason` ("" until the final response) and the token counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["DIMS", "INPUTS", "OUTPUTS", "ContractMismatch", "Tensor", "check_model_config", "mismatches"]


@dataclass(frozen=True)
class Tensor:
    name: str
    data_type: str  # as the client protocol spells it: BYTES, BOOL, INT32, INT64, FP32
    numpy_dtype: Any  # of the one-element array that carries it
    optional: bool = False  # inputs only: a request may leave it out

    @property
    def config_data_type(self) -> str:
        """The model configuration's spelling: TYPE_STRING for BYTES, else TYPE_<data_type>."""
        return "TYPE_STRING" if self.data_type == "BYTES" else f"TYPE_{self.data_type}"

    @property
    def python_type(self) -> type:
        """What one value of the tensor is in Python."""
        return {"BYTES": bytes, "BOOL": bool, "INT32": int, "INT64": int, "FP32": float}[self.data_type]


INPUTS: tuple[Tensor, ...] = (
    Tensor("messages", "BYTES", np.object_),
    Tensor("max_tokens", "INT32", np.int32, optional=True),
    Tensor("temperature", "FP32", np.float32, optional=True),
    Tensor("top_p", "FP32", np.float32, optional=True),
    Tensor("top_k", "INT32", np.int32, optional=True),
    Tensor("seed", "INT64", np.int64, optional=True),
    Tensor("min_tokens", "INT32", np.int32, optional=True),
    Tensor("stop", "BYTES", np.object_, optional=True),
    Tensor("background", "BOOL", np.bool_, optional=True),
)
OUTPUTS: tuple[Tensor, ...] = (
    Tensor("text", "BYTES", np.object_),
    Tensor("finish_reason", "BYTES", np.object_),
    Tensor("prompt_tokens", "INT32", np.int32),
    Tensor("completion_tokens", "INT32", np.int32),
)
DIMS = [1]  # of every tensor


class ContractMismatch(ValueError):
    """A model configuration whose inputs or outputs are not the contract's."""


def mismatches(config: dict[str, Any]) -> list[str]:
    """How a model configuration, as Triton hands it to a python model (JSON: "input" and
    "output" lists of {"name", "data_type", "optional", ...}), differs from the contract:
    one sentence per difference, [] when it states exactly the contract's tensors."""
    problems: list[str] = []
    for kind, tensors in (("input", INPUTS), ("output", OUTPUTS)):
        stated = {entry.get("name"): entry for entry in config.get(kind) or []}
        for tensor in tensors:
            entry = stated.pop(tensor.name, None)
            if entry is None:
                problems.append(f"{kind} {tensor.name!r} ({tensor.config_data_type}) is missing")
                continue
            if entry.get("data_type") != tensor.config_data_type:
                problems.append(f"{kind} {tensor.name!r} is {entry.get('data_type')}, "
                                f"the contract says {tensor.config_data_type}")
            if kind == "input" and bool(entry.get("optional", False)) != tensor.optional:
                problems.append(f"{kind} {tensor.name!r} is {_optionality(bool(entry.get('optional')))}, "
                                f"the contract says {_optionality(tensor.optional)}")
        problems += [f"{kind} {name!r} is not in the contract" for name in stated]
    return problems


def check_model_config(config: dict[str, Any]) -> None:
    """Raise `ContractMismatch` naming every difference between `config` (see `mismatches`)
    and the contract."""
    problems = mismatches(config)
    if problems:
        raise ContractMismatch(
            f"the model configuration of {config.get('name', 'chat')!r} does not state the tensors "
            f"of the chat contract (chatbot/inference/contract.py): " + "; ".join(problems)
        )


def _optionality(optional: bool) -> str:
    return "optional" if optional else "required"
