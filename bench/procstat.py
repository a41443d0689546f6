"""CPU time and memory of the stack's processes, read from /proc (Linux), for the benchmarks.

`StackCpu` snapshots the CPU seconds (user + system) of each application child of a
`Stack`, of its NATS server and of its PostgreSQL (the postmaster and every backend, with
the time of backends that exited), so a benchmark can say where the CPU went while it ran.
"""

from __future__ import annotations

import os
from pathlib import Path

from chatbot.ops.launcher import Stack

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # the fields after the command name


def cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """User + system CPU seconds of `pid` (and of its children it has waited for)."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / TICKS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid` now."""
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


class StackCpu:
    def __init__(self, stack: Stack) -> None:
        self.stack = stack

    def pids(self) -> dict[str, int]:
        found = {name: child.proc.pid for name, child in self.stack.children.items()
                 if child.proc is not None and child.alive() and name != "triton"}
        return found

    def snapshot(self) -> dict[str, float]:
        seconds = {name: cpu_seconds(pid) for name, pid in self.pids().items()}
        if self.stack.postgres is not None:
            postmaster = self.stack.postgres.server.get_pid()
            if postmaster:
                seconds["postgres"] = cpu_seconds(postmaster, with_reaped_children=True) + sum(
                    cpu_seconds(p) for p in children(postmaster)
                )
        seconds["bench client"] = cpu_seconds(os.getpid())
        return seconds

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before.get(name, 0.0) for name in after}


def describe_cpu(spent: dict[str, float], per: int, what: str) -> str:
    """'api 1.23 ms, postgres 0.80 ms, ...' CPU per `what`, busiest first."""
    parts = [f"{name} {seconds / per * 1000:.2f} ms" for name, seconds in
             sorted(spent.items(), key=lambda kv: -kv[1]) if seconds > 0]
    total = sum(spent.values()) / per * 1000
    return f"CPU per {what}: {total:.2f} ms ({', '.join(parts)})"
