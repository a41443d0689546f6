"""`ChatApplication`: the one application of the write side.

Methods load aggregates, call commands, save, and return ids or plain snapshots, never
aggregates. Optimistic concurrency of the event store (a unique originator version) settles
races: a command that loses one reloads and decides again, which is what makes a retried
send a no-op and a second outcome for one reply impossible.

The commands are grouped by area, one module each, mixed into this one class:

| module                      | area                                                        |
|-----------------------------|-------------------------------------------------------------|
| domain/app_accounts.py      | users, log-ins, erasure, API keys                           |
| domain/app_personas.py      | built-in and users' personas, their versions                |
| domain/app_conversations.py | starting, posting, editing, branches, titles, retention     |
| domain/app_replies.py       | reply jobs and their outcomes, feedback                     |
| domain/app_sharing.py       | share links, export and import                              |
| domain/app_training.py      | consent to training, model rollouts                         |
| domain/app_base.py          | what every area uses: the state, `_get`, `_owned`,          |
|                             | `_change_owned`, `_retry_races`                             |

It is one application composed per area, not one application per bounded context, because
an eventsourcing application is its own event store: its name ("chat") names the tables
(`chat_events`, `chat_snapshots`) and the one notification log that the relay and the
projector follow, and every aggregate of every area is in them, under one hash-chained
recorder and one set of per-user data keys (chatbot/eventstore/). A user's events span the
areas (their `User` and `ApiKey`, their conversations) and are shredded together when their
key is destroyed in the transaction that records `User.Erased`; several commands save
aggregates of two areas in one transaction (a user and the claim on their address, a user
and their API key, an imported conversation and its import record). Applications per area
would each need a store of their own, splitting those transactions, the notification log
and the chains, and a migration of the stored events into the new stores.

This class is plain eventsourcing (the library's in-memory store runs it as it is); the
event store's subclass, `StoredChatApplication` (chatbot/eventstore/application.py), puts
it on PostgreSQL with per-user keys, a caching repository and snapshots of conversations.
"""

from __future__ import annotations

from domain.app_accounts import AccountCommands
from domain.app_conversations import ConversationCommands
from domain.app_personas import PersonaCommands
from domain.app_replies import ReplyCommands
from domain.app_sharing import SharingCommands
from domain.app_training import TrainingCommands


class ChatApplication(
    ConversationCommands, ReplyCommands, SharingCommands, PersonaCommands, AccountCommands, TrainingCommands,
):
    """Every area's commands (an area that uses another's comes before it, as Python's
    method resolution order requires); one application, named "chat"."""

    name = "chat"
