"""docker-compose.yml, the Dockerfiles and deploy/ against the code: every `chatbot`
subcommand and flag they run exists, every CHATBOT_* variable they set is one the settings
read, every host:port they name is a service that listens there, and the partitions are
each read by exactly one projector. (No Docker engine here: this is what can be checked
without one.)"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from chatbot.ops.cli import main as chatbot_main
from chatbot.runtime.config import REPO_ROOT, parse_partitions

COMPOSE = REPO_ROOT / "docker-compose.yml"
DOCKERFILES = [REPO_ROOT / "Dockerfile", *sorted((REPO_ROOT / "deploy").glob("*.Dockerfile"))]
NATS_CONF = REPO_ROOT / "deploy" / "nats.conf"
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"
VARIABLE = re.compile(r"\bCHATBOT_[A-Z0-9_]+\b")


def services() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def known_variables() -> set[str]:
    """The CHATBOT_* variables the code reads: `_env("NAME")` and literal names in
    chatbot/runtime/config.py and chatbot/ops/cli.py."""
    names: set[str] = set()
    for path in (REPO_ROOT / "chatbot" / "runtime" / "config.py", REPO_ROOT / "chatbot" / "ops" / "cli.py"):
        text = path.read_text()
        names |= set(VARIABLE.findall(text))
        names |= {f"CHATBOT_{n}" for n in re.findall(r'_env\(\s*"([A-Z0-9_]+)"', text)}
    return names


def chatbot_help(argv: list[str]) -> str:
    """`chatbot ARGV --help`: its help text, or a failure if argparse refuses ARGV."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit) as done:
        chatbot_main([*argv, "--help"])
    assert done.value.code == 0, f"`chatbot {' '.join(argv)}` is not a command: {out.getvalue()}"
    return out.getvalue()


def check_chatbot_command(command: list[str], where: str) -> None:
    assert command[0] == "chatbot", where
    words = [w for w in command[1:] if not w.startswith("-")]
    assert words, f"{where}: `chatbot` without a subcommand"
    text = chatbot_help(words[:1])
    for flag in (w.split("=")[0] for w in command[1:] if w.startswith("--")):
        assert flag in text, f"{where}: `chatbot {words[0]}` has no option {flag}"


def listens(service: dict[str, Any]) -> set[int]:
    return {int(p) for p in service.get("expose", [])}


def test_the_compose_file_parses_and_has_every_part_of_the_topology() -> None:
    found = services()
    commands = {name: s.get("command") for name, s in found.items()}
    assert {"nats-1", "nats-2", "nats-3", "postgres", "triton", "lb", "bootstrap", "relay"} <= set(found)
    assert sum(c == ["chatbot", "api"] for c in commands.values()) >= 2
    assert sum(c == ["chatbot", "projector"] for c in commands.values()) >= 2
    assert any(c == ["chatbot", "worker"] for c in commands.values())
    gpu = found["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] for d in gpu)
    repository = next(a.split("=", 1)[1] for a in found["triton"]["command"] if a.startswith("--model-repository="))
    assert any(v.split(":")[:2] == ["./triton_models", repository] for v in found["triton"]["volumes"])
    # workers fit prompts with the tokenizers of the models Triton serves (chatbot/inference/prompt.py)
    image_root = "/app"  # WORKDIR of the Dockerfile, the REPO_ROOT of the installed code
    assert f"./triton_models:{image_root}/triton_models:ro" in found["worker"]["volumes"]
    # and the API processes: a message too long for the model's window is refused at send
    # (chatbot/training/versions.py), and a persona names only models the repository holds
    for name, service in found.items():
        if service.get("command") == ["chatbot", "api"]:
            assert f"./triton_models:{image_root}/triton_models:ro" in service["volumes"], name
    assert re.search(rf"^WORKDIR\s+{image_root}$", (REPO_ROOT / "Dockerfile").read_text(), re.M)


def test_every_chatbot_command_in_compose_and_the_dockerfiles_exists() -> None:
    checked = 0
    for name, service in services().items():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["chatbot"]:
            check_chatbot_command(command, f"service {name}")
            checked += 1
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if match := re.match(r"\s*(?:CMD|ENTRYPOINT)\s+(\[.*\])", line):
                command = yaml.safe_load(match[1])
                if command[:1] == ["chatbot"]:
                    check_chatbot_command(command, dockerfile.name)
                    checked += 1
    assert checked >= 6


def test_every_chatbot_variable_named_anywhere_in_the_deployment_is_read_by_the_code() -> None:
    known = known_variables()
    assert {"CHATBOT_PARTITIONS", "CHATBOT_CONSUME_PARTITIONS", "CHATBOT_STREAM_REPLICAS"} <= known
    for path in [COMPOSE, *DOCKERFILES, NATS_CONF, NGINX_CONF]:
        unknown = set(VARIABLE.findall(path.read_text())) - known
        assert not unknown, f"{path.name} names variables no code reads: {sorted(unknown)}"


def test_every_secret_the_settings_would_generate_per_machine_is_given_to_every_process() -> None:
    # a key generated into each container's own data directory would differ between them
    secrets = set(re.findall(r'os\.environ\.get\("(CHATBOT_\w+)"\) or _secret_from_file',
                             (REPO_ROOT / "chatbot" / "runtime" / "config.py").read_text()))
    assert {"CHATBOT_CIPHER_KEY", "CHATBOT_SECRET_KEY"} <= secrets
    for name, service in services().items():
        env = service.get("environment") or {}
        if any(k.startswith("CHATBOT_") for k in env):
            assert secrets <= set(env), f"{name} lacks {sorted(secrets - set(env))}"


def test_every_host_and_port_an_app_process_is_given_is_a_service_listening_there() -> None:
    found = services()
    for name, service in found.items():
        env = service.get("environment") or {}
        if not any(k.startswith("CHATBOT_") for k in env):
            continue
        targets = [tuple(u.removeprefix("nats://").split(":")) for u in env["CHATBOT_NATS_URL"].split(",")]
        targets.append(tuple(env["CHATBOT_TRITON_URL"].split(":")))
        targets.append((env["CHATBOT_PG_HOST"], env["CHATBOT_PG_PORT"]))
        for host, port in targets:
            assert host in found, f"{name}: no service {host}"
            assert int(port) in listens(found[host]), f"{name}: {host} does not listen on {port}"
        if service.get("command") == ["chatbot", "api"]:
            assert int(env["CHATBOT_API_PORT"]) in listens(service), f"{name} listens elsewhere"
            assert env["CHATBOT_API_HOST"] == "0.0.0.0", f"{name} is unreachable from the load balancer"


def test_the_servers_listen_where_compose_says() -> None:
    found = services()
    triton_ports = {int(a.split("=")[1]) for a in found["triton"]["command"] if re.match(r"--\w+-port=", a)}
    assert triton_ports == listens(found["triton"])
    nats_ports = {int(p) for p in re.findall(r"^\s*(?:listen|http):\s*[\d.]+:(\d+)", NATS_CONF.read_text(), re.M)}
    for node in ("nats-1", "nats-2", "nats-3"):
        assert nats_ports <= listens(found[node])
        assert found[node]["environment"]["NATS_SERVER_NAME"] == node
    routes = set(re.findall(r"nats-route://([\w-]+):(\d+)", NATS_CONF.read_text()))
    assert {host for host, _ in routes} == {"nats-1", "nats-2", "nats-3"}
    assert all(int(port) in listens(found[host]) for host, port in routes)
    assert "sync_interval: always" in NATS_CONF.read_text()


def test_the_load_balancer_passes_websockets_to_every_api_process() -> None:
    found = services()
    text = NGINX_CONF.read_text()
    upstream = set(re.findall(r"^\s*server\s+([\w-]+):(\d+)", text, re.M))
    apis = {name for name, s in found.items() if s.get("command") == ["chatbot", "api"]}
    assert {host for host, _ in upstream} == apis
    for host, port in upstream:
        assert int(port) == int(found[host]["environment"]["CHATBOT_API_PORT"])
    websocket = text[text.index("location = /api/ws"):]
    websocket = websocket[:websocket.index("}")]
    for line in ("proxy_http_version 1.1", "proxy_set_header Upgrade $http_upgrade",
                 "proxy_set_header Connection $connection_upgrade"):
        assert line in websocket
    assert "proxy_set_header Host $host" in text  # the API compares a websocket's Origin with it
    assert found["lb"]["volumes"] == ["./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"]


def test_each_partition_is_read_by_exactly_one_projector_and_one_worker_group() -> None:
    found = services()
    for role in ("projector", "worker"):
        members = [s["environment"] for s in found.values() if s.get("command") == ["chatbot", role]]
        assert members
        partitions = int(members[0]["CHATBOT_PARTITIONS"])
        assert all(int(env["CHATBOT_PARTITIONS"]) == partitions for env in members)
        groups = {env.get("CHATBOT_CONSUME_PARTITIONS", "") for env in members}
        if groups == {""}:
            continue  # one consumer over all partitions
        read = [p for g in groups for p in parse_partitions(g, partitions)]
        assert sorted(read) == list(range(partitions)), f"{role}s read partitions {sorted(read)}"
    env = found["relay"]["environment"]
    assert int(env["CHATBOT_STREAM_REPLICAS"]) == 3  # one copy per NATS node


def test_the_app_image_runs_the_api_on_the_port_it_exposes() -> None:
    text = (REPO_ROOT / "Dockerfile").read_text()
    port = re.search(r"CHATBOT_API_PORT=(\d+)", text)
    assert port and re.search(rf"^EXPOSE\s+{port[1]}\b", text, re.M)
    assert "torch==2.13.0" in text  # pinned, as the Makefile installs it


def test_keys_made_as_the_compose_file_says_are_accepted_and_others_refused_clearly(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The compose file asks for `openssl rand -base64 32` keys; a URL-safe one (a first
    compose run had one) or a short one is refused by name before anything starts."""
    import base64
    import os

    from chatbot.runtime.config import load_settings

    good = {name: base64.b64encode(os.urandom(32)).decode() for name in ("CIPHER", "SECRET", "CHAIN")}
    for name, key in good.items():
        monkeypatch.setenv(f"CHATBOT_{name}_KEY", key)
    assert load_settings(tmp_path).secret_key == base64.b64decode(good["SECRET"])
    urlsafe = base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode().rstrip("=")
    for name, bad, words in [("SECRET", urlsafe, "standard base64"), ("CIPHER", base64.b64encode(b"k" * 16).decode(), "32 bytes"),
                             ("CHAIN", "not a key!", "standard base64")]:
        monkeypatch.setenv(f"CHATBOT_{name}_KEY", bad)
        with pytest.raises(ValueError, match=f"CHATBOT_{name}_KEY must .*{words}"):
            load_settings(tmp_path)
        monkeypatch.setenv(f"CHATBOT_{name}_KEY", good[name])


def test_the_ci_override_changes_images_and_entrypoints_only_and_never_extends_a_list() -> None:
    """tests/compose/compose.ci.yml (make compose-test) runs the production file with local
    images: it may set an image, an entrypoint or a working directory, a command only where
    the production file has none (podman-compose extends a list present in both files rather
    than replacing it), and lower ulimits; every service it names exists."""
    override = yaml.safe_load((REPO_ROOT / "tests" / "compose" / "compose.ci.yml").read_text())["services"]
    production = services()
    allowed = {"image", "entrypoint", "command", "working_dir", "ulimits"}
    for name, changes in override.items():
        assert name in production, f"compose.ci.yml names {name}, which docker-compose.yml lacks"
        assert set(changes) <= allowed, f"{name}: compose.ci.yml changes {sorted(set(changes) - allowed)}"
        for key, value in changes.items():
            if isinstance(value, list):
                assert key not in production[name], f"{name}.{key}: a list in both files would be extended"
    # every image the production file pulls from a registry is replaced; the two it builds stay
    pulled = {n for n, s in production.items() if "build" not in s and n != "grafana"}
    assert pulled == {n for n, c in override.items() if "image" in c}
