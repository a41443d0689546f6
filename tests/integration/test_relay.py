"""The relay's atomic batches, against a NATS server of the test's own (JetStream on files).

A batch that fails in the middle must leave nothing on the stream: with plain pipelined
publishes the events after a refused one were stored, and a retry then put the refused one
behind them, out of its conversation's order. A batch sent again after it was stored
(a relay killed before recording its position, or an ack lost) is refused whole, and the
stream's last message says how far the relay got."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from eventsourcing.persistence import Notification
from nats.js import JetStreamContext

from chatbot.bus.messaging import H_NOTIFICATION, ensure_stream
from chatbot.ops.launcher import wait_until
from chatbot.ops.servers import VENV_BIN, free_port
from workers import relay
from workers.relay import BatchRefused, atomic_batches, publish_atomic, relayed_through

pytestmark = pytest.mark.integration
STREAM = "CHAT"


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    store = tmp_path_factory.mktemp("relay-nats")
    server = subprocess.Popen(
        [str(VENV_BIN / "nats-server"), "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    def listening() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True

    try:
        wait_until(listening, 10, "nats-server", alive=lambda: server.poll() is None)
        yield f"nats://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


@pytest.fixture
async def js(nats_url: str) -> AsyncIterator[tuple[nats.NATS, JetStreamContext]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await ensure_stream(js, STREAM)
    yield nc, js
    await nc.close()


def notifications(first: int, count: int, conversation: uuid.UUID | None = None) -> list[Notification]:
    conversation = conversation or uuid.uuid4()
    return [
        Notification(id=first + i, originator_id=conversation, originator_version=1 + i,
                     topic="domain.conversation:Conversation.UserMessagePosted", state=f"event {first + i}".encode())
        for i in range(count)
    ]


async def stored(js: JetStreamContext) -> list[int]:
    """The notification ids on the stream, in stream order."""
    info = await js.stream_info(STREAM)
    ids = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1) if info.state.messages else ():
        message = await js.get_msg(STREAM, seq=seq)
        ids.append(int(message.headers[H_NOTIFICATION]))
    return ids


async def test_a_batch_refused_in_the_middle_stores_none_of_it(js, monkeypatch: pytest.MonkeyPatch) -> None:
    nc, jsc = js
    batch = notifications(1, 10)
    plain = relay.event_headers

    def one_bad(n: Notification) -> dict[str, str]:
        headers = plain(n)
        if n.id == 4:  # the server refuses this one message: it expects another stream
            headers["Nats-Expected-Stream"] = "NOT-THIS-ONE"
        return headers

    monkeypatch.setattr(relay, "event_headers", one_bad)
    with pytest.raises(BatchRefused):
        await publish_atomic(nc, batch, 1)
    assert await stored(jsc) == [], "events after the refused one were stored ahead of it"
    assert await relayed_through(jsc, STREAM) == 0

    monkeypatch.setattr(relay, "event_headers", plain)
    seq = await publish_atomic(nc, batch, 1)
    assert seq == 10
    assert await stored(jsc) == list(range(1, 11))


async def test_a_batch_sent_again_is_refused_and_the_stream_says_where_to_go_on(js) -> None:
    nc, jsc = js
    first, second = notifications(1, 5), notifications(6, 5)
    await publish_atomic(nc, first, 4)
    await publish_atomic(nc, second, 4)
    # the relay died before recording its position: it would send the second batch again
    with pytest.raises(BatchRefused, match="duplicate"):
        await publish_atomic(nc, second + notifications(11, 2), 4)
    assert await relayed_through(jsc, STREAM) == 10
    await publish_atomic(nc, notifications(11, 2), 4)
    assert await stored(jsc) == list(range(1, 13)), "every event once, in notification order"


def test_batches_stay_within_the_servers_limits() -> None:
    many = notifications(1, 2_500)
    batches = list(atomic_batches(many))
    assert [len(b) for b in batches] == [1_000, 1_000, 500]
    assert [n.id for b in batches for n in b] == list(range(1, 2_501))

    big = [Notification(id=i, originator_id=uuid.uuid4(), originator_version=1, topic="t",
                        state=b"x" * (1_500_000)) for i in range(1, 6)]
    sizes = [len(b) for b in atomic_batches(big)]
    assert sizes == [2, 2, 1] and all(sum(len(n.state) for n in b) <= relay.ATOMIC_MAX_BYTES
                                      for b in atomic_batches(big))
    # an event larger than the byte cap still goes, alone
    huge = Notification(id=6, originator_id=uuid.uuid4(), originator_version=1, topic="t", state=b"x" * (5 << 20))
    assert [[n.id for n in b] for b in atomic_batches([big[0], huge, big[1]])] == [[1], [6], [2]]


async def test_a_stream_that_ends_beyond_the_event_store_is_not_trusted(js) -> None:
    """The database restored from a backup while the stream kept its store: the stream's
    last notification id is beyond the event store's newest, and going on from it would
    skip the events stored from now on. The relay goes on from its recorded position."""
    from types import SimpleNamespace

    from workers.relay import stream_end

    nc, jsc = js
    await publish_atomic(nc, notifications(1, 12), 4)

    def log(head: int) -> SimpleNamespace:  # the event log, as far as `stream_end` reads it
        return SimpleNamespace(head=lambda: head)

    assert await stream_end(jsc, STREAM, log(40)) == 12
    assert await stream_end(jsc, STREAM, log(12)) == 12
    assert await stream_end(jsc, STREAM, log(5)) == 0
