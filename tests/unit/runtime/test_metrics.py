"""The pure parts of chatbot/runtime/metrics.py: bounded labels, lag split over partitions and
timed, a reply's token clock, the metrics port setting and the launcher's port per
process."""

from __future__ import annotations

import dataclasses
import socket

import pytest
from prometheus_client import CollectorRegistry, Gauge, Histogram

from chatbot.ops.launcher import Stack
from chatbot.ops.servers import Ports, free_port_run
from chatbot.runtime.config import load_settings
from chatbot.runtime.metrics import (
    FINISH_REASONS,
    PartitionLag,
    ReplyClock,
    apportion,
    bounded,
    serve,
)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_a_label_outside_its_set_becomes_other() -> None:
    assert bounded("stop", FINISH_REASONS) == "stop"
    assert bounded("8c4f1e9a-1d2b-4c3d-9e8f-0a1b2c3d4e5f", FINISH_REASONS) == "other"


def test_lag_is_split_in_proportion_to_what_was_read_and_adds_up() -> None:
    assert apportion(10, {0: 3, 1: 1}, range(4)) == {0: 8, 1: 2, 2: 0, 3: 0}
    assert apportion(7, {2: 5}, range(4)) == {0: 0, 1: 0, 2: 7, 3: 0}
    for total in range(50):
        assert sum(apportion(total, {0: 1, 1: 2, 3: 4}, range(4)).values()) == total


def test_lag_with_nothing_read_is_spread_evenly_and_never_negative() -> None:
    assert apportion(5, {}, [4, 5]) == {4: 3, 5: 2}
    assert apportion(-3, {0: 1}, [0, 1]) == {0: 0, 1: 0}


def test_a_partition_behind_counts_its_wait_from_when_it_fell_behind() -> None:
    registry = CollectorRegistry()
    now = [100.0]
    lag = PartitionLag(Gauge("lag_events", "", ["partition"], registry=registry),
                       Gauge("lag_seconds", "", ["partition"], registry=registry), range(2), clock=lambda: now[0])
    assert sample(registry, "lag_events", partition="1") == 0  # every partition has a series from the start
    lag.update(4, {0: 4})
    now[0] = 103.0
    lag.update(6, {0: 6})
    assert sample(registry, "lag_events", partition="0") == 6
    assert sample(registry, "lag_seconds", partition="0") == 3.0
    assert sample(registry, "lag_seconds", partition="1") == 0.0
    lag.update(0, {})
    now[0] = 110.0
    lag.update(1, {0: 1})
    assert sample(registry, "lag_seconds", partition="0") == 0.0  # caught up in between: a new wait


def test_a_partition_told_when_its_oldest_event_arrived_counts_from_then() -> None:
    registry = CollectorRegistry()
    lag = PartitionLag(Gauge("e", "", ["partition"], registry=registry),
                       Gauge("s", "", ["partition"], registry=registry), [3], clock=lambda: 50.0)
    lag.update(2, {3: 2}, oldest={3: 42.5})
    assert sample(registry, "s", partition="3") == 7.5


def test_a_reply_clock_times_its_first_token_and_the_mean_gap_after_it() -> None:
    registry = CollectorRegistry()
    first = Histogram("first", "", registry=registry)
    per_token = Histogram("per_token", "", registry=registry)
    clock = ReplyClock(10.0, first_token=first, per_token=per_token)
    for t in (10.5, 10.6, 10.7, 10.9):
        clock.token(t)
    clock.done()
    assert sample(registry, "first_sum") == pytest.approx(0.5)
    assert sample(registry, "per_token_sum") == pytest.approx(0.4 / 3)
    one = ReplyClock(0.0, first_token=first, per_token=per_token)
    one.token(1.0)
    one.done()  # one token: no gap to time
    assert sample(registry, "per_token_count") == 1


def test_no_metrics_port_serves_nothing_and_a_wrong_one_is_refused() -> None:
    assert serve(0) is False
    with pytest.raises(ValueError, match="CHATBOT_METRICS_PORT"):
        serve(70000)


def test_a_metrics_port_in_use_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(taken.getsockname()[1]) is False
    assert "metrics not served" in caplog.text


def test_the_metrics_port_setting_is_checked(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATBOT_METRICS_PORT", "9100")
    assert load_settings(tmp_path).metrics_port == 9100
    assert load_settings(tmp_path).to_env()["CHATBOT_METRICS_PORT"] == "9100"
    monkeypatch.setenv("CHATBOT_METRICS_PORT", "nine")
    with pytest.raises(ValueError, match="CHATBOT_METRICS_PORT must be a port number"):
        load_settings(tmp_path)
    monkeypatch.setenv("CHATBOT_METRICS_PORT", "-1")
    with pytest.raises(ValueError, match="CHATBOT_METRICS_PORT must be 0"):
        load_settings(tmp_path)


def test_each_process_of_a_stack_gets_its_own_metrics_port_kept_across_restarts(tmp_path) -> None:
    settings = dataclasses.replace(load_settings(tmp_path), partitions=4)
    stack = Stack(settings, Ports(metrics=19500), workers=3, apis=2, projectors=2)
    names = ["relay", "projector-0", "projector-1", "worker-0", "worker-1", "worker-2", "api-0", "api-1"]
    ports = [stack.metrics_port(n) for n in names]
    assert ports == list(range(19500, 19508))
    assert stack.metrics_port("worker-1") == 19504
    child = stack._app_child("worker-1", "worker")
    assert child.env["CHATBOT_METRICS_PORT"] == "19504"
    assert Stack(settings, Ports(metrics=0)).metrics_port("relay") == 0  # 0: no metrics


def test_random_ports_leave_a_run_of_free_metrics_ports() -> None:
    first = free_port_run(8)
    for port in range(first, first + 8):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free: would raise otherwise


def test_a_stack_refuses_metrics_ports_beyond_the_last_port(tmp_path) -> None:
    with pytest.raises(ValueError, match="metrics ports"):
        Stack(load_settings(tmp_path), Ports(metrics=65534), workers=2)
