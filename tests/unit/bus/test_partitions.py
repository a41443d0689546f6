"""Partitions: the configuration, the consumers' names and filters, where each partition's
projection stands, and the NATS cluster's configuration."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from chatbot.bus.messaging import (
    assign_partitions,
    consumer_filters,
    consumer_name,
    partition_of,
)
from chatbot.ops.launcher import Stack
from chatbot.ops.servers import NatsNode, Ports, nats_cluster_config
from chatbot.runtime.config import format_partitions, load_settings, parse_partitions
from projections.positions import PartitionPositions, parse_tracking_name, tracking_name


def test_a_partition_list_reads_single_partitions_and_ranges() -> None:
    assert parse_partitions("", 8) == ()
    assert parse_partitions("0-3, 6", 8) == (0, 1, 2, 3, 6)
    assert parse_partitions("6,0-1,1", 8) == (0, 1, 6)
    assert format_partitions((0, 1, 2, 3, 6)) == "0-3,6"
    assert format_partitions((0, 2, 4), sep="_") == "0_2_4"
    for chosen in [(), (5,), (0, 1, 2, 3, 4, 5, 6, 7), (1, 3, 4, 5, 7)]:
        assert parse_partitions(format_partitions(chosen), 8) == chosen


@pytest.mark.parametrize("spec, words", [
    ("8", "outside partitions 0-7"), ("3-1", "outside"), ("a", "not a partition"), ("1-", "not a partition"),
    ("-1", "not a partition"),
])
def test_a_partition_list_outside_the_partitions_is_refused_clearly(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_partitions(spec, 8)


def test_settings_refuse_a_bad_partition_count_or_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATBOT_PARTITIONS", "0")
    with pytest.raises(ValueError, match="CHATBOT_PARTITIONS must be at least 1"):
        load_settings(tmp_path)
    monkeypatch.setenv("CHATBOT_PARTITIONS", "4")
    monkeypatch.setenv("CHATBOT_CONSUME_PARTITIONS", "2-5")
    with pytest.raises(ValueError, match="CHATBOT_CONSUME_PARTITIONS"):
        load_settings(tmp_path)
    monkeypatch.setenv("CHATBOT_CONSUME_PARTITIONS", "1,3")
    settings = load_settings(tmp_path)
    assert (settings.partitions, settings.consume_partitions) == (4, (1, 3))
    assert settings.to_env()["CHATBOT_CONSUME_PARTITIONS"] == "1,3"


def test_the_default_is_one_partition_read_by_one_consumer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("CHATBOT_PARTITIONS", "CHATBOT_CONSUME_PARTITIONS", "CHATBOT_STREAM_REPLICAS"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings(tmp_path)
    assert (settings.partitions, settings.consume_partitions, settings.stream_replicas) == (1, (), 1)
    assert consumer_name("workers", settings.consume_partitions) == "workers"
    assert consumer_filters("Conversation.ReplyRequested", settings.consume_partitions) is None


def test_a_consumer_over_some_partitions_has_its_own_name_and_filters() -> None:
    assert consumer_name("workers", (0, 1, 2, 3, 6)) == "workers-p0-3_6"
    assert consumer_filters("Conversation.ReplyRequested", (1, 3)) == [
        "chat.ev.1.Conversation.ReplyRequested", "chat.ev.3.Conversation.ReplyRequested",
    ]
    assert consumer_filters(">", (2,)) == ["chat.ev.2.>"]


def test_partitions_are_dealt_to_consumer_groups_round_robin_each_exactly_once() -> None:
    groups = assign_partitions(8, 3)
    assert groups == [(0, 3, 6), (1, 4, 7), (2, 5)]
    assert sorted(p for g in groups for p in g) == list(range(8))
    with pytest.raises(ValueError, match="need 1 to 4 partitions"):
        assign_partitions(4, 5)


def test_the_cluster_urls_are_a_comma_separated_list(tmp_path: Path) -> None:
    settings = dataclasses.replace(load_settings(tmp_path), nats_url="nats://a:1, nats://b:2,nats://c:3")
    assert settings.nats_servers == ["nats://a:1", "nats://b:2", "nats://c:3"]


# -- positions per partition ----------------------------------------------------------------


def test_one_partition_keeps_the_single_chat_position() -> None:
    assert tracking_name(0, 1) == "chat"
    assert tracking_name(3, 8) == "chat.p3of8"
    assert parse_tracking_name("chat.p3of8") == (3, 8)
    assert parse_tracking_name("chat") == (0, 1)
    assert parse_tracking_name("other") is None
    positions = PartitionPositions.from_rows({"chat": 42}, 1)
    assert positions.applied == {0: 42} and positions.head == 42


def test_each_partition_moves_on_its_own() -> None:
    a, b = next_ids_on_two_partitions(4)
    positions = PartitionPositions.from_rows({tracking_name(partition_of(a, 4), 4): 10}, 4)
    assert positions.is_applied(a, 10) and not positions.is_applied(a, 11)
    assert not positions.is_applied(b, 5)  # nothing applied on b's partition yet
    positions.record(b, 20)
    assert positions.is_applied(b, 20) and not positions.is_applied(a, 15)
    assert positions.tracking(b, 21).application_name == tracking_name(partition_of(b, 4), 4)
    assert positions.head == 20


def test_a_new_partition_layout_starts_where_the_old_one_stopped() -> None:
    # one partition until notification 100, then four: every partition starts at 100
    moved = PartitionPositions.from_rows({"chat": 100}, 4)
    assert moved.applied == {0: 100, 1: 100, 2: 100, 3: 100}
    # four partitions (the newest at 170) back to one: it starts at 170, not at its old 100
    back = PartitionPositions.from_rows({"chat": 100, "chat.p0of4": 150, "chat.p1of4": 170}, 1)
    assert back.applied == {0: 170}
    # the same layout: a quiet partition is not pulled forward by the busy ones
    same = PartitionPositions.from_rows({"chat.p0of4": 150, "chat.p1of4": 170}, 4)
    assert same.applied == {0: 150, 1: 170, 2: 0, 3: 0}


def next_ids_on_two_partitions(partitions: int) -> tuple[uuid.UUID, uuid.UUID]:
    first = uuid.uuid4()
    while True:
        second = uuid.uuid4()
        if partition_of(second, partitions) != partition_of(first, partitions):
            return first, second


# -- the NATS cluster and the launcher's layout -----------------------------------------------


def test_each_cluster_node_routes_to_the_others_and_fsyncs_every_write(tmp_path: Path) -> None:
    nodes = [NatsNode(f"nats-{i}", 4000 + i, 5000 + i, 6000 + i) for i in range(3)]
    text = nats_cluster_config(tmp_path, nodes[1], nodes).read_text()
    assert "server_name: nats-1" in text and "listen: 127.0.0.1:4001" in text
    assert "routes: [nats-route://127.0.0.1:6000, nats-route://127.0.0.1:6002]" in text
    assert "listen: 127.0.0.1:6001" in text
    assert "sync_interval: always" in text
    assert str(tmp_path / "nats-1" / "jetstream") in text


def test_a_clustered_partitioned_stack_gives_every_partition_to_one_projector(tmp_path: Path) -> None:
    settings = dataclasses.replace(load_settings(tmp_path), partitions=4)
    stack = Stack(settings, Ports.random(), workers=3, nats_nodes=3, projectors=2, worker_groups=2)
    assert stack.settings.stream_replicas == 3
    assert stack.settings.nats_servers == [n.url for n in stack.nats_nodes] and len(stack.nats_nodes) == 3
    assert stack.projector_partitions == [(0, 2), (1, 3)]
    assert stack.worker_partitions == [(0, 2), (1, 3)]
    with pytest.raises(ValueError, match="1 server or a cluster of 3"):
        Stack(settings, Ports.random(), nats_nodes=2)
    with pytest.raises(ValueError, match="worker groups need at least as many workers"):
        Stack(settings, Ports.random(), workers=1, worker_groups=2)  # partitions nobody would serve
