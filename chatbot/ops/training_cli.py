"""The retraining commands of `chatbot`: `dataset export`, `train`, `models list|rollout|
rollback|promote`. Each validates its arguments, says plainly what went wrong (exit 2 for
bad arguments, 1 for a refused operation) and reads the events through `ChatApplication`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

EXIT_REFUSED, EXIT_USAGE = 1, 2


def _fail(command: str, message: str, code: int = EXIT_REFUSED) -> int:
    print(f"chatbot {command}: {message}", file=sys.stderr)
    return code


def _with_app(func: Callable[..., int]) -> Callable[[argparse.Namespace], int]:
    """Run `func(args, settings, app)` against the configured (or embedded) PostgreSQL."""

    def run(args: argparse.Namespace) -> int:
        from chatbot.eventstore.application import chat_application
        from chatbot.ops.launcher import tool_settings

        settings, _postgres = tool_settings()
        app = chat_application(settings)
        try:
            return func(args, settings, app)
        finally:
            app.close()

    return run


def cmd_dataset_export(args: argparse.Namespace, settings: Any, app: Any) -> int:
    from chatbot.training.dataset import (
        ExportError,
        ExportFilter,
        export_dataset,
        parse_when,
    )

    try:
        filters = ExportFilter(
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
            rating=args.rating, persona=args.persona,
        )
    except ExportError as e:
        return _fail("dataset export", str(e), EXIT_USAGE)
    out = Path(args.output)
    report = export_dataset(app, out, filters, progress=not args.quiet)
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(report.skipped.items())) or "none"
    print(f"wrote {report.records} records to {out} ({report.replies} replies in {report.conversations} "
          f"conversations of consenting users, {report.events} events scanned); left out: {skipped}",
          file=sys.stderr)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from chatbot.inference.repository import ModelRepositoryError
    from chatbot.runtime.config import load_settings
    from chatbot.training.dataset import ExportError
    from chatbot.training.finetune import FinetuneError
    from chatbot.training.versions import train
    from domain.model_rollout import RolloutError

    settings = load_settings()
    if args.model_repository:
        import dataclasses

        settings = dataclasses.replace(settings, model_repository=Path(args.model_repository).resolve())
    hyper = {k: v for k, v in {"batch_size": args.batch_size, "lr": args.lr, "threads": args.threads,
                                "heldout": args.heldout, "seed": args.seed}.items() if v is not None}
    try:
        card = train(settings, Path(args.data), args.max_steps, model=args.model, base=args.base, **hyper)
    except (ExportError, FinetuneError, ModelRepositoryError, RolloutError) as e:
        return _fail("train", str(e), EXIT_USAGE if isinstance(e, (ExportError, FinetuneError)) else EXIT_REFUSED)
    m = card["metrics"]
    print(json.dumps(card, indent=2) if args.json else (
        f"{card['model']} version {card['version']} (from version {card['base_version']}) in {card['path']}\n"
        f"  records: {card['data']['records']} ({card['data']['train_records']} trained on, "
        f"{card['data']['heldout_records']} held out, left out: {card['data']['excluded'] or 'none'})\n"
        f"  held-out loss: {m['heldout_loss_before']:.4f} before, {m['heldout_loss_after']:.4f} after "
        f"({m['heldout_tokens']} tokens)\n"
        f"  next: chatbot models rollout {card['model']} {card['version']} --percent 10"
    ))
    return 0


def cmd_models(args: argparse.Namespace, settings: Any, app: Any) -> int:
    from tritonclient.utils import InferenceServerException

    from chatbot.inference.repository import ModelRepositoryError
    from chatbot.training import versions as models
    from domain.model_rollout import RolloutError, RolloutNotFound

    command = f"models {args.action}"
    try:
        if args.action == "list":
            listed = models.list_models(settings, app)
            print(json.dumps(listed, indent=2, default=str) if args.json else models.render_list(listed))
            return 0
        if args.action == "rollout":
            state = models.rollout(settings, app, args.model, args.version, args.percent, stable=args.stable)
            done = f"{state['percent']:g}% of new replies go to version {state['candidate']}"
        elif args.action == "rollback":
            state = models.rollback(settings, app, args.model, unload=not args.keep_loaded)
            done = f"every new reply goes to version {state['stable']} again"
        else:
            state = models.promote(settings, app, args.model, unload=not args.keep_loaded)
            done = f"version {state['stable']} is the stable version"
    except RolloutNotFound:
        return _fail(command, f"no rollout of {args.model!r} is recorded")
    except (RolloutError, ModelRepositoryError) as e:
        return _fail(command, str(e))
    except InferenceServerException as e:
        return _fail(command, f"Triton at {settings.triton_url}: {e.message()}")
    print(json.dumps(state, indent=2, default=str) if args.json else f"{args.model}: {done}")
    return 0


def cmd_models_add(args: argparse.Namespace) -> int:
    """Put a checkpoint into the model repository; a new model is loaded into every Triton
    that can be reached (a new version waits for `models rollout`)."""
    import dataclasses

    from chatbot.inference.checkpoint import UnsupportedCheckpoint
    from chatbot.inference.repository import (
        ModelRepositoryError,
        add_checkpoint,
        load_versions,
        models,
    )
    from chatbot.runtime.config import load_settings

    settings = load_settings()
    if args.model_repository:
        settings = dataclasses.replace(settings, model_repository=Path(args.model_repository).resolve())
    repository = settings.model_repository
    new = args.name not in models(repository)
    try:
        version, folder = add_checkpoint(repository, args.name, Path(args.source))
    except UnsupportedCheckpoint as e:
        return _fail("models add", f"cannot serve {args.source}: {e}")
    except (ModelRepositoryError, OSError, ValueError) as e:
        return _fail("models add", str(e))
    except Exception as e:  # noqa: BLE001 - e.g. torch refusing the weights: said, not a traceback
        return _fail("models add", f"cannot load {args.source}: {type(e).__name__}: {e}")
    card = json.loads((folder / "model_card.json").read_text())
    loaded: list[str] = []
    if new and not args.no_load:
        for url in settings.triton_urls:
            try:
                load_versions(url, repository, args.name, [str(version)])
                loaded.append(url)
            except Exception as e:  # noqa: BLE001 - Triton down: it loads every model when it starts
                print(f"chatbot models add: Triton at {url} did not load it ({e}); it will when it starts",
                      file=sys.stderr)
    if args.json:
        print(json.dumps({**card, "folder": str(folder), "loaded_in": loaded}, indent=2))
    else:
        print(f"added {args.name} version {version} ({card['architecture']}, {card['parameters']:,} parameters)"
              f" in {folder}")
        print(f"personas can name it: \"{args.name}\"" if new else
              f"serve it with: chatbot models rollout {args.name} {version} --percent 10")
    return 0


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= number <= 100.0:
        raise argparse.ArgumentTypeError(f"a share of new replies from 0 to 100, got {value}")
    return number


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"at least 1, got {number}")
    return number


def add_retraining_commands(sub: Any) -> None:
    dataset = sub.add_parser("dataset", help="training data from the conversations users consented to share")
    dataset_sub = dataset.add_subparsers(dest="action", required=True)
    export = dataset_sub.add_parser("export", help="write chat records (JSON lines) of consented, completed replies")
    export.add_argument("-o", "--output", required=True, help="the JSONL file to write")
    export.add_argument("--since", help="replies written at or after this date/time (ISO 8601, UTC if no zone)")
    export.add_argument("--until", help="replies written before this date/time (exclusive)")
    export.add_argument("--rating", choices=["up", "down"], help="only replies with this latest rating")
    export.add_argument("--persona", help="only replies written as this persona (slug)")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    export.set_defaults(func=_with_app(cmd_dataset_export))

    train = sub.add_parser("train", help="fine-tune a model on exported records into a new model version")
    train.add_argument("--data", required=True, help="a file written by `chatbot dataset export`")
    train.add_argument("--max-steps", required=True, type=_positive, help="optimizer steps")
    train.add_argument("--model", default="chat", help="the model in the repository (default: chat)")
    train.add_argument("--base", type=_positive, default=None, help="the version to start from (default: the newest)")
    train.add_argument("--batch-size", type=_positive, default=None, help="records per step (default 8)")
    train.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-4)")
    train.add_argument("--heldout", type=float, default=None, help="share of conversations held out (default 0.1)")
    train.add_argument("--threads", type=_positive, default=None, help="torch CPU threads (default 2)")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument("--model-repository", default=None, help="default: CHATBOT_MODEL_REPOSITORY or triton_models/")
    train.add_argument("--json", action="store_true", help="print the model card as JSON")
    train.set_defaults(func=cmd_train)

    models = sub.add_parser("models", help="model versions, and rolling them out to a share of new replies")
    models_sub = models.add_subparsers(dest="action", required=True)
    listing = models_sub.add_parser("list", help="models, versions, what Triton has loaded, rollouts, personas")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=_with_app(cmd_models))
    roll = models_sub.add_parser("rollout", help="load VERSION into Triton and send it PERCENT of new replies")
    roll.add_argument("model")
    roll.add_argument("version")
    roll.add_argument("--percent", type=_percent, required=True, help="share of new replies, 0-100")
    roll.add_argument("--stable", default=None,
                      help="the version serving until now (first rollout only; default: Triton's newest other one)")
    roll.add_argument("--json", action="store_true")
    roll.set_defaults(func=_with_app(cmd_models))
    add = models_sub.add_parser("add", help="put your own checkpoint (a Hugging Face folder or a GGUF file)"
                                " into the repository, as a new model or the next version of one")
    add.add_argument("source", help="a Hugging Face checkpoint folder, or a .gguf file")
    add.add_argument("--name", required=True, help="the model's name (a new one, or an existing model's next version)")
    add.add_argument("--no-load", action="store_true", help="do not load a new model into the running Triton")
    add.add_argument("--model-repository", default=None, help="default: CHATBOT_MODEL_REPOSITORY or triton_models/")
    add.add_argument("--json", action="store_true")
    add.set_defaults(func=cmd_models_add)
    for action, text in [("rollback", "every new reply back on the stable version; unload the candidate"),
                         ("promote", "the candidate becomes the stable version; unload the old one")]:
        p = models_sub.add_parser(action, help=text)
        p.add_argument("model")
        p.add_argument("--keep-loaded", action="store_true", help="leave the other version loaded in Triton")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=_with_app(cmd_models))
