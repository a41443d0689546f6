"""Retraining in memory: consent as events, the export's consent and scrubbing rules, the
rollout aggregate, the version pick, and the pieces of fine-tuning that need no server."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from uuid import UUID, uuid4

import pytest

from chatbot.inference.repository import (
    CARD_JSON,
    config_with_versions,
    create_version,
    read_card,
    versions,
    weights_folder,
)
from chatbot.training.dataset import (
    ExportError,
    ExportFilter,
    ExportReport,
    export_records,
    parse_when,
    read_records,
    scrub,
)
from domain.application import ChatApplication
from domain.model_rollout import (
    InvalidRollout,
    NothingToRollBack,
    RolloutInProgress,
    RolloutNotFound,
)
from domain.persona import BUILTIN_PERSONAS
from domain.user import User
from workers.rollout import BUCKETS, RolloutFollower, bucket_of, pick_version

REPO = Path(__file__).resolve().parents[3] / "triton_models"


def chat(app: ChatApplication, user: UUID, text: str, reply: str, conversation: UUID | None = None) -> tuple[UUID, UUID]:
    """Post `text` and complete its reply with `reply`; returns (conversation, reply id)."""
    conversation = conversation or app.start_conversation(user)
    posted = app.post_message(conversation, user, str(uuid4()), text)
    app.complete_reply(conversation, posted.reply_id, text=reply, finish_reason="stop", prompt_tokens=3,
                       completion_tokens=2, ttft_ms=1.0, duration_ms=2.0, model_name="chat", model_version="1")
    return conversation, posted.reply_id


def export(app: ChatApplication, **filters: object) -> list[dict]:
    return list(export_records(app, ExportFilter(**filters)))  # type: ignore[arg-type]


# -- consent ------------------------------------------------------------------------------------


def test_consent_is_off_until_the_user_opts_in_and_each_change_is_one_event(app: ChatApplication, user: UUID) -> None:
    assert app.training_consent(user) is False
    assert app.set_training_consent(user, True) is True
    assert app.set_training_consent(user, True) is True  # no change: no event
    assert app.set_training_consent(user, False) is False
    changes = [e.training for e in app.events.get(user) if isinstance(e, User.TrainingConsentChanged)]
    assert changes == [True, False]
    with pytest.raises(Exception, match="true or false"):
        app.set_training_consent(user, "yes")  # type: ignore[arg-type]


def test_the_export_keeps_the_consent_in_force_when_each_message_was_written(app: ChatApplication, user: UUID) -> None:
    before, _ = chat(app, user, "written before opting in", "an early reply")
    app.set_training_consent(user, True)
    _, in_old = chat(app, user, "written after opting in", "a later reply", conversation=before)
    fresh, in_fresh = chat(app, user, "a new conversation", "a fresh reply")
    records = export(app)
    # the old conversation's second reply would carry the unconsented first turn: left out whole
    assert [r["id"] for r in records] == [str(in_fresh)]
    assert records[0]["messages"] == [
        {"role": "system", "content": BUILTIN_PERSONAS[0]["system_prompt"]},
        {"role": "user", "content": "a new conversation"},
        {"role": "assistant", "content": "a fresh reply"},
    ]
    assert records[0]["conversation"] == str(fresh) and records[0]["persona"] == {"slug": "assistant", "version": 1}
    report = ExportReport()
    list(export_records(app, report=report))
    assert report.skipped == {"written without consent": 2} and report.records == 1
    assert str(in_old) not in {r["id"] for r in records}


def test_a_withdrawal_takes_back_every_earlier_message(app: ChatApplication, user: UUID) -> None:
    app.set_training_consent(user, True)
    chat(app, user, "hello", "hi")
    other = app.register_user("grace@example.com", "correct horse")
    app.set_training_consent(other, True)
    chat(app, other, "hello from grace", "hi grace")
    assert len(export(app)) == 2
    app.set_training_consent(user, False)
    assert [r["messages"][1]["content"] for r in export(app)] == ["hello from grace"]
    app.set_training_consent(user, True)  # back in: what was written while out stays out
    conversation, reply = chat(app, user, "while in again", "fine")
    app.set_training_consent(user, False)
    app.give_feedback(conversation, user, reply, "up")
    app.set_training_consent(user, True)
    texts = [r["messages"][1]["content"] for r in export(app)]
    assert sorted(texts) == ["hello", "hello from grace", "while in again"]
    rated = next(r for r in export(app) if r["messages"][1]["content"] == "while in again")
    assert rated["feedback"] is None  # rated while consent was withdrawn: as if not rated


def test_an_erased_user_contributes_nothing(app: ChatApplication, user: UUID) -> None:
    app.set_training_consent(user, True)
    chat(app, user, "hello", "hi")
    assert len(export(app)) == 1
    app.erase_user(user)
    assert export(app) == []


def test_the_export_scrubs_addresses_and_phone_numbers_and_names_no_user(app: ChatApplication, user: UUID) -> None:
    app.set_training_consent(user, True)
    conversation, reply = chat(app, user, "I am ada@example.com, call +1 (555) 123-4567", "Noted: 555-123-4567")
    app.give_feedback(conversation, user, reply, "down", "mail me: ada.l@math.example.org")
    (record,) = export(app)
    assert record["messages"][1]["content"] == "I am [email], call [phone]"
    assert record["messages"][2]["content"] == "Noted: [phone]"
    assert record["feedback"] == {"rating": "down", "comment": "mail me: [email]"}
    assert str(user) not in json.dumps(record) and "Ada" not in json.dumps(record)


@pytest.mark.parametrize("text, expected", [
    ("+44 20 7946 0958 or 0612345678", "[phone] or [phone]"),
    ("+33 6 12 34 56 78.", "[phone]."),
    ("meet on 2026-11-24 at 10:30, or 24/11/2026", "meet on 2026-11-24 at 10:30, or 24/11/2026"),
    ("in 2024 we had 3 cats and 12345 fish", "in 2024 we had 3 cats and 12345 fish"),
    ("write to first.last+tag@mail.example.co.uk!", "write to [email]!"),
])
def test_scrub_finds_phone_numbers_and_addresses_but_leaves_dates_and_small_numbers(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_the_export_filters_by_rating_persona_and_time(app: ChatApplication, user: UUID) -> None:
    from domain.ids import persona_id_for

    app.set_training_consent(user, True)
    first, liked = chat(app, user, "one", "first")
    app.give_feedback(first, user, liked, "up")
    middle = datetime.now(timezone.utc)
    pirate = app.start_conversation(user, persona_id_for("pirate"))
    _, disliked = chat(app, user, "two", "second", conversation=pirate)
    app.give_feedback(pirate, user, disliked, "down", "meh")
    assert [r["id"] for r in export(app, rating="up")] == [str(liked)]
    assert [r["id"] for r in export(app, persona="pirate")] == [str(disliked)]
    assert [r["id"] for r in export(app, since=middle)] == [str(disliked)]
    assert [r["id"] for r in export(app, until=middle)] == [str(liked)]
    pirate_record = export(app, persona="pirate")[0]
    assert pirate_record["messages"][0]["content"].startswith("You are a cheerful pirate")
    assert pirate_record["feedback"] == {"rating": "down", "comment": "meh"}
    with pytest.raises(ExportError):
        ExportFilter(rating="meh")
    with pytest.raises(ExportError):
        ExportFilter(since=middle, until=middle)
    with pytest.raises(ExportError, match="ISO 8601"):
        parse_when("yesterday")
    assert parse_when("2026-11-24") == datetime(2026, 11, 24, tzinfo=timezone.utc)


def test_each_reply_of_a_branching_conversation_is_a_record_with_its_own_history(app: ChatApplication, user: UUID) -> None:
    app.set_training_consent(user, True)
    conversation, first = chat(app, user, "hello", "hi")
    _, second = chat(app, user, "how are you", "fine", conversation=conversation)
    regenerated = app.regenerate(conversation, user, second)
    app.complete_reply(conversation, regenerated.reply_id, text="great, thanks", finish_reason="stop", prompt_tokens=3,
                       completion_tokens=2, ttft_ms=1.0, duration_ms=2.0, model_name="chat", model_version="1")
    records = {r["id"]: [m["content"] for m in r["messages"][1:]] for r in export(app)}
    assert records == {
        str(first): ["hello", "hi"],
        str(second): ["hello", "hi", "how are you", "fine"],
        str(regenerated.reply_id): ["hello", "hi", "how are you", "great, thanks"],
    }


def test_a_stopped_reply_and_a_deleted_conversation_are_not_exported(app: ChatApplication, user: UUID) -> None:
    app.set_training_consent(user, True)
    conversation = app.start_conversation(user)
    posted = app.post_message(conversation, user, "c1", "tell me a story")
    app.complete_reply(conversation, posted.reply_id, text="Once upon", finish_reason="cancelled", prompt_tokens=3,
                       completion_tokens=2, ttft_ms=1.0, duration_ms=2.0, model_name="chat", model_version="1")
    deleted, _ = chat(app, user, "forget this", "ok")
    app.delete_conversation(deleted, user)
    assert export(app) == []


def test_read_records_names_the_first_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ExportError, match=r"data.jsonl:3: a record has messages"):
        read_records(path)
    path.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ExportError, match=r":2: not JSON"):
        read_records(path)
    path.write_text(json.dumps(good) + "\n")
    assert read_records(path) == [good]


# -- rollouts -----------------------------------------------------------------------------------


def test_a_rollout_ramps_one_candidate_and_is_rolled_back_or_promoted(app: ChatApplication) -> None:
    with pytest.raises(RolloutNotFound):
        app.roll_out_model("chat", "2", 10)  # the first rollout names the stable version
    assert app.model_rollout("chat") is None
    state = app.roll_out_model("chat", "2", 10, stable="1")
    assert (state["stable"], state["candidate"], state["percent"]) == ("1", "2", 10.0)
    assert app.roll_out_model("chat", "2", 50)["percent"] == 50.0
    with pytest.raises(RolloutInProgress):
        app.roll_out_model("chat", "3", 10)
    with pytest.raises(InvalidRollout):
        app.roll_out_model("chat", "1", 10)  # the stable version already
    with pytest.raises(InvalidRollout):
        app.roll_out_model("chat", "2", 101)
    with pytest.raises(InvalidRollout):
        app.roll_out_model("chat", "two", 10)
    assert app.roll_back_model("chat")["candidate"] is None
    with pytest.raises(NothingToRollBack):
        app.roll_back_model("chat")
    app.roll_out_model("chat", "3", 100)
    state = app.promote_model("chat")
    assert (state["stable"], state["candidate"], state["percent"]) == ("3", None, 0.0)
    assert state["version"] == 6  # Started, RolledOut x2, RolledBack, RolledOut, Promoted


def test_the_version_pick_is_deterministic_and_splits_replies_by_the_percentage() -> None:
    replies = [uuid4() for _ in range(4000)]
    assert all(pick_version(r, "1", None, 50) == "1" for r in replies[:100])
    assert all(pick_version(r, "1", "2", 100) == "2" for r in replies[:100])
    assert all(pick_version(r, "1", "2", 0) == "1" for r in replies[:100])
    at_25 = {r for r in replies if pick_version(r, "1", "2", 25) == "2"}
    assert 0.22 < len(at_25) / len(replies) < 0.28
    at_60 = {r for r in replies if pick_version(r, "1", "2", 60) == "2"}
    assert at_25 < at_60  # ramping up only moves replies to the candidate
    assert {pick_version(replies[0], "1", "2", 25) for _ in range(5)} == {pick_version(str(replies[0]), "1", "2", 25)}
    assert all(0 <= bucket_of(r) < BUCKETS for r in replies[:100])


class FakeTriton:
    """Answers `is_model_ready` for the versions it has."""

    def __init__(self, ready: set[str]) -> None:
        self.ready = ready

    async def is_model_ready(self, name: str, version: str = "") -> bool:
        return version in self.ready


async def test_workers_follow_the_rollout_and_never_ask_for_a_version_triton_lacks(app: ChatApplication) -> None:
    reply = uuid4()
    triton = FakeTriton({"1", "2"})
    follower = RolloutFollower(app, triton, refresh_s=0.0)
    assert await follower.model_for("chat", reply) == "chat"  # no rollout: Triton's choice
    app.roll_out_model("chat", "2", 100, stable="1")
    assert await follower.model_for("chat", reply) == "chat/2"
    assert await follower.model_for("chat/1", reply) == "chat/1"  # a persona's pinned version stays
    triton.ready = {"1"}
    assert await follower.model_for("chat", reply) == "chat/1"  # candidate gone: stable
    triton.ready = {"2"}
    app.roll_back_model("chat")
    assert await follower.model_for("chat", reply) == "chat"  # stable gone too: Triton's choice
    cached = RolloutFollower(app, FakeTriton({"1", "2"}), refresh_s=60.0)
    assert await cached.model_for("chat", reply) == "chat/1"
    app.roll_out_model("chat", "2", 100)
    assert await cached.model_for("chat", reply) == "chat/1"  # within refresh_s: the view it read


# -- the model repository and fine-tuning -----------------------------------------------------------


def test_a_new_version_is_written_whole_beside_the_others_with_its_card(tmp_path: Path) -> None:
    import shutil

    shutil.copytree(REPO / "chat", tmp_path / "chat", ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    assert versions(tmp_path, "chat") == [1] and weights_folder(tmp_path, "chat") == "smollm2"

    def write(weights: Path, version: int) -> dict:
        assert (weights / "tokenizer.json").is_file()  # the base's tokenizer, copied
        assert not (tmp_path / "chat" / str(version)).exists()  # not visible until complete
        (weights / "model.safetensors").write_bytes(b"weights")
        return {"model": "chat", "version": str(version), "base_version": "1", "data": {"records": 3}, "metrics": {}}

    version, folder = create_version(tmp_path, "chat", 1, write)
    assert version == 2 and folder == tmp_path / "chat" / "2"
    assert (folder / "model.py").read_text() == (REPO / "chat" / "1" / "model.py").read_text()
    assert read_card(tmp_path, "chat", 2)["data"] == {"records": 3}
    assert (folder / "MODEL_CARD.md").read_text().startswith("# chat version 2")
    assert [p.name for p in (tmp_path / "chat").iterdir() if p.name.startswith(".")] == []
    assert json.loads((folder / CARD_JSON).read_text())["version"] == "2"
    config = json.loads(config_with_versions(tmp_path, "chat", ["2", "1"]))
    assert config["versionPolicy"] == {"specific": {"versions": ["1", "2"]}}
    assert config["name"] == "chat" and config["modelTransactionPolicy"] == {"decoupled": True}


def test_fine_tuning_learns_only_the_reply_and_its_end_of_turn() -> None:
    from chatbot.inference.tokenizer import ChatTokenizer
    from chatbot.training.finetune import IGNORE, encode, split_heldout

    tokenizer = ChatTokenizer.from_pretrained(REPO / "chat" / "1" / "demo")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello there."}]
    ids, labels = encode(tokenizer, messages, 512)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages[:-1]))
    assert ids[: len(prompt)] == prompt and labels[: len(prompt)] == [IGNORE] * len(prompt)
    target = [t for t in labels if t != IGNORE]
    assert target[-1] == tokenizer.eos_token_id and tokenizer.decode(target) == "Hello there."
    assert encode(tokenizer, messages[:2] + [{"role": "assistant", "content": "word " * 400}], 512) is None
    # a reply cut off at the token cap is learnt without its end-of-turn: it did not end there
    _, cut = encode(tokenizer, messages, 512, ended=False)
    cut_target = [t for t in cut if t != IGNORE]
    assert cut_target == target[:-1] and tokenizer.eos_token_id not in cut_target
    held = split_heldout([f"c{i}" for i in range(20)], 0.1)
    assert len(held) == 2 and held == split_heldout([f"c{i}" for i in reversed(range(20))], 0.1)
    assert split_heldout(["only"], 0.1) == set()


def test_a_conversation_imported_without_consent_stays_out_after_opting_in(app: ChatApplication, user: UUID) -> None:
    from tests.fakes import chatgpt_export

    cid = app.import_conversations(user, chatgpt_export()[:1])["conversation_ids"][0]
    app.set_training_consent(user, True)
    chat(app, user, "written after opting in", "a later reply", conversation=cid)
    dumped = json.dumps(export(app))
    assert "Moon's gravity" not in dumped and "What causes tides" not in dumped
