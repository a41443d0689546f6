"""Prometheus metrics of every process, named in one place (`prometheus-client`).

Each process (api, relay, worker, projector) serves its metrics on a small HTTP port of
its own, `CHATBOT_METRICS_PORT` (0: none) on `CHATBOT_METRICS_HOST`; `chatbot up` gives
each child its own port (chatbot/ops/launcher.py), a container uses the same one everywhere
(docker-compose.yml). The API serves them there too, not as a route of its HTTP port:
nginx passes every path of that port to the public (deploy/nginx.conf), and counters of
one process must not be read through a load balancer that picks another. Triton's own
metrics (its port 8002) already count the engine's queue and its active sequences, so
nothing here repeats them.

Every series lives in the default registry, so each process also exposes the series of
the others, at zero; dashboards select by job. Label values come from fixed sets only
(frame types, finish reasons, partitions, consumer names; anything else is "other",
`bounded`): never a user, conversation, message or key id, so the number of series stays
bounded whatever the traffic.

Lag per partition (relay: events committed and not on the stream yet; projector: events
on the stream and not applied yet). The total is exact (the relay: the event store's
newest notification id minus its position; the projector: JetStream's count of the
consumer's undelivered events); it is split over the partitions in proportion to the
events just read (`apportion`), which is exact whenever one partition is behind, as each
process reads the partitions interleaved in one order. Seconds: how long the oldest event
not handled yet has waited (`PartitionLag`): the relay counts from when it first read it
(it reads within a millisecond of the commit's NOTIFY); the projector from the stream time
of the newest event it applied, which the events still behind it came after.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("metrics")

OTHER = "other"
# seconds: a websocket frame's answer (ms) up to a slow first token under load (a minute)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# seconds per output token: ~10 ms on a GPU, ~70 ms for the small model on a CPU
TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
# a whole Triton request: a short reply in a fraction of a second, a long one in minutes
REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# saves or events per group commit: powers of two up to the commit's cap (chatbot/eventstore/group_commit.py)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

SERVER_FRAME_TYPES = frozenset({"accepted", "token", "reply", "error", "resumed", "title"})
FINISH_REASONS = frozenset({"stop", "length", "cancelled", "error"})
# the settings that refuse: api/limits.py (sends), api/throttle.py (log-ins)
RATE_LIMITS = frozenset({"messages_per_minute", "tokens_per_day", "auth_attempts_per_address",
                         "login_failures_per_account"})
TRITON_OUTCOMES = frozenset({"ok", "error", "cancelled"})

# -- the API ----------------------------------------------------------------------------------
WEBSOCKETS_OPEN = Gauge("chat_websockets_open", "Chat websockets open in this API process")
FRAMES = Counter("chat_websocket_frames", "Websocket frames by direction (in, out) and type",
                 ["direction", "type"])
SEND_ACCEPTED = Histogram("chat_send_accepted_seconds", "From handling a send (edit, regenerate) frame to its accepted frame",
                          buckets=LATENCY_BUCKETS)
API_FIRST_TOKEN = Histogram("chat_api_first_token_seconds",
                            "From handling a send (edit, regenerate) frame to the reply's first token frame", buckets=LATENCY_BUCKETS)
API_TOKEN = Histogram("chat_api_time_per_output_token_seconds",
                      "A reply's mean time between token frames after the first, as the API forwards them",
                      buckets=TOKEN_BUCKETS)
RATE_LIMITED = Counter("chat_rate_limit_refusals", "Requests refused by a rate limit or quota", ["limit"])

# -- the workers ------------------------------------------------------------------------------
WORKER_FIRST_TOKEN = Histogram("chat_worker_first_token_seconds",
                               "From a reply request's arrival at the worker to its first token",
                               buckets=LATENCY_BUCKETS)
WORKER_TOKEN = Histogram("chat_worker_time_per_output_token_seconds",
                         "A reply's mean time per output token after the first", buckets=TOKEN_BUCKETS)
REPLIES_WRITING = Gauge("chat_worker_replies_writing", "Replies this worker is writing now")
REPLIES = Counter("chat_replies", "Reply outcomes by finish reason (error: the reply failed)", ["finish_reason"])
TRITON_REQUEST = Histogram("chat_triton_request_seconds", "A streamed Triton request, from its start to its end",
                           ["outcome"], buckets=REQUEST_BUCKETS)
REDELIVERIES = Counter("chat_jetstream_redeliveries", "JetStream messages delivered more than once", ["consumer"])

# -- the event store (every process that saves) -----------------------------------------------
GROUP_COMMIT_SAVES = Histogram("chat_group_commit_saves", "Saves committed together in one transaction",
                               buckets=BATCH_BUCKETS)
GROUP_COMMIT_EVENTS = Histogram("chat_group_commit_events", "Events committed together in one transaction",
                                buckets=BATCH_BUCKETS)

# -- the relay and the projectors -------------------------------------------------------------
RELAY_LAG_EVENTS = Gauge("chat_relay_lag_events", "Events committed and not on the stream yet", ["partition"])
RELAY_LAG_SECONDS = Gauge("chat_relay_lag_seconds", "How long the oldest event not on the stream yet has waited",
                          ["partition"])
PROJECTOR_LAG_EVENTS = Gauge("chat_projector_lag_events", "Events on the stream not applied to the read models yet",
                             ["partition"])
PROJECTOR_LAG_SECONDS = Gauge("chat_projector_lag_seconds",
                              "How long the oldest event not applied yet has been on the stream", ["partition"])


def bounded(value: str, allowed: Collection[str]) -> str:
    """`value` as a label if it is one of `allowed`, else "other": a label never takes a
    value from the outside world unchecked."""
    return value if value in allowed else OTHER


def serve(port: int, host: str = "127.0.0.1") -> bool:
    """Serve `/metrics` on host:port in a thread; port 0: not at all. A port that is taken
    is logged, not fatal: a process that cannot be watched still answers its users."""
    if not port:
        return False
    if not 0 < port < 65536:
        raise ValueError(f"CHATBOT_METRICS_PORT must be a TCP port (1-65535) or 0 for none, got {port}")
    try:
        start_http_server(port, addr=host)
    except OSError as e:
        log.error("metrics not served on %s:%d: %s", host, port, e)
        return False
    log.info("metrics on http://%s:%d/metrics", host, port)
    return True


def apportion(total: int, sample: Mapping[int, int], partitions: Iterable[int]) -> dict[int, int]:
    """Split `total` over `partitions` in proportion to `sample` (events just read, per
    partition), by largest remainder so the parts add up to `total`; an empty sample
    spreads it evenly."""
    chosen = list(partitions)
    assert chosen, "lag is split over at least one partition"
    total = max(0, total)
    weights = {p: max(0, sample.get(p, 0)) for p in chosen}
    if not any(weights.values()):
        weights = dict.fromkeys(chosen, 1)
    whole = sum(weights.values())
    parts = {p: total * w // whole for p, w in weights.items()}
    # the units left by rounding down go to the largest remainders (ties: lower partition)
    left = total - sum(parts.values())
    for p in sorted(chosen, key=lambda p: (-(total * weights[p] % whole), p))[:left]:
        parts[p] += 1
    return parts


class PartitionLag:
    """The lag gauges of one process, per partition it handles: events behind, and since
    when the oldest of them has waited (told by the caller, or first seen here)."""

    def __init__(self, events: Gauge, seconds: Gauge, partitions: Iterable[int],
                 clock: Callable[[], float] = time.time) -> None:
        self.events, self.seconds = events, seconds
        self.partitions = tuple(partitions)
        self.clock = clock
        self.since: dict[int, float] = {}  # partition -> when its oldest unhandled event arrived
        self.update(0, {})

    def update(self, behind: int, sample: Mapping[int, int], oldest: Mapping[int, float] | None = None) -> dict[int, float]:
        """`behind` events in all (split as `sample` says); `oldest`: per partition, when its
        oldest event not handled yet arrived, if the caller knows. Returns the seconds set."""
        now = self.clock()
        parts = apportion(behind, sample, self.partitions)
        waited: dict[int, float] = {}
        for p, n in parts.items():
            if n == 0:
                self.since.pop(p, None)
            elif oldest and p in oldest:
                self.since[p] = oldest[p]
            else:
                self.since.setdefault(p, now)
            waited[p] = max(0.0, now - self.since[p]) if p in self.since else 0.0
            self.events.labels(partition=str(p)).set(n)
            self.seconds.labels(partition=str(p)).set(waited[p])
        return waited


@dataclass
class ReplyClock:
    """One reply's timings as the API sees them: from its command to its first token frame,
    then the mean time between token frames (each about one output token) until its end."""

    started: float  # time.monotonic() when the command that asked for it began
    first_token: Histogram = API_FIRST_TOKEN
    per_token: Histogram = API_TOKEN
    first: float = 0.0
    last: float = 0.0
    tokens: int = 0

    def token(self, now: float) -> None:
        if not self.tokens:
            self.first = now
            self.first_token.observe(max(0.0, now - self.started))
        self.last, self.tokens = now, self.tokens + 1

    def done(self) -> None:
        if self.tokens > 1:
            self.per_token.observe(max(0.0, self.last - self.first) / (self.tokens - 1))
