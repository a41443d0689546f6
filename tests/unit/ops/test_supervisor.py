"""The supervisor behind `chatbot up` restarts a child that dies, and stops them all."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from chatbot.ops.launcher import Child, Stack
from chatbot.runtime.config import load_settings
from tests.waiting import eventually


def test_a_killed_child_is_restarted_and_stop_ends_everything(tmp_path: Path) -> None:
    stack = Stack(load_settings(tmp_path))
    child = Child("sleeper", ["sleep", "60"], dict(os.environ))
    stack.children["sleeper"] = child
    child.start()
    first_pid = child.proc.pid
    restarts: list[tuple[str, int | None]] = []
    supervisor = threading.Thread(target=stack.supervise, kwargs={"poll": 0.05, "on_restart": lambda n, c: restarts.append((n, c))})
    supervisor.start()
    try:
        os.kill(first_pid, signal.SIGKILL)
        eventually(lambda: child.alive() and child.proc.pid != first_pid, timeout=10, interval=0.05,
                   what="the killed child restarted")
        assert restarts == [("sleeper", -signal.SIGKILL)]
    finally:
        stack.stop()
        supervisor.join(5)
    assert not supervisor.is_alive()
    assert not child.alive()
