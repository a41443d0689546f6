"""Every process's `/metrics`, scraped from the real stack around one chat message: the
series that message must move have moved in the process that saw it, the lag gauges exist
for every partition, and no label value anywhere is an id. (Counts only: timings vary.)"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatbot.ops.launcher import Stack
from tests.client import ChatClient, collect_reply, recv, send
from tests.waiting import async_eventually

pytestmark = pytest.mark.integration

UUID_LIKE = re.compile(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}", re.I)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_all(stack: Stack) -> dict[str, Samples]:
    return {name: scrape(port) for name, port in stack.metrics_ports.items()}


async def moved(stack: Stack, before: dict[str, Samples], done: Callable[[dict[str, Samples]], bool],
                timeout: float = 30) -> dict[str, Samples]:
    """Scrape every process until `done` says what should have moved has (a reply's outcome
    is counted just after its end goes out), or the deadline passes."""
    return await async_eventually(lambda: asyncio.to_thread(scrape_all, stack), until=done, timeout=timeout,
                                  interval=0.2, what="the metrics moved", fail=False)


async def test_one_message_moves_the_series_of_every_process_it_crosses(stack: Stack, client: ChatClient) -> None:
    assert {"relay", "projector", "worker-0", "api-0"} <= set(stack.metrics_ports)
    conversation_id = await client.start_conversation()
    before = await asyncio.to_thread(scrape_all, stack)

    async with client.ws() as ws:
        await send(ws, conversation_id, "Say hello in three words.")
        _, tokens, reply = await collect_reply(ws)
    finish = reply["finish_reason"]

    def grew(process: str, name: str, by: float = 1, **labels: str) -> Callable[[dict[str, Samples]], bool]:
        return lambda after: value(after[process], name, **labels) - value(before[process], name, **labels) >= by

    checks = {
        "frames in: send": grew("api-0", "chat_websocket_frames_total", direction="in", type="send"),
        "frames out: accepted": grew("api-0", "chat_websocket_frames_total", direction="out", type="accepted"),
        "frames out: token": grew("api-0", "chat_websocket_frames_total", len(tokens), direction="out", type="token"),
        "frames out: reply": grew("api-0", "chat_websocket_frames_total", direction="out", type="reply"),
        "send -> accepted": grew("api-0", "chat_send_accepted_seconds_count"),
        "first token (API)": grew("api-0", "chat_api_first_token_seconds_count"),
        "first token (worker)": grew("worker-0", "chat_worker_first_token_seconds_count"),
        "outcome": grew("worker-0", "chat_replies_total", finish_reason=finish),
        "Triton request": grew("worker-0", "chat_triton_request_seconds_count", outcome="ok"),
        "group commits (API)": grew("api-0", "chat_group_commit_saves_count"),
        "group commits (worker)": grew("worker-0", "chat_group_commit_events_count"),
    }
    if len(tokens) > 1:
        checks["per token (API)"] = grew("api-0", "chat_api_time_per_output_token_seconds_count")
        checks["per token (worker)"] = grew("worker-0", "chat_worker_time_per_output_token_seconds_count")
    after = await moved(stack, before, lambda a: all(check(a) for check in checks.values()))
    assert not [what for what, check in checks.items() if not check(after)], "series that did not move"

    for partition in range(stack.settings.partitions):
        for process, name in [("relay", "chat_relay_lag_events"), ("relay", "chat_relay_lag_seconds"),
                              ("projector", "chat_projector_lag_events"), ("projector", "chat_projector_lag_seconds")]:
            assert (name, frozenset({("partition", str(partition))})) in after[process], f"{process}: no {name} {partition}"
    assert ("chat_websockets_open", frozenset()) in after["api-0"]

    ids = {(process, name, label, v) for process, samples in after.items()
           for name, labels in samples for label, v in labels if UUID_LIKE.search(v)}
    assert not ids, f"label values that are ids: {sorted(ids)[:5]}"


async def test_an_unknown_frame_is_counted_as_invalid_not_by_its_type(stack: Stack, client: ChatClient) -> None:
    port = stack.metrics_ports["api-0"]
    before = await asyncio.to_thread(scrape, port)
    async with client.ws() as ws:
        await ws.send('{"type": "8c4f1e9a-1d2b-4c3d-9e8f-0a1b2c3d4e5f"}')
        await asyncio.wait_for(ws.recv(), 10)  # its error frame
    after = await asyncio.to_thread(scrape, port)
    invalid = {"direction": "in", "type": "invalid"}
    assert value(after, "chat_websocket_frames_total", **invalid) == value(before, "chat_websocket_frames_total", **invalid) + 1
    assert not any(UUID_LIKE.search(v) for _, labels in after for _, v in labels)


async def test_a_worker_counts_the_replies_it_is_writing_while_it_writes_them(stack: Stack, client: ChatClient) -> None:
    """chat_worker_replies_writing: 0 everywhere before the message, 1 in exactly one worker
    from its first token until the end, 0 everywhere after it (the compose test finds the
    worker to kill by it)."""
    conversation_id = await client.start_conversation()
    workers = [name for name in stack.metrics_ports if name.startswith("worker")]

    def writing(samples: dict[str, Samples]) -> list[float]:
        return [value(samples[w], "chat_worker_replies_writing") for w in workers]

    # the stack is shared: a reply an earlier test left running ends first (bounded)
    idle = await moved(stack, {}, lambda a: sum(writing(a)) == 0, timeout=120)
    assert sum(writing(idle)) == 0, f"replies still written before the test: {dict(zip(workers, writing(idle)))}"
    async with client.ws() as ws:
        await send(ws, conversation_id, "Tell me a long story about the sea.")
        while (frame := await recv(ws))["type"] != "token":
            assert frame["type"] == "accepted", frame
        during = writing(await asyncio.to_thread(scrape_all, stack))
        await collect_reply(ws)
    assert max(during) == 1 and sum(during) == 1, f"while writing: {dict(zip(workers, during))}"
    after = await moved(stack, {}, lambda a: sum(writing(a)) == 0)
    assert sum(writing(after)) == 0, f"after the reply: {dict(zip(workers, writing(after)))}"
