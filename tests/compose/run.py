"""`make compose-test`: docker-compose.yml brought up for real, with podman.

No Docker engine is installed on the CI machines and no image registry is reachable from
them, but rootful podman runs. This script:

  1. installs podman, podman-compose, runc and debootstrap from Debian's packages where they
     are missing (it needs root and apt for that), with tests/compose/containers.conf for the
     limits and the runtime the sandbox allows (CONTAINERS_CONF);
  2. makes the base image `localhost/chatbot-base:bookworm` with debootstrap where it is
     missing, and builds FROM it the app image (Dockerfile), Triton's (deploy/triton.Dockerfile)
     and the third-party services' (tests/compose/services.Dockerfile); the machine's extra CA
     certificates and its torch wheel go into deploy/build-extra/ for the builds;
  3. `up`s docker-compose.yml with tests/compose/compose.ci.yml merged over it (only images
     change), every service but Grafana, on a free host port for nginx and one for Prometheus;
  4. waits until every container is running and passes its compose health check, and the
     one-shot bootstrap exited 0;
  5. registers users and chats through nginx over the websocket, with sockets spread over the
     API replicas, and reads each reply back from the REST API;
  6. kills the API container that holds a socket and the worker container that writes its
     reply, mid-reply, and checks that the reply still completes (read over a new socket
     through nginx, or back from the REST API);
  7. scrapes /metrics of every app container and of Triton, and asks Prometheus whether it
     scrapes every target of deploy/prometheus.yml;
  8. `down`s everything it created: containers, volumes, the network (the images stay, as a
     build cache).

Prints each step with its time, the image sizes and the whole run's time; exits 1 when a
check fails, 0 with a SKIPPED line when podman cannot run on this machine. Container logs of
a failed run are left in tests/artifacts/compose/.
"""

from __future__ import annotations

import asyncio
import base64
import glob
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import traceback
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import yaml

from chatbot.ops.servers import free_port
from tests.client import ChatClient, collect_reply, recv, send
from tests.waiting import async_eventually, eventually

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "tests" / "compose"
ARTIFACTS = ROOT / "tests" / "artifacts" / "compose"
BUILD_EXTRA = ROOT / "deploy" / "build-extra"
PROJECT = "chatbotci"
BASE_IMAGE = "localhost/chatbot-base:bookworm"
IMAGES = {  # tag: (Dockerfile, build arguments)
    "localhost/chatbot:latest": ("Dockerfile", {"BASE_IMAGE": BASE_IMAGE, "TORCH_INDEX_URL": ""}),
    "localhost/chatbot-triton:latest": ("deploy/triton.Dockerfile", {"BASE_IMAGE": BASE_IMAGE}),
    "localhost/chatbot-ci-services:latest": ("tests/compose/services.Dockerfile", {"BASE_IMAGE": BASE_IMAGE}),
}
NOT_RUN = {"grafana"}  # no Debian package, no registry
DEBIAN_MIRROR = "http://deb.debian.org/debian"
BOUND_UP_S = 600.0  # every container healthy within this
BOUND_REPLY_S = 240.0  # one reply, faults included


class Failed(Exception):
    pass


START = time.monotonic()


def say(text: str) -> None:
    print(f"[{time.monotonic() - START:7.1f}s] {text}", flush=True)


def run(argv: list[str], *, check: bool = True, capture: bool = False, timeout: float = 900,
        env: dict[str, str] | None = None, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, text=True, capture_output=capture, timeout=timeout, env=env, stdin=stdin, cwd=ROOT,
                          check=False)
    if check and done.returncode != 0:
        detail = f": {(done.stderr or '')[-2000:]}" if capture else ""
        raise Failed(f"`{' '.join(argv[:6])}` exited {done.returncode}{detail}")
    return done


def out(argv: list[str], **kwargs: Any) -> str:
    return run(argv, capture=True, **kwargs).stdout.strip()


# -- podman -------------------------------------------------------------------------------


def podman_ready() -> str | None:
    """None when podman runs containers here, else why not (after installing it if it can)."""
    os.environ["CONTAINERS_CONF"] = str(HERE / "containers.conf")
    tools = ("podman", "podman-compose", "runc", "debootstrap")
    if not all(shutil.which(t) for t in tools):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return "podman is not installed, and installing it needs root and apt-get"
        say("installing podman, podman-compose, runc and debootstrap from Debian's packages")
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        done = run(["apt-get", "install", "-y", "-q", *tools], check=False, capture=True, env=env)
        if done.returncode != 0:
            run(["apt-get", "update", "-q"], check=False, capture=True, env=env)
            done = run(["apt-get", "install", "-y", "-q", *tools], check=False, capture=True, env=env)
        if done.returncode != 0:
            return f"installing podman failed: {done.stderr[-500:]}"
    if os.geteuid() != 0:
        return "rootful podman is needed (the sandbox has no user namespaces for rootless)"
    probe = run(["podman", "run", "--rm", "--network=none", BASE_IMAGE, "true"], check=False, capture=True) \
        if image_exists(BASE_IMAGE) else run(["podman", "info"], check=False, capture=True)
    if probe.returncode != 0:
        return f"podman cannot run here: {probe.stderr.strip()[-500:]}"
    return None


def image_exists(tag: str) -> bool:
    return run(["podman", "image", "exists", tag], check=False).returncode == 0


def base_image() -> None:
    """Debian bookworm (minbase) from debootstrap, imported: no registry is reachable."""
    if image_exists(BASE_IMAGE):
        return
    rootfs = ROOT / ".cache" / "compose-rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR], capture=True)
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    run(["podman", "import", "--change", 'CMD ["/bin/bash"]', "-", BASE_IMAGE], stdin=tar.stdout, capture=True)
    tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)
    say(f"base image {BASE_IMAGE} made with debootstrap in {time.monotonic() - started:.0f} s")


def stage_build_extra() -> None:
    """The machine's extra CA certificates (its egress proxy re-signs TLS) and the torch wheel
    on its disk (PyPI's torch is a CUDA build of gigabytes) for the builds."""
    for crt in glob.glob("/usr/local/share/ca-certificates/*.crt"):
        shutil.copy2(crt, BUILD_EXTRA / Path(crt).name)
    for wheel in glob.glob("/opt/wheels/torch-2.13.0+cpu-*.whl"):
        if not (BUILD_EXTRA / Path(wheel).name).exists():
            shutil.copy2(wheel, BUILD_EXTRA / Path(wheel).name)


def build_images() -> dict[str, float]:
    took = {}
    for tag, (dockerfile, args) in IMAGES.items():
        started = time.monotonic()
        argv = ["podman", "build", "-q", "-f", dockerfile, "-t", tag]
        for k, v in args.items():
            argv += ["--build-arg", f"{k}={v}"]
        run([*argv, "."], capture=True, timeout=1800)
        took[tag] = time.monotonic() - started
        say(f"built {tag} in {took[tag]:.0f} s")
    return took


def image_sizes() -> dict[str, str]:
    return {tag: out(["podman", "image", "inspect", "-f", "{{.Size}}", tag]) for tag in [BASE_IMAGE, *IMAGES]}


# -- the compose project --------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    return dict(yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"])


def compose_env() -> dict[str, str]:
    return dict(
        os.environ,
        POSTGRES_PASSWORD=secrets.token_hex(16),
        CHATBOT_CIPHER_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        CHATBOT_SECRET_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        CHATBOT_CHAIN_KEY=base64.b64encode(secrets.token_bytes(32)).decode(),
        GRAFANA_ADMIN_PASSWORD=secrets.token_hex(8),
        HTTP_PORT=str(free_port()),
        PROMETHEUS_PORT=str(free_port()),
    )


class Compose:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.base = ["podman-compose", "-p", PROJECT, "-f", "docker-compose.yml", "-f", "tests/compose/compose.ci.yml"]
        self.services = compose_services()
        self.url = f"http://127.0.0.1:{env['HTTP_PORT']}"

    def __call__(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return run([*self.base, *args], env=self.env, check=check, capture=True, timeout=timeout)

    def containers(self, service: str | None = None) -> list[str]:
        """Container names, by podman-compose's scheme PROJECT_SERVICE_N."""
        names = out(["podman", "ps", "-a", "--filter", f"label=io.podman.compose.project={PROJECT}",
                     "--format", "{{.Names}}"]).split()
        if service is not None:
            names = [n for n in names if re.fullmatch(rf"{PROJECT}_{re.escape(service)}_\d+", n)]
        return sorted(names)

    def state(self, name: str) -> tuple[str, int]:
        status, code = out(["podman", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name]).split()
        return status, int(code)

    def healthy(self, name: str) -> bool:
        return run(["podman", "healthcheck", "run", name], check=False, capture=True, timeout=60).returncode == 0

    def exec(self, name: str, *argv: str, timeout: float = 30) -> str:
        return out(["podman", "exec", name, *argv], timeout=timeout)

    def metrics(self, name: str, port: int) -> str:
        """A container's /metrics, fetched from inside it (the metrics ports are not published)."""
        if name.startswith(f"{PROJECT}_triton_"):
            return self.exec(name, "curl", "-sf", f"http://127.0.0.1:{port}/metrics")
        code = f"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:{port}/metrics', timeout=10).read().decode())"
        return self.exec(name, "python", "-c", code)

    def save_logs(self) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for name in self.containers():
            logs = run(["podman", "logs", "--tail", "300", name], check=False, capture=True)
            (ARTIFACTS / f"{name}.log").write_text(logs.stdout + logs.stderr)

    def down(self) -> None:
        self("down", "-v", "-t", "10", check=False, timeout=300)
        for name in self.containers():  # anything down left behind
            run(["podman", "rm", "-f", "-v", name], check=False, capture=True)
        volumes = out(["podman", "volume", "ls", "-q", "--filter", f"label=io.podman.compose.project={PROJECT}"]).split()
        volumes += [v for v in out(["podman", "volume", "ls", "-q"]).split() if v.startswith(f"{PROJECT}_")]
        for volume in sorted(set(volumes)):
            run(["podman", "volume", "rm", "-f", volume], check=False, capture=True)
        run(["podman", "network", "rm", "-f", f"{PROJECT}_default"], check=False, capture=True)


def wait_up(compose: Compose) -> None:
    """Every container of the services started is running and passes its health check; the
    one-shot bootstrap exited 0. podman-compose does not wait on depends_on conditions: the
    app containers restart (restart: unless-stopped) until the bootstrap has run."""
    def still_pending() -> list[str]:
        pending: list[str] = []
        for service, spec in compose.services.items():
            if service in NOT_RUN:
                continue
            names = compose.containers(service)
            replicas = int(spec.get("deploy", {}).get("replicas", 1))
            if len(names) < replicas:
                pending.append(f"{service}: {len(names)} of {replicas} containers")
                continue
            for name in names:
                status, code = compose.state(name)
                if service == "bootstrap":
                    if status == "exited" and code != 0:
                        raise Failed(f"bootstrap exited {code}")
                    if status != "exited":
                        pending.append(f"{name}: {status}")
                elif status != "running":
                    pending.append(f"{name}: {status} ({code})")
                elif "healthcheck" in spec and not compose.healthy(name):
                    pending.append(f"{name}: not healthy yet")
        return pending

    pending = eventually(still_pending, until=lambda pending: not pending, timeout=BOUND_UP_S, interval=3,
                         what="every service up", fail=False)
    if pending:
        raise Failed(f"not up within {BOUND_UP_S:.0f} s: {'; '.join(pending)}")


# -- chatting through nginx -------------------------------------------------------------------


def gauge(compose: Compose, names: list[str], metric: str) -> dict[str, float]:
    """An unlabelled gauge of each named app container, from its /metrics."""
    found = {}
    for name in names:
        m = re.search(rf"^{metric} (\S+)$", compose.metrics(name, 9100), re.M)
        found[name] = float(m.group(1)) if m else 0.0
    return found


def api_sockets(compose: Compose) -> dict[str, float]:
    """Open websockets per API container."""
    apis = [n for n in compose.containers() if re.fullmatch(rf"{PROJECT}_api-\d+_\d+", n)]
    return gauge(compose, apis, "chat_websockets_open")


def writing(compose: Compose) -> dict[str, float]:
    """Replies each worker container is writing now."""
    return gauge(compose, compose.containers("worker"), "chat_worker_replies_writing")


async def persona(client: ChatClient, slug: str, system_prompt: str, max_tokens: int) -> str:
    r = await client.http.post("/api/personas", headers=client.headers, json={
        "slug": f"{slug}-{uuid.uuid4().hex[:6]}", "name": slug.title(),
        "system_prompt": f"You are a helpful assistant. {system_prompt}", "max_tokens": max_tokens})
    if r.status_code != 201:
        raise Failed(f"creating a persona: {r.status_code} {r.text}")
    return str(r.json()["id"])


async def chat(compose: Compose, users: int = 6) -> None:
    clients = [ChatClient(compose.url) for _ in range(users)]
    try:
        for c in clients:
            await c.register_and_log_in()
        conversations = [await c.start_conversation(None) for c in clients]  # the default persona
        sockets = [await c.ws(open_timeout=10) for c in clients]
        spread = api_sockets(compose)
        say(f"{users} websockets through nginx, per API container: {spread}")
        if sum(1 for v in spread.values() if v > 0) < 2:
            raise Failed(f"nginx put every websocket on one API container: {spread}")

        async def one(i: int) -> str:
            await send(sockets[i], conversations[i], "What is the capital of France?")
            _, tokens, reply = await collect_reply(sockets[i], timeout=BOUND_REPLY_S)
            if reply["finish_reason"] not in ("stop", "length") or not reply["text"].strip():
                raise Failed(f"reply {reply}")
            if "".join(t["text"] for t in tokens) != reply["text"]:
                raise Failed("the streamed tokens do not add up to the reply")
            stored = await clients[i].messages_when(
                conversations[i], lambda ms: len(ms) == 2 and ms[1]["status"] != "pending", timeout=30)
            if stored[-1]["text"] != reply["text"]:
                raise Failed(f"read back {stored[-1]!r}, streamed {reply['text']!r}")
            return str(reply["text"])

        replies = await asyncio.gather(*(one(i) for i in range(users)))
        say(f"{users} replies streamed and read back; the first: {replies[0]!r}")
        if not any("paris" in r.lower() for r in replies):
            raise Failed(f"no reply names Paris: {replies}")
        for ws in sockets:
            await ws.close()
        await faults(compose, clients[0], await persona(clients[0], "long", "Answer at length.", 200))
    finally:
        for c in clients:
            await c.close()


async def faults(compose: Compose, client: ChatClient, persona_id: str) -> None:
    """Kill the API container holding the socket and the worker writing the reply, mid-reply."""
    conversation = await client.start_conversation(persona_id)
    ws = await client.ws(open_timeout=10)
    # the sockets closed before may take a moment to be counted
    holders = await async_eventually(lambda: [n for n, v in api_sockets(compose).items() if v > 0],
                                     until=lambda holders: len(holders) == 1, timeout=10, interval=0.5,
                                     what="one API container holding a socket", fail=False)
    if len(holders) != 1:
        raise Failed(f"one socket open, yet API containers report {holders}")
    cmid = str(uuid.uuid4())
    await send(ws, conversation, "Tell me a long story about a ship at sea.", cmid)
    reply_id = None
    while True:  # until the first token
        frame = await recv(ws, BOUND_REPLY_S)
        if frame["type"] == "accepted":
            reply_id = frame["reply_id"]
        elif frame["type"] == "token":
            break
        elif frame["type"] in ("reply", "error"):
            raise Failed(f"the reply ended before it could be interrupted: {frame}")
    busy = writing(compose)
    writers = [n for n, v in busy.items() if v > 0]
    if len(writers) != 1:
        raise Failed(f"one reply being written, yet the workers report {busy}")
    killed = time.monotonic()
    run(["podman", "kill", holders[0]], capture=True)
    run(["podman", "kill", writers[0]], capture=True)
    say(f"mid-reply: killed {holders[0]} (the socket's API) and {writers[0]} (the reply's worker)")
    with_deadline = time.monotonic() + BOUND_REPLY_S
    text = None
    while time.monotonic() < with_deadline and text is None:
        try:  # a new socket through nginx: resume names the reply and streams it to the end
            async with client.ws(open_timeout=10) as again:
                await again.send(json.dumps({"type": "resume", "conversation_id": conversation}))
                while time.monotonic() < with_deadline:
                    frame = await recv(again, 30)
                    if frame["type"] == "reply" and frame.get("reply_id") == reply_id:
                        text = frame["text"]
                        break
                    if frame["type"] == "resumed" and frame.get("reply_id") is None:
                        break  # not pending any more: it is in the read model
        except Exception as e:  # noqa: BLE001 - nginx may still send the socket to the dead API
            say(f"resume: {type(e).__name__}: {e}")
            await asyncio.sleep(1)
        if text is None:
            messages = (await client.get(f"/api/conversations/{conversation}/messages")).json()
            done = [m for m in messages if m["id"] == reply_id and m["status"] == "done"]
            if done:
                text = done[0]["text"]
    if text is None:
        raise Failed(f"reply {reply_id} did not complete within {BOUND_REPLY_S:.0f} s of the kills")
    say(f"the reply completed {time.monotonic() - killed:.0f} s after the kills: {text[:80]!r}")
    for name in (holders[0], writers[0]):  # restart: unless-stopped brings them back, or we do
        if compose.state(name)[0] != "running":
            run(["podman", "start", name], capture=True)


# -- metrics -----------------------------------------------------------------------------------


def scrape(compose: Compose) -> None:
    """/metrics of every app container and of Triton; then Prometheus's own view of them."""
    expected = {"api": "chat_websocket_frames_total", "worker": "chat_replies_total",
                "projector": "chat_projector_lag_events", "relay": "chat_relay_lag_events"}
    for name in compose.containers():
        service = re.sub(rf"^{PROJECT}_|_\d+$", "", name)
        kind = re.sub(r"-\d+$", "", service)
        if kind in expected:
            text = compose.metrics(name, 9100)
            if expected[kind] not in text:
                raise Failed(f"{name}: /metrics has no {expected[kind]}")
        elif kind == "triton":
            text = compose.metrics(name, 8002)
            if "nv_inference_request_success" not in text:
                raise Failed(f"{name}: Triton's /metrics has no nv_inference_request_success")
    say("every app container and Triton serve /metrics")
    url = f"http://127.0.0.1:{compose.env['PROMETHEUS_PORT']}/api/v1/targets"
    wanted = {"api": 3, "relay": 2, "projector": 2, "worker": 4, "triton": 1, "prometheus": 1}

    def targets_up() -> tuple[list[str], dict[str, int]]:
        """The targets down, and how many of each job's are up."""
        with urllib.request.urlopen(url, timeout=10) as r:
            targets = json.loads(r.read())["data"]["activeTargets"]
        jobs: dict[str, int] = {}
        down: list[str] = []
        for t in targets:
            jobs[t["labels"]["job"]] = jobs.get(t["labels"]["job"], 0) + (t["health"] == "up")
            if t["health"] != "up":
                down.append(f"{t['labels']['job']} {t['scrapeUrl']}: {t['health']} {t.get('lastError', '')}")
        return down, jobs

    def every_target(found: tuple[list[str], dict[str, int]]) -> bool:
        down, jobs = found
        return not down and all(jobs.get(j, 0) >= n for j, n in wanted.items())

    # a scrape every 15 s; DNS refreshed every 30 s
    down, jobs = eventually(targets_up, until=every_target, timeout=90, interval=5,
                            what="Prometheus scraping every target", fail=False)
    if not every_target((down, jobs)):
        raise Failed(f"Prometheus does not scrape every target: {down or jobs}")
    say(f"Prometheus scrapes every target: {jobs}")


# -- the run -----------------------------------------------------------------------------------


def main() -> int:
    why_not = podman_ready()
    if why_not is not None:
        print(f"SKIPPED: make compose-test: {why_not}", flush=True)
        return 0
    if not (ROOT / "triton_models" / "chat" / "1" / "smollm2" / "model.safetensors").exists():
        print("the default model is not converted: run `make install` first", file=sys.stderr)
        return 1
    base_image()
    stage_build_extra()
    build_took = build_images()
    compose = Compose(compose_env())
    compose.down()  # what a killed earlier run left
    ok = False
    try:
        started = time.monotonic()
        compose("up", "-d", *[s for s in compose.services if s not in NOT_RUN], timeout=600)
        wait_up(compose)
        say(f"up and healthy in {time.monotonic() - started:.0f} s: {len(compose.containers())} containers")
        asyncio.run(chat(compose))
        wait_up(compose)  # the killed containers are back
        scrape(compose)
        ok = True
    except Failed as e:
        print(f"FAILED: {e}", file=sys.stderr, flush=True)
    except Exception:  # noqa: BLE001 - reported, the logs kept, everything removed
        traceback.print_exc()
    finally:
        if not ok:
            compose.save_logs()
            print(f"container logs in {ARTIFACTS.relative_to(ROOT)}/", file=sys.stderr)
        compose.down()
        left = compose.containers()
        if left:
            print(f"left behind: {left}", file=sys.stderr)
            ok = False
    sizes = image_sizes()
    say("image sizes: " + ", ".join(f"{tag} {int(size) / 1e6:.0f} MB" for tag, size in sizes.items()))
    say("build times: " + ", ".join(f"{tag} {s:.0f} s" for tag, s in build_took.items()))
    say(f"compose test {'passed' if ok else 'FAILED'} in {time.monotonic() - START:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
