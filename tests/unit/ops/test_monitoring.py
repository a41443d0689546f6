"""deploy/prometheus.yml and the Grafana dashboard against docker-compose.yml and the code:
every scrape target names a service of the compose file on a port it serves metrics on,
every app process and Triton is scraped, the Grafana files the compose file mounts exist,
and every series the dashboard draws is one that some process exports."""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from prometheus_client import REGISTRY

import chatbot.runtime.metrics  # noqa: F401 - registers every chat_* series
from chatbot.runtime.config import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"
PROMETHEUS = REPO_ROOT / "deploy" / "prometheus.yml"
DASHBOARD = REPO_ROOT / "deploy" / "grafana" / "chat-dashboard.json"
TRITON_METRICS_PORT = 8002
# Series of Triton (nv_*) and of the chat model's python backend (triton_models/chat/1/model.py)
TRITON_SERIES = {"nv_inference_pending_request_count", "chat_queue_length", "chat_active_sequences"}


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def targets() -> list[tuple[str, str, int]]:
    """(job, service, port) of every scrape target."""
    found = []
    for job in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            found += [(job["job_name"], name, int(sd["port"])) for name in sd["names"]]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                found.append((job["job_name"], host, int(port)))
    return found


def app_command(service: dict[str, Any]) -> str | None:
    command = service.get("command") or []
    return command[1] if len(command) > 1 and command[0] == "chatbot" else None


def test_every_scrape_target_is_a_compose_service_on_its_metrics_port() -> None:
    services = compose()["services"]
    for job, host, port in targets():
        if job == "prometheus":
            assert (host, port) == ("localhost", 9090)
            continue
        assert host in services, f"job {job} scrapes {host}, which docker-compose.yml does not run"
        if host == "triton":
            assert port == TRITON_METRICS_PORT and f"--metrics-port={port}" in services[host]["command"]
        else:
            env = services[host]["environment"]
            assert env["CHATBOT_METRICS_PORT"] == str(port), f"{host} serves metrics on {env['CHATBOT_METRICS_PORT']}"
            assert env["CHATBOT_METRICS_HOST"] == "0.0.0.0", f"{host}'s metrics must listen beyond its container"
            assert str(port) in services[host]["expose"]


def test_every_long_running_app_process_and_triton_is_scraped() -> None:
    services = compose()["services"]
    running = {name for name, s in services.items() if app_command(s) in {"api", "relay", "worker", "projector"}}
    scraped = {host for _, host, _ in targets()}
    assert running and running | {"triton"} <= scraped, f"not scraped: {sorted(running | {'triton'} - scraped)}"
    for _, host, _ in targets():
        if host in running:  # the job is named for what the process is: the dashboard selects by it
            assert any(job == app_command(services[host]) for job, h, _ in targets() if h == host)


def test_the_metrics_port_is_not_the_one_nginx_passes_on() -> None:
    nginx = (REPO_ROOT / "deploy" / "nginx.conf").read_text()
    upstreams = set(re.findall(r"server\s+[\w.-]+:(\d+)", nginx))
    assert upstreams and "9100" not in upstreams


def test_grafana_gets_the_dashboard_and_its_data_source_from_files_that_exist() -> None:
    services = compose()["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{service} mounts {source}, which is missing"
    datasource = yaml.safe_load((REPO_ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    uid = datasource["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    assert all(p["datasource"]["uid"] == uid for p in dashboard["panels"])


def test_every_series_the_dashboard_draws_is_exported() -> None:
    exported = {m.name for m in REGISTRY.collect()} | TRITON_SERIES
    # histograms and counters are queried through their _bucket/_sum/_count/_total series
    suffix = re.compile(r"_(bucket|sum|count|total)$")
    jobs = {job for job, _, _ in targets()}
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b((?:chat|nv)_[a-z_]+)\b", target["expr"]):
                assert name in exported or suffix.sub("", name) in exported, f"{panel['title']}: {name} is not exported"
            for job in re.findall(r'job="([^"]+)"', target["expr"]):
                assert job in jobs, f"{panel['title']}: no scrape job {job}"
