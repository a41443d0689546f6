"""Projection rebuild rate: events replayed into fresh read-model tables per second.

Writes a synthetic but real history (users, conversations, messages and replies through
`ChatApplication`, encrypted and compressed as always) into an embedded PostgreSQL in a
temporary directory, then runs the rebuild of `projections/rebuild.py` and prints its
events/s. Goal: at least 10,000 events/s on 2 cores.
Run: `.venv/bin/python bench/rebuild.py [--conversations 2500]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.eventstore.application import chat_application  # noqa: E402
from chatbot.ops.servers import EmbeddedPostgres  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402
from projections.readmodels import read_model_recorder  # noqa: E402
from projections.rebuild import rebuild  # noqa: E402

OUTCOME = dict(finish_reason="stop", prompt_tokens=40, completion_tokens=12, ttft_ms=20.0,
               duration_ms=90.0, model_name="chat", model_version="1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=2500)
    parser.add_argument("--turns", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rebuildbench") as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "postgres")
        settings = dataclasses.replace(load_settings(Path(tmp)), pg_host=postgres.socket_dir)
        app = chat_application(settings, create_tables=True)
        app.seed_personas()
        read_model_recorder(settings.eventsourcing_env(create_tables=True)).datastore.close()
        user = app.register_user("bench@example.com", "correct horse")
        started = time.perf_counter()
        for c in range(args.conversations):
            conversation_id = app.start_conversation(user)
            for t in range(args.turns):
                posted = app.post_message(conversation_id, user, f"{c}-{t}", f"Message {t} of conversation {c}.")
                app.complete_reply(conversation_id, posted.reply_id, text=f"Reply {t}, a sentence or two long.", **OUTCOME)
        events = app.recorder.max_notification_id()
        print(f"wrote {events} events in {time.perf_counter() - started:.1f} s")
        app.close()
        report = rebuild(settings, progress=False)
        print(f"rebuild: {report.events} events in {report.seconds:.2f} s = {report.events_per_second:,.0f} events/s"
              f" (goal 10,000); switched: {report.switched}")
        postgres.stop()


if __name__ == "__main__":
    main()
