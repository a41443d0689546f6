"""Settings: one immutable object built from the environment, passed to every process.

Every process of the system (api, relay, worker, projector) is configured by `CHATBOT_*`
environment variables, so the same code runs under `chatbot up`, the test fixtures and
docker-compose. Secrets (the event cipher key and the token-signing key) come from the
environment or, on a developer machine, are generated once into the data directory with
owner-only permissions; they are never committed.
"""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from chatbot.runtime.postgres import IDLE_IN_TRANSACTION_S, LOCK_TIMEOUT_S

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CHATBOT_{name}", default)


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    # psycopg conninfo parts for the event store and the read models; `pg_host` may be a
    # unix socket directory (embedded PostgreSQL listens on a socket only).
    pg_host: str
    pg_port: int
    pg_user: str
    pg_password: str
    pg_dbname: str
    nats_url: str
    triton_url: str  # gRPC host:port; several comma-separated: workers route each conversation to one (workers/routing.py)
    api_host: str
    api_port: int
    cipher_key: str  # base64 AES key for events at rest and on the broker
    secret_key: bytes  # HMAC key that signs session tokens
    pg_pool_size: int = 3
    pg_pool_overflow: int = 7
    partitions: int = 1  # event subjects carry crc32(aggregate id) % partitions
    # The partitions this process's durable consumer reads (a worker or projector); empty: all.
    consume_partitions: tuple[int, ...] = ()
    stream_replicas: int = 1  # copies of the event stream (3 on a NATS cluster)
    stream_name: str = "CHAT"
    ack_wait_s: float = 30.0
    retention_sweep_s: float = 30.0  # how often temporary conversations are checked for expiry
    empty_chat_ttl_s: int = 86_400  # a chat left without a message this long is discarded (0: never)
    model_name: str = "chat"
    token_ttl_s: int = 7 * 24 * 3600
    max_message_chars: int = 8000
    max_frame_bytes: int = 64 * 1024
    cookie_secure: bool = False
    allowed_origins: tuple[str, ...] = ()  # other page origins that may open the websocket
    # Log-in and registration throttling (api/throttle.py), per 15 minutes; 0: no limit.
    auth_attempts_per_address: int = 60
    login_failures_per_account: int = 10
    # Addresses of reverse proxies whose X-Forwarded-For names the client (deploy/nginx.conf)
    trusted_proxies: tuple[str, ...] = ()
    messages_per_minute: int = 30
    tokens_per_day: int = 200_000
    # The most tokens any reply may have, whatever its persona or request asks (0: no cap
    # beyond theirs). An operator's bound on generation cost; the tests keep replies short.
    max_reply_tokens: int = 0
    model_titles: bool = True  # the model writes each chat's title after its first reply (workers/titles.py)
    chain_key: str = ""  # base64 HMAC key of the events' hash chain (kept out of the database)
    model_repository: Path = REPO_ROOT / "triton_models"  # what Triton serves; `chatbot train` adds versions
    # This process's Prometheus `/metrics` (chatbot/runtime/metrics.py): a port of its own, 0: none.
    # `chatbot up` gives each child its own; in containers every one uses the same.
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    # Log lines as text (`HH:MM:SS process LEVEL message`) or one JSON object each, with
    # the trace and span ids of the span they were written in (chatbot/runtime/process.py).
    log_format: str = "text"

    @property
    def triton_urls(self) -> tuple[str, ...]:
        """`CHATBOT_TRITON_URL` may list several Triton instances, comma-separated."""
        return tuple(u.strip() for u in self.triton_url.split(",") if u.strip())

    @property
    def nats_servers(self) -> list[str]:
        """`CHATBOT_NATS_URL` may list several servers of a cluster, comma-separated."""
        return [u.strip() for u in self.nats_url.split(",") if u.strip()]

    @property
    def pg_conninfo(self) -> str:
        return (
            f"host={self.pg_host} port={self.pg_port} user={self.pg_user} "
            f"password={self.pg_password} dbname={self.pg_dbname}"
        )

    def eventsourcing_env(self, create_tables: bool = False) -> dict[str, str]:
        """The environment of the `eventsourcing` application's store: where PostgreSQL is,
        the key of the hash chain, AES-GCM encryption and zlib compression of every stored
        event. Which store it is, is wired in code (chatbot/eventstore/application.py builds
        the store of chatbot/eventstore/store.py). Only the one-time bootstrap creates
        tables: DDL from several processes at once makes PostgreSQL fail with "tuple
        concurrently updated"."""
        return {
            "CREATE_TABLE": "y" if create_tables else "n",
            "CHAIN_KEY": self.chain_key,
            "POSTGRES_DBNAME": self.pg_dbname,
            "POSTGRES_HOST": self.pg_host,
            "POSTGRES_PORT": str(self.pg_port),
            "POSTGRES_USER": self.pg_user,
            "POSTGRES_PASSWORD": self.pg_password,
            # Small pools: every process and tool has its own, and together they must stay
            # under the server's max_connections (100 for the embedded one).
            "POSTGRES_POOL_SIZE": str(self.pg_pool_size),
            "POSTGRES_MAX_OVERFLOW": str(self.pg_pool_overflow),
            "POSTGRES_PRE_PING": "y",
            # No write holds a lock for good (chatbot/runtime/postgres.py): the event table's lock is
            # waited for at most this long, and a session that stops mid-transaction ends.
            "POSTGRES_LOCK_TIMEOUT": str(LOCK_TIMEOUT_S),
            "POSTGRES_IDLE_IN_TRANSACTION_SESSION_TIMEOUT": str(int(IDLE_IN_TRANSACTION_S)),
            "CIPHER_TOPIC": "eventsourcing.cipher:AESCipher",
            "CIPHER_KEY": self.cipher_key,
            "COMPRESSOR_TOPIC": "eventsourcing.compressor:ZlibCompressor",
        }

    def to_env(self) -> dict[str, str]:
        """The `CHATBOT_*` variables that recreate these settings in a child process."""
        return {
            "CHATBOT_DATA_DIR": str(self.data_dir),
            "CHATBOT_PG_HOST": self.pg_host,
            "CHATBOT_PG_PORT": str(self.pg_port),
            "CHATBOT_PG_USER": self.pg_user,
            "CHATBOT_PG_PASSWORD": self.pg_password,
            "CHATBOT_PG_DBNAME": self.pg_dbname,
            "CHATBOT_PG_POOL_SIZE": str(self.pg_pool_size),
            "CHATBOT_PG_POOL_OVERFLOW": str(self.pg_pool_overflow),
            "CHATBOT_NATS_URL": self.nats_url,
            "CHATBOT_TRITON_URL": self.triton_url,
            "CHATBOT_API_HOST": self.api_host,
            "CHATBOT_API_PORT": str(self.api_port),
            "CHATBOT_CIPHER_KEY": self.cipher_key,
            "CHATBOT_SECRET_KEY": base64.b64encode(self.secret_key).decode(),
            "CHATBOT_PARTITIONS": str(self.partitions),
            "CHATBOT_CONSUME_PARTITIONS": format_partitions(self.consume_partitions),
            "CHATBOT_STREAM_REPLICAS": str(self.stream_replicas),
            "CHATBOT_STREAM": self.stream_name,
            "CHATBOT_ACK_WAIT_S": str(self.ack_wait_s),
            "CHATBOT_RETENTION_SWEEP_S": str(self.retention_sweep_s),
            "CHATBOT_EMPTY_CHAT_TTL_S": str(self.empty_chat_ttl_s),
            "CHATBOT_MODEL": self.model_name,
            "CHATBOT_COOKIE_SECURE": "1" if self.cookie_secure else "0",
            "CHATBOT_MESSAGES_PER_MINUTE": str(self.messages_per_minute),
            "CHATBOT_ALLOWED_ORIGINS": ",".join(self.allowed_origins),
            "CHATBOT_AUTH_ATTEMPTS_PER_ADDRESS": str(self.auth_attempts_per_address),
            "CHATBOT_LOGIN_FAILURES_PER_ACCOUNT": str(self.login_failures_per_account),
            "CHATBOT_TRUSTED_PROXIES": ",".join(self.trusted_proxies),
            "CHATBOT_TOKENS_PER_DAY": str(self.tokens_per_day),
            "CHATBOT_MAX_REPLY_TOKENS": str(self.max_reply_tokens),
            "CHATBOT_MODEL_TITLES": "1" if self.model_titles else "0",
            "CHATBOT_CHAIN_KEY": self.chain_key,
            "CHATBOT_MODEL_REPOSITORY": str(self.model_repository),
            "CHATBOT_METRICS_PORT": str(self.metrics_port),
            "CHATBOT_METRICS_HOST": self.metrics_host,
            "CHATBOT_LOG_FORMAT": self.log_format,
        }


def parse_partitions(spec: str, partitions: int) -> tuple[int, ...]:
    """`"0-3,6"` -> (0, 1, 2, 3, 6): the partitions a consumer reads; `""` -> () (all)."""
    chosen: set[int] = set()
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise ValueError(
                f"CHATBOT_CONSUME_PARTITIONS: {part!r} is not a partition or a range like 0-3"
            ) from None
        if not 0 <= low <= high < partitions:
            raise ValueError(
                f"CHATBOT_CONSUME_PARTITIONS: {part!r} is outside partitions 0-{partitions - 1}"
                f" (CHATBOT_PARTITIONS={partitions})"
            )
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


def format_partitions(chosen: tuple[int, ...], sep: str = ",") -> str:
    """(0, 1, 2, 3, 6) -> `"0-3,6"`, the inverse of `parse_partitions`."""
    runs: list[list[int]] = []
    for p in sorted(chosen):
        if runs and p == runs[-1][1] + 1:
            runs[-1][1] = p
        else:
            runs.append([p, p])
    return sep.join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def _whole(name: str, value: str, least: int) -> int:
    """A whole number of `least` or more, with a clear error otherwise."""
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"CHATBOT_{name} must be a whole number, got {value!r}") from None
    if number < least:
        raise ValueError(f"CHATBOT_{name} must be {'at least 1' if least == 1 else f'{least} or more'}, got {number}")
    return number


def _positive(name: str, value: str) -> int:
    return _whole(name, value, 1)


LOG_FORMATS = ("text", "json")


def _not_negative(name: str, value: str) -> int:
    """0 or more (0 often meaning "never")."""
    return _whole(name, value, 0)


def _key(name: str, value: str) -> str:
    """A key given as standard base64 of 32 random bytes (`openssl rand -base64 32`), with a
    clear error otherwise: a URL-safe or truncated one would fail far from its cause."""
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ValueError(f"CHATBOT_{name} must be standard base64 (openssl rand -base64 32)") from None
    if len(raw) != 32:
        raise ValueError(f"CHATBOT_{name} must decode to 32 bytes (openssl rand -base64 32), got {len(raw)}")
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"CHATBOT_{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _port(name: str, value: str) -> int:
    """A TCP port, or 0 for none."""
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"CHATBOT_{name} must be a port number (0: none), got {value!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"CHATBOT_{name} must be 0 (none) or a port from 1 to 65535, got {port}")
    return port


def _secret_from_file(path: Path, make: Callable[[], str]) -> str:
    """Read a secret from `path`, creating it (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def load_settings(data_dir: Path | None = None) -> Settings:
    data_dir = (data_dir or Path(_env("DATA_DIR", str(REPO_ROOT / ".data")))).resolve()
    keys = data_dir / "keys"
    cipher_key = os.environ.get("CHATBOT_CIPHER_KEY") or _secret_from_file(
        keys / "cipher.key", lambda: base64.b64encode(secrets.token_bytes(32)).decode()
    )
    chain_key = os.environ.get("CHATBOT_CHAIN_KEY") or _secret_from_file(
        keys / "chain.key", lambda: base64.b64encode(secrets.token_bytes(32)).decode()
    )
    secret_b64 = os.environ.get("CHATBOT_SECRET_KEY") or _secret_from_file(
        keys / "secret.key", lambda: base64.b64encode(secrets.token_bytes(32)).decode()
    )
    cipher_key, chain_key = _key("CIPHER_KEY", cipher_key), _key("CHAIN_KEY", chain_key)
    secret_b64 = _key("SECRET_KEY", secret_b64)
    partitions = _positive("PARTITIONS", _env("PARTITIONS", "1"))
    return Settings(
        data_dir=data_dir,
        pg_host=_env("PG_HOST", str(data_dir / "postgres")),
        pg_port=int(_env("PG_PORT", "5432")),
        pg_user=_env("PG_USER", "postgres"),
        pg_password=_env("PG_PASSWORD", ""),
        pg_dbname=_env("PG_DBNAME", "postgres"),
        pg_pool_size=int(_env("PG_POOL_SIZE", "3")),
        pg_pool_overflow=int(_env("PG_POOL_OVERFLOW", "7")),
        nats_url=_env("NATS_URL", "nats://127.0.0.1:14222"),
        triton_url=_env("TRITON_URL", "127.0.0.1:18001"),
        api_host=_env("API_HOST", "127.0.0.1"),
        api_port=int(_env("API_PORT", "8000")),
        cipher_key=cipher_key,
        secret_key=base64.b64decode(secret_b64),
        partitions=partitions,
        consume_partitions=parse_partitions(_env("CONSUME_PARTITIONS", ""), partitions),
        stream_replicas=_positive("STREAM_REPLICAS", _env("STREAM_REPLICAS", "1")),
        stream_name=_env("STREAM", "CHAT"),
        ack_wait_s=float(_env("ACK_WAIT_S", "30")),
        retention_sweep_s=float(_env("RETENTION_SWEEP_S", "30")),
        empty_chat_ttl_s=_not_negative("EMPTY_CHAT_TTL_S", _env("EMPTY_CHAT_TTL_S", "86400")),
        model_name=_env("MODEL", "chat"),
        cookie_secure=_env("COOKIE_SECURE", "0") == "1",
        messages_per_minute=int(_env("MESSAGES_PER_MINUTE", "30")),
        allowed_origins=tuple(o for o in _env("ALLOWED_ORIGINS", "").split(",") if o),
        auth_attempts_per_address=int(_env("AUTH_ATTEMPTS_PER_ADDRESS", "60")),
        login_failures_per_account=int(_env("LOGIN_FAILURES_PER_ACCOUNT", "10")),
        trusted_proxies=tuple(p.strip() for p in _env("TRUSTED_PROXIES", "").split(",") if p.strip()),
        tokens_per_day=int(_env("TOKENS_PER_DAY", "200000")),
        max_reply_tokens=int(_env("MAX_REPLY_TOKENS", "0")),
        model_titles=_env("MODEL_TITLES", "1") not in ("0", "false", "no", "off"),
        chain_key=chain_key,
        model_repository=Path(_env("MODEL_REPOSITORY", str(REPO_ROOT / "triton_models"))).resolve(),
        metrics_port=_port("METRICS_PORT", _env("METRICS_PORT", "0")),
        metrics_host=_env("METRICS_HOST", "127.0.0.1"),
        log_format=_choice("LOG_FORMAT", _env("LOG_FORMAT", "text"), LOG_FORMATS),
    )
