"""`chatbot models add`: a user's own checkpoint into the model repository, checked first
(chatbot/inference/repository.py add_checkpoint)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from chatbot.inference.checkpoint import UnsupportedCheckpoint
from chatbot.inference.repository import (
    ModelRepositoryError,
    add_checkpoint,
    models,
    served_models,
    versions,
)
from tests.fakes import tiny_qwen2

REPOSITORY = Path(__file__).parents[3] / "triton_models"
SMOLLM2 = REPOSITORY / "chat" / "1" / "smollm2"


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """The `chat` model's config and code, with SmolLM2's tokenizer as version 1's only files."""
    repo = tmp_path / "models"
    (repo / "chat" / "1" / "smollm2").mkdir(parents=True)
    shutil.copy2(REPOSITORY / "chat" / "config.pbtxt", repo / "chat" / "config.pbtxt")
    shutil.copy2(REPOSITORY / "chat" / "1" / "model.py", repo / "chat" / "1" / "model.py")
    for name in ("tokenizer.json", "conversion.json"):
        shutil.copy2(SMOLLM2 / name, repo / "chat" / "1" / "smollm2" / name)
    return repo


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.fail(f"the default model is not installed in {SMOLLM2}: run `make model`")
    return tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def test_a_checkpoint_becomes_a_new_model_that_personas_can_name(repository: Path, checkpoint: Path) -> None:
    version, folder = add_checkpoint(repository, "tiny-qwen", checkpoint)
    assert (version, folder) == (1, repository / "tiny-qwen" / "1")
    config = (repository / "tiny-qwen" / "config.pbtxt").read_text()
    assert 'name: "tiny-qwen"' in config and 'string_value: "weights"' in config and '"smollm2"' not in config
    assert (folder / "model.py").read_text() == (repository / "chat" / "1" / "model.py").read_text()
    assert json.loads((folder / "weights" / "config.json").read_text())["model_type"] == "qwen2"
    card = json.loads((folder / "model_card.json").read_text())
    assert card["architecture"] == "Qwen2ForCausalLM" and card["parameters"] > 3_000_000
    assert card["added_from"] == str(checkpoint)
    assert "Added with `chatbot models add`" in (folder / "MODEL_CARD.md").read_text()
    assert {"tiny-qwen", "tiny-qwen/1"} <= served_models(repository)

    again, _ = add_checkpoint(repository, "tiny-qwen", checkpoint)  # the same name: its next version
    assert again == 2 and versions(repository, "tiny-qwen") == [1, 2]


def test_a_new_version_of_an_existing_model_keeps_nothing_of_the_base_versions_weights(
    repository: Path, checkpoint: Path
) -> None:
    version, folder = add_checkpoint(repository, "chat", checkpoint)
    assert version == 2
    weights = folder / "smollm2"  # the model's weights folder, now this checkpoint's alone
    assert json.loads((weights / "config.json").read_text())["model_type"] == "qwen2"
    assert not (weights / "conversion.json").exists()
    assert (folder / "model.py").is_file()


def test_a_checkpoint_that_cannot_be_served_is_refused_and_nothing_is_written(
    repository: Path, checkpoint: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedCheckpoint, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        add_checkpoint(repository, "broken", broken)

    untemplated = tmp_path / "untemplated"
    shutil.copytree(checkpoint, untemplated)
    (untemplated / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((untemplated / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (untemplated / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with pytest.raises(UnsupportedCheckpoint, match="chat template"):
        add_checkpoint(repository, "untemplated", untemplated)

    with pytest.raises(ModelRepositoryError, match="model name"):
        add_checkpoint(repository, "../../etc", checkpoint)
    with pytest.raises(ModelRepositoryError, match="neither"):
        add_checkpoint(repository, "nothing", tmp_path / "missing")
    (repository / "stray").mkdir()  # a folder that is not a model is never taken over
    with pytest.raises(ModelRepositoryError, match="is not a model"):
        add_checkpoint(repository, "stray", checkpoint)
    (repository / "stray").rmdir()
    assert models(repository) == ["chat"]
    assert sorted(p.name for p in repository.iterdir()) == ["chat"]  # no staging folder left behind
