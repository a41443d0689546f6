"""Loading a very long conversation, with and without snapshots.

Builds one conversation of 10,000 messages (5,000 user messages, each with its reply:
about 15,000 events, encrypted under the user's key and hash-chained as always) through
`ChatApplication` in an embedded PostgreSQL in a temporary directory, then loads it:
- from its newest snapshot and the events after it (`ChatApplication`, which snapshots a
  conversation every `SNAPSHOT_INTERVAL` events),
- from every event (the same store, snapshots switched off),
and prints the median load times, then the time of one more message and its reply each
way in a fresh process, which has to load the conversation first (a process that has it
in memory reads only the events after it).
The build keeps the conversation in memory between commands; the loads use fresh
applications.
Run: `.venv/bin/python bench/long_conversation.py [--messages 10000]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatbot.eventstore.application import (  # noqa: E402
    SNAPSHOT_INTERVAL,
    StoredChatApplication,
    chat_application,
)
from chatbot.ops.servers import EmbeddedPostgres  # noqa: E402
from chatbot.runtime.config import load_settings  # noqa: E402

OUTCOME = dict(finish_reason="stop", prompt_tokens=40, completion_tokens=12, ttft_ms=20.0,
               duration_ms=90.0, model_name="chat", model_version="1")


def timed(func: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median seconds of `repeat` calls, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="user messages and replies, together")
    parser.add_argument("--repeat", type=int, default=5, help="loads timed each way, alternated")
    args = parser.parse_args()
    turns = args.messages // 2
    with tempfile.TemporaryDirectory(prefix="longbench") as tmp:
        postgres = EmbeddedPostgres(Path(tmp) / "postgres")
        settings = dataclasses.replace(load_settings(Path(tmp)), pg_host=postgres.socket_dir)
        chat_application(settings, create_tables=True).close()
        builder = StoredChatApplication(env={
            **settings.eventsourcing_env(), "AGGREGATE_CACHE_MAXSIZE": "10", "DEEPCOPY_FROM_AGGREGATE_CACHE": "n",
        })
        builder.seed_personas()
        user = builder.register_user("bench@example.com", "correct horse")
        conversation_id = builder.start_conversation(user)
        started = time.perf_counter()
        for t in range(turns):
            posted = builder.post_message(conversation_id, user, f"m{t}", f"Message {t}: a question of a sentence or two.")
            builder.complete_reply(conversation_id, posted.reply_id, text=f"Reply {t}, a sentence or two long.", **OUTCOME)
            if (t + 1) % 500 == 0:
                print(f"  {2 * (t + 1):,} messages written", flush=True)
        built = time.perf_counter() - started
        builder.close()

        snapshotting = chat_application(settings)
        plain = StoredChatApplication(env={**settings.eventsourcing_env(), "IS_SNAPSHOTTING_ENABLED": "n"})
        assert snapshotting.snapshots is not None and plain.snapshots is None
        # Alternated, so that both see the same machine (it may be shared).
        loads: dict[str, list[float]] = {"snapshot": [], "events": []}
        for _ in range(args.repeat):
            for kind, app in (("snapshot", snapshotting), ("events", plain)):
                seconds, loaded = timed(lambda: app.repository.get(conversation_id), 1)
                loads[kind].append(seconds)
                if kind == "snapshot":
                    conversation = loaded
                else:
                    replayed = loaded
        assert vars(conversation) == vars(replayed), "the snapshot gives the state the events give"
        with_snapshot, without = statistics.median(loads["snapshot"]), statistics.median(loads["events"])
        (snapshot,) = snapshotting.snapshots.recorder.select_events(conversation_id, desc=True, limit=1)
        events = conversation.version

        snapshotting.close()
        plain.close()

        def first_command(env: dict[str, str], n: int) -> float:
            """One more message and its reply, in a fresh process: it loads the conversation."""
            app = StoredChatApplication(env=env)
            try:
                started = time.perf_counter()
                posted = app.post_message(conversation_id, user, f"extra-{n}", "One more question.")
                app.complete_reply(conversation_id, posted.reply_id, text="One more reply.", **OUTCOME)
                return time.perf_counter() - started
            finally:
                app.close()

        write_snap = statistics.median(first_command(settings.eventsourcing_env(), n) for n in range(3))
        write_plain = first_command({**settings.eventsourcing_env(), "IS_SNAPSHOTTING_ENABLED": "n"}, 3)
        postgres.stop()

    print(f"\nbuilt {len(conversation.messages):,} messages ({events:,} events) in {built:.1f} s")
    print(f"newest snapshot: version {snapshot.originator_version:,}, {len(snapshot.state) / 1e6:.2f} MB stored"
          f" (interval {SNAPSHOT_INTERVAL}; {events - snapshot.originator_version} events after it at the load)")
    print(f"load with snapshots:    {with_snapshot * 1000:9.1f} ms median, {min(loads['snapshot']) * 1000:.1f} best"
          f" (of {args.repeat})")
    print(f"load from every event:  {without * 1000:9.1f} ms median, {min(loads['events']) * 1000:.1f} best"
          f"  -> {without / with_snapshot:.1f}x")
    print(f"one more message and reply in a fresh process: {write_snap * 1000:.0f} ms with snapshots"
          f" (median of 3), {write_plain * 1000:.0f} ms without")


if __name__ == "__main__":
    main()
