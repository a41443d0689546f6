"""Start and supervise the whole stack on embedded servers: the code behind `chatbot up`
and the integration-test fixtures.

The servers (PostgreSQL, NATS, Triton) and their ports are in servers.py. The
application processes (relay, projector, workers, api) run as children in their own
sessions, so a Ctrl-C reaches only the supervisor, which stops them in order: API first,
databases last. A child that dies is restarted with a backoff.

`nats_nodes=3` runs NATS as a three-node cluster instead (routes between the nodes,
JetStream on each, the event stream kept in three replicas, every write fsynced): the
production topology, on one machine. `projectors=K` and `worker_groups=G` deal the event
partitions (`CHATBOT_PARTITIONS`) among K projectors and G groups of workers, each with its
own durable consumer filtered on its partitions.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable

from chatbot.bus.messaging import assign_partitions
from chatbot.ops.servers import (
    VENV_BIN,
    EmbeddedPostgres,
    Ports,
    nats_cluster_config,
    nats_cluster_nodes,
    nats_config,
    triton_argv,
    triton_env,
)
from chatbot.runtime.config import REPO_ROOT, Settings, format_partitions, load_settings


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"{what} exited while starting")
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def raise_fd_limit() -> int:
    """Lift this process's open-file limit to its hard limit (children inherit it): an API
    process holds a file descriptor per websocket, and the soft limit is often 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(200 <= r.status < 300)
    except OSError:
        return False


# -- supervised children ----------------------------------------------------------------------


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    ready: Callable[[], bool] | None = None
    ready_timeout: float = 60.0
    stop_timeout: float = 10.0
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        out: IO[bytes] | None = None
        if self.log is not None:
            self._log_file = out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.argv, env=self.env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT if out else None,
            start_new_session=True,
        )
        self.started_at = time.monotonic()

    def wait_ready(self) -> None:
        if self.ready is not None:
            wait_until(self.ready, self.ready_timeout, self.name, alive=self.alive)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, group: bool = False) -> None:
        """Signal the process; with `group`, every process it started too (its own session:
        Triton's python-backend stubs, which outlive a killed server otherwise)."""
        if self.alive():
            assert self.proc is not None
            if group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log_file:
            self._log_file.close()
            self._log_file = None


class Stack:
    """Every process of the system on this machine. `start()` brings it up in dependency
    order and waits until each part is ready; `supervise()` restarts what dies."""

    def __init__(
        self,
        settings: Settings,
        ports: Ports | None = None,
        *,
        workers: int = 1,
        apis: int = 1,
        log_dir: Path | None = None,
        extra_env: dict[str, str] | None = None,
        model_repository: Path | None = None,  # None: settings.model_repository
        nats_nodes: int = 1,
        projectors: int = 1,
        worker_groups: int = 1,
        tritons: int = 1,
    ) -> None:
        if nats_nodes not in (1, 3):
            raise ValueError(f"NATS runs as 1 server or a cluster of 3, not {nats_nodes}")
        if worker_groups > workers:
            raise ValueError(f"{worker_groups} worker groups need at least as many workers, not {workers}")
        if tritons < 1:
            raise ValueError(f"the stack needs at least one Triton instance, not {tritons}")
        self.ports = ports or Ports()
        if not 0 <= self.ports.metrics <= 65535 - (1 + projectors + workers + apis):
            raise ValueError(f"the metrics ports start at {self.ports.metrics}: a port of 1 to 65535 (0: none), "
                             "one per app process")
        self.tritons = tritons
        self.model_repository = model_repository or settings.model_repository
        self.nats_nodes = nats_cluster_nodes(self.ports, nats_nodes) if nats_nodes > 1 else []
        nats_url = (",".join(n.url for n in self.nats_nodes) if self.nats_nodes
                    else f"nats://127.0.0.1:{self.ports.nats}")
        self.settings = dataclasses.replace(
            settings,
            nats_url=nats_url,
            stream_replicas=3 if self.nats_nodes else settings.stream_replicas,
            # several: workers route each conversation to one (workers/routing.py)
            triton_url=",".join(f"127.0.0.1:{self.triton_ports(i).triton_grpc}" for i in range(tritons)),
            api_port=self.ports.api,
        )
        # the tools (`chatbot train`, `chatbot models`) find the repository Triton serves
        self.settings = dataclasses.replace(self.settings, model_repository=self.model_repository)
        # which partitions each projector and each group of workers reads: () is all
        self.projector_partitions = assign_partitions(settings.partitions, projectors) if projectors > 1 else [()]
        self.worker_partitions = assign_partitions(settings.partitions, worker_groups) if worker_groups > 1 else [()]
        self.workers, self.apis = workers, apis
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.postgres: EmbeddedPostgres | None = None
        self.children: dict[str, Child] = {}
        self.metrics_ports: dict[str, int] = {}  # app process -> its /metrics port (chatbot/runtime/metrics.py)
        self._stopping = threading.Event()

    @property
    def api_urls(self) -> list[str]:
        return [f"http://127.0.0.1:{self.api_port(i)}" for i in range(self.apis)]

    def triton_ports(self, index: int) -> Ports:
        """Instance 0 on the stack's Triton ports, instance i on those + 10 * i."""
        return dataclasses.replace(
            self.ports, triton_http=self.ports.triton_http + 10 * index,
            triton_grpc=self.ports.triton_grpc + 10 * index, triton_metrics=self.ports.triton_metrics + 10 * index,
        )

    def triton_name(self, index: int) -> str:
        return "triton" if index == 0 else f"triton-{index}"

    def api_port(self, index: int) -> int:
        return self.ports.api if index == 0 else self.ports.api + 100 + index

    def _log(self, name: str) -> Path | None:
        if self.log_dir is None:
            return None
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.log_dir / f"{name}.log"

    def _app_env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env.update(self.extra_env)
        env.update(overrides)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def metrics_port(self, name: str) -> int:
        """The app process's own `/metrics` port: the stack's base plus one per process
        (kept across restarts); 0 when the stack serves no metrics."""
        if not self.ports.metrics:
            return 0
        return self.metrics_ports.setdefault(name, self.ports.metrics + len(self.metrics_ports))

    def _app_child(self, name: str, command: str, ready: Callable[[], bool] | None = None, **env: str) -> Child:
        env.setdefault("CHATBOT_METRICS_PORT", str(self.metrics_port(name)))
        return Child(name, [sys.executable, "-m", "chatbot.ops.cli", command], self._app_env(**env), ready, log=self._log(name))

    def start_infrastructure(self) -> None:
        data = self.settings.data_dir
        self.postgres = EmbeddedPostgres(data / "postgres")
        self.settings = dataclasses.replace(self.settings, pg_host=self.postgres.socket_dir)
        if self.nats_nodes:
            # a member is healthy once the cluster has a JetStream leader and its streams are current
            servers = [
                Child(
                    node.name, [str(VENV_BIN / "nats-server"), "-c", str(nats_cluster_config(data / "nats", node, self.nats_nodes))],
                    dict(os.environ), ready=lambda node=node: http_ok(f"http://127.0.0.1:{node.monitor}/healthz"),
                    ready_timeout=60, log=self._log(node.name),
                )
                for node in self.nats_nodes
            ]
        else:
            conf = nats_config(data / "nats", self.ports)
            servers = [Child(
                "nats", [str(VENV_BIN / "nats-server"), "-c", str(conf)], dict(os.environ),
                ready=lambda: http_ok(f"http://127.0.0.1:{self.ports.nats_monitor}/healthz?js-enabled-only=true"),
                ready_timeout=30, log=self._log("nats"),
            )]
        tritons = [
            Child(
                self.triton_name(i), triton_argv(self.triton_ports(i), self.model_repository), triton_env(),
                ready=lambda i=i: http_ok(f"http://127.0.0.1:{self.triton_ports(i).triton_http}/v2/health/ready"),
                # it unloads models for up to 30 s
                ready_timeout=180, stop_timeout=35, log=self._log(self.triton_name(i)),
            )
            for i in range(self.tritons)
        ]
        for child in (*servers, *tritons):
            self.children[child.name] = child
            child.start()
        for child in (*servers, *tritons):
            child.wait_ready()

    def bootstrap(self) -> None:
        """Create tables, the stream and the built-in personas before any app process runs,
        so no two processes race to create them."""
        from chatbot.ops.bootstrap import bootstrap

        bootstrap(self.settings)

    def start_apps(self) -> None:
        specs = [self._app_child("relay", "relay")]
        for i, chosen in enumerate(self.projector_partitions):
            name = "projector" if len(self.projector_partitions) == 1 else f"projector-{i}"
            specs.append(self._app_child(name, "projector", CHATBOT_CONSUME_PARTITIONS=format_partitions(chosen)))
        for i in range(self.workers):
            chosen = self.worker_partitions[i % len(self.worker_partitions)]
            specs.append(self._app_child(f"worker-{i}", "worker", CHATBOT_CONSUME_PARTITIONS=format_partitions(chosen)))
        for i in range(self.apis):
            port = self.api_port(i)
            specs.append(self._app_child(
                f"api-{i}", "api", ready=lambda port=port: http_ok(f"http://127.0.0.1:{port}/health"),
                CHATBOT_API_PORT=str(port),
            ))
        for child in specs:
            self.children[child.name] = child
            child.start()
        for child in specs:
            child.wait_ready()

    def start(self) -> None:
        raise_fd_limit()  # before any child starts: they inherit it
        try:
            self.start_infrastructure()
            self.bootstrap()
            self.start_apps()
        except BaseException:
            self.stop()
            raise

    def restart(self, name: str) -> None:
        child = self.children[name]
        child.stop()
        child.start()
        child.wait_ready()

    def supervise(self, poll: float = 0.5, on_restart: Callable[[str, int | None], None] | None = None) -> None:
        """Restart children that die, with a backoff, until `stop()` is called."""
        while not self._stopping.wait(poll):
            if self.postgres is not None and self.postgres.restart_if_dead() and on_restart:
                on_restart("postgres", None)
            for child in list(self.children.values()):
                if self._stopping.is_set() or child.alive():
                    continue
                code = child.proc.returncode if child.proc else None
                if time.monotonic() - child.started_at > 60:
                    child.restarts = 0  # it ran for a while: start the backoff over
                delay = min(30.0, 0.5 * 2 ** child.restarts)
                if time.monotonic() - child.started_at < delay:
                    continue
                child.restarts += 1
                if on_restart:
                    on_restart(child.name, code)
                child.start()

    def request_stop(self) -> None:
        """Make `supervise()` return (safe from a signal handler); `stop()` then cleans up."""
        self._stopping.set()

    def stop(self) -> None:
        self._stopping.set()
        # clients of the servers first, in the order they lean on each other; servers last
        order = ["api", "worker", "projector", "relay", "triton", "nats"]

        def rank(name: str) -> int:
            kind = name.split("-")[0]
            return order.index(kind) if kind in order else 1

        for name in sorted(self.children, key=rank):
            self.children[name].stop()
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None


def tool_settings() -> tuple[Settings, object | None]:
    """Settings for a command-line tool: the configured PostgreSQL, or the embedded one of
    the data directory (attached to if `chatbot up` runs it, else started for the command)."""
    settings = load_settings()
    if os.environ.get("CHATBOT_PG_HOST"):
        return settings, None
    postgres = EmbeddedPostgres(settings.data_dir / "postgres")
    return dataclasses.replace(settings, pg_host=postgres.socket_dir), postgres
