"""The `chatbot` command: `chatbot up` runs everything; the other subcommands are the
entry points of the single processes (what `chatbot up`, the tests and docker-compose run)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from uuid import UUID

from chatbot.ops.launcher import tool_settings
from chatbot.runtime.config import Settings, load_settings


def cmd_up(args: argparse.Namespace) -> int:
    from chatbot.ops.launcher import Stack
    from chatbot.ops.servers import Ports

    settings = load_settings()
    ports = Ports(api=args.port, metrics=args.metrics_port)
    stack = Stack(settings, ports, workers=args.workers, apis=args.api, nats_nodes=3 if args.nats_cluster else 1,
                  projectors=args.projectors, worker_groups=args.worker_groups, tritons=args.tritons)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()
        print("\nstopping…", flush=True)
        stack.request_stop()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting the stack (data in {settings.data_dir}); the first start takes a minute…", flush=True)
    stack.start()
    print(
        "\n  Chat:       " + "  ".join(u + "/" for u in stack.api_urls)
        + f"\n  Triton:     http://127.0.0.1:{ports.triton_http} (gRPC {ports.triton_grpc}, metrics {ports.triton_metrics})"
        + f"\n  NATS:       {stack.settings.nats_url} (monitor http://127.0.0.1:{ports.nats_monitor})"
        + f"\n  PostgreSQL: socket in {stack.settings.pg_host}"
        + "\n  Metrics:    " + "  ".join(f"{name} :{port}" for name, port in stack.metrics_ports.items())
        + "\n\nPress Ctrl-C to stop.\n",
        flush=True,
    )

    def on_restart(name: str, code: int | None) -> None:
        print(f"[supervisor] {name} exited ({code}); restarting", flush=True)

    try:
        stack.supervise(on_restart=on_restart)
    finally:
        stack.stop()
        print("stopped.", flush=True)
    return 0


def cmd_api(_: argparse.Namespace) -> int:
    import uvicorn

    settings = load_settings()
    uvicorn.run(
        "chatbot.ops.server:create_app", factory=True, host=settings.api_host, port=settings.api_port,
        log_level="warning", ws_max_size=1024 * 1024, lifespan="on",
    )
    return 0


def cmd_relay(_: argparse.Namespace) -> int:
    from workers.relay import run

    run()
    return 0


def cmd_worker(_: argparse.Namespace) -> int:
    from workers.inference import run

    run()
    return 0


def cmd_projector(_: argparse.Namespace) -> int:
    from projections.projector import run

    run()
    return 0


def cmd_bootstrap(_: argparse.Namespace) -> int:
    """Tables, the event stream (CHATBOT_STREAM_REPLICAS copies) and the built-in personas:
    run once before the other processes of a deployment (`chatbot up` does it itself)."""
    from chatbot.ops.bootstrap import bootstrap

    bootstrap(load_settings())
    return 0


def cmd_triton(args: argparse.Namespace) -> int:
    from chatbot.ops.servers import Ports, triton_argv, triton_env

    ports = Ports(triton_http=args.http_port, triton_grpc=args.grpc_port, triton_metrics=args.metrics_port)
    argv = triton_argv(ports, load_settings().model_repository)
    os.execve(argv[0], argv, triton_env())


def cmd_audit(args: argparse.Namespace) -> int:
    from datetime import datetime
    from uuid import UUID

    from eventsourcing.persistence import MapperDeserialisationError

    from chatbot.eventstore.application import chat_application
    from chatbot.ops.audit import audit, render_text
    from domain.conversation_errors import ConversationError

    if args.verify:
        return cmd_verify(args)
    if args.conversation_id is None or args.user or args.all:
        print("chatbot audit: name one CONVERSATION_ID (--user and --all go with --verify)", file=sys.stderr)
        return 2
    if not args.reason:
        print("chatbot audit: --reason is required: why you are reading it (it is recorded)", file=sys.stderr)
        return 2
    settings, _postgres = tool_settings()
    app = chat_application(settings)
    try:
        conversation_id = UUID(args.conversation_id)
        at = datetime.fromisoformat(args.at) if args.at else None
    except ValueError as e:
        print(f"chatbot audit: {e}", file=sys.stderr)
        return 2
    try:
        report = audit(app, conversation_id, operator=args.operator, reason=args.reason,
                       at_version=args.at_version, at=at)
    except ConversationError as e:
        print(f"chatbot audit: no such conversation: {e}", file=sys.stderr)
        return 1
    except MapperDeserialisationError as e:  # a stored event does not decrypt: it was altered
        print(f"chatbot audit: {e}\nrun `chatbot audit --verify {conversation_id}` to see what was changed",
              file=sys.stderr)
        return 1
    finally:
        app.close()
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else render_text(report))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`chatbot audit --verify`: exit 0 if the chain is intact, 1 if anything is wrong."""
    from uuid import UUID

    from chatbot.eventstore.application import chat_application
    from chatbot.ops.integrity import render_verification, stream_heads, verify
    from domain.user import UserError, check_email

    if sum(bool(x) for x in (args.conversation_id, args.user, args.all)) != 1:
        print("chatbot audit --verify: name one CONVERSATION_ID, --user EMAIL or --all", file=sys.stderr)
        return 2
    try:
        conversation_id = UUID(args.conversation_id) if args.conversation_id else None
        email = check_email(args.user) if args.user else None
    except (ValueError, UserError) as e:
        print(f"chatbot audit: {e}", file=sys.stderr)
        return 2
    settings, _postgres = tool_settings()
    app = chat_application(settings)
    try:
        ids: list[UUID] | None = None
        scope = "every aggregate"
        if conversation_id is not None:
            ids, scope = [conversation_id], f"conversation {conversation_id}"
        elif email is not None:
            user_id = app.user_id_by_email(email)
            if user_id is None:
                print(f"chatbot audit --verify: no user {email}", file=sys.stderr)
                return 1
            ids = list(dict.fromkeys([user_id, *app.keys.aggregates_of(user_id)]))
            scope = f"user {email}"
        try:  # the newest events, against the JetStream stream (chatbot/ops/integrity.py)
            stream: dict[UUID, int] | str = asyncio.run(stream_heads(settings, ids))
        except Exception as e:  # noqa: BLE001 - NATS may be down: say so, check the rest
            stream = f"not compared: the stream could not be read ({type(e).__name__}: {e})"
        report = verify(app, ids, every=ids is not None, stream=stream)
    finally:
        app.close()
    if ids is not None and report.aggregates == 0:
        print(f"chatbot audit --verify: no events for {scope}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2) if args.json else render_verification(report, scope))
    return 1 if report.problems else 0


def end_sessions(settings: Settings, user_id: UUID) -> None:
    """End every session of an erased user: their tokens stop working in every API process
    within a second (api/sessions.py); their API keys' last uses go too (api/key_use.py)."""
    from api.key_use import KeyUseStore
    from api.sessions import SessionStore
    from projections.readmodels import read_model_recorder

    recorder = read_model_recorder(settings.eventsourcing_env())
    try:
        SessionStore(recorder, settings.token_ttl_s).forget(user_id)
        KeyUseStore(recorder).forget(user_id)
    finally:
        recorder.datastore.close()


def cmd_erase_user(args: argparse.Namespace) -> int:
    from chatbot.eventstore.application import chat_application
    from domain.user import UserError, UserNotFound, check_email

    try:
        email = check_email(args.email)
    except UserError as e:
        print(f"chatbot erase-user: {e}", file=sys.stderr)
        return 2
    if not args.yes:
        print(f"chatbot erase-user: this destroys the key of {email}: their account and conversations"
              " become unreadable for good. Add --yes to do it.", file=sys.stderr)
        return 2
    settings, _postgres = tool_settings()
    app = chat_application(settings)
    user_id = app.user_id_by_email(email)
    try:
        if user_id is None:
            raise UserNotFound(email)
        erased = app.erase_user(user_id, by="operator")
        aggregates = len(app.keys.aggregates_of(user_id))
    except UserNotFound:
        print(f"chatbot erase-user: no user {email}", file=sys.stderr)
        return 1
    finally:
        app.close()
    end_sessions(settings, user_id)
    if erased:
        print(f"erased user {user_id}: key destroyed, the events of {aggregates} aggregates are unreadable;"
              " the read models drop their rows as the projector applies User.Erased")
    else:
        print(f"user {user_id} was erased already")
    return 0


def cmd_projections(args: argparse.Namespace) -> int:
    from projections.rebuild import PROJECTIONS, rebuild, status

    settings, _postgres = tool_settings()
    if args.action == "status":
        report = status(settings)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"event store head: notification {report['event_store_head']}")
        print(f"relay:            at {report['relay']['position']}, lag {report['relay']['lag']}")
        for name, p in report["projections"].items():
            print(f"projection {name}:  at {p['position']}, lag {p['lag']} ({', '.join(p['tables'])})")
        return 0
    if not args.all and args.name not in PROJECTIONS:
        print(f"chatbot projections rebuild: name one of {', '.join(PROJECTIONS)}, or --all", file=sys.stderr)
        return 2
    result = rebuild(settings, dry_run=args.dry_run, progress=not args.json)
    summary = {
        "events": result.events, "seconds": round(result.seconds, 3),
        "events_per_second": round(result.events_per_second), "position": result.position,
        "differences": result.differences, "switched": result.switched,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        changed = {t: n for t, n in result.differences.items() if n}
        print(f"replayed {result.events} events in {result.seconds:.2f} s: {result.events_per_second:,.0f} events/s")
        print("verified: identical to the live tables" if not changed else f"differences from the live tables: {changed}"
              + (" (-1: the live table has other columns, made by an older version: not compared)"
                 if -1 in changed.values() else ""))
        print("switched readers to the rebuilt tables" if result.switched else "dry run: live tables unchanged")
    return 0


def cmd_train_demo(args: argparse.Namespace) -> int:
    from chatbot.training.train import train_demo

    train_demo(args.out, args.minutes, threads=args.threads, init_from=args.init_from, lr=args.lr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatbot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the whole stack on embedded servers")
    up.add_argument("--api", type=int, default=1, help="API processes")
    up.add_argument("--workers", type=int, default=1, help="inference worker processes")
    up.add_argument("--tritons", type=int, default=1,
                    help="Triton instances; workers send each conversation to the same one (its KV cache is there)")
    up.add_argument("--port", type=int, default=8000, help="port of the first API process")
    up.add_argument("--metrics-port", type=int, default=19100,
                    help="/metrics of the first app process; the others count up from it (0: none)")
    up.add_argument("--nats-cluster", action="store_true", help="NATS as a 3-node cluster, the stream in 3 replicas")
    up.add_argument("--projectors", type=int, default=1,
                    help="projector processes, each over its share of CHATBOT_PARTITIONS")
    up.add_argument("--worker-groups", type=int, default=1,
                    help="split the workers into groups, each over its share of CHATBOT_PARTITIONS")
    up.set_defaults(func=cmd_up)
    for name, func, text in [
        ("api", cmd_api, "the Litestar API (websocket chat, REST, the chat page)"),
        ("relay", cmd_relay, "publish stored events to JetStream"),
        ("worker", cmd_worker, "generate replies with Triton"),
        ("projector", cmd_projector, "maintain the read models"),
        ("bootstrap", cmd_bootstrap, "create tables, the event stream and the built-in personas (safe to repeat)"),
    ]:
        sub.add_parser(name, help=text).set_defaults(func=func)
    triton = sub.add_parser("triton", help="run the Triton server on triton_models/")
    triton.add_argument("--http-port", type=int, default=18000)
    triton.add_argument("--grpc-port", type=int, default=18001)
    triton.add_argument("--metrics-port", type=int, default=18002)
    triton.set_defaults(func=cmd_triton)
    aud = sub.add_parser("audit", help="a conversation's events, and the conversation as it stood then")
    aud.add_argument("conversation_id", nargs="?", default=None)
    aud.add_argument("--verify", action="store_true",
                     help="recompute the hash chain; name every event altered or removed (exit 1 if any)")
    aud.add_argument("--user", default=None, metavar="EMAIL", help="with --verify: every event of this user")
    aud.add_argument("--all", action="store_true", help="with --verify: every event in the store")
    aud.add_argument("--at-version", type=int, default=None, help="reconstruct it at this version")
    aud.add_argument("--at", default=None, help="reconstruct it at this time (ISO 8601, UTC if no zone)")
    aud.add_argument("--json", action="store_true", help="machine-readable output")
    aud.add_argument("--operator", default=os.environ.get("USER", "operator"), help="who is looking (recorded)")
    aud.add_argument("--reason", default=None, help="why (recorded as an event on the conversation); required to read")
    aud.set_defaults(func=cmd_audit)
    erase = sub.add_parser("erase-user", help="crypto-shred a user: destroy their key, drop their read-model rows")
    erase.add_argument("email")
    erase.add_argument("--yes", action="store_true", help="really do it (it cannot be undone)")
    erase.set_defaults(func=cmd_erase_user)
    proj = sub.add_parser("projections", help="read-model projections: status, rebuild")
    proj.add_argument("action", choices=["status", "rebuild"])
    proj.add_argument("name", nargs="?", default=None, help="the projection to rebuild (chat)")
    proj.add_argument("--all", action="store_true", help="rebuild every projection")
    proj.add_argument("--dry-run", action="store_true", help="rebuild and verify, but keep the live tables")
    proj.add_argument("--json", action="store_true")
    proj.set_defaults(func=cmd_projections)
    train = sub.add_parser("train-demo", help="train the demo tokenizer and model on the chitchat conversations")
    train.add_argument("--out", default="triton_models/chat/1/demo", help="HF-layout output folder")
    train.add_argument("--minutes", type=float, default=15.0, help="wall-time budget")
    train.add_argument("--threads", type=int, default=2)
    train.add_argument("--init-from", default=None, help="continue from this checkpoint (keeps its tokenizer)")
    train.add_argument("--lr", type=float, default=2e-3)
    train.set_defaults(func=cmd_train_demo)
    from chatbot.ops.training_cli import add_retraining_commands

    add_retraining_commands(sub)  # dataset export, train, models list|rollout|rollback|promote
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
