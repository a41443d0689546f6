"""What every long-running process shares: logging, and a stop event set by SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal


def setup_logging(name: str) -> logging.Logger:
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name:>9} %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    return logging.getLogger(name)


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
