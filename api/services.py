"""The API's composition root: settings, the write-side application, the read models,
the NATS connection and the Triton client, built once per process at start-up.

Blocking (database) calls run on a thread pool of the process's own. `call` hands work to
it through asyncio's executor, a few times cheaper per call than anyio's `to_thread`,
with anyio's semantics kept: the call sees the caller's context variables, and a caller
that is cancelled unwinds only once its call has returned.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, TypeVar

import anyio.to_thread
import nats
from tritonclient.grpc import aio as triton_aio

from api.limits import RateLimiter
from chatbot.bootstrap import chat_application
from chatbot.config import Settings
from domain.application import ChatApplication
from projections.readmodels import ReadModelRecorder, read_model_recorder

T = TypeVar("T")
THREADS = 40  # as many as anyio's default thread limiter allows


@dataclass
class Services:
    settings: Settings
    app: ChatApplication
    readmodels: ReadModelRecorder
    nc: nats.NATS
    triton: triton_aio.InferenceServerClient
    limits: RateLimiter
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(THREADS, thread_name_prefix="db"), repr=False
    )

    @classmethod
    async def create(cls, settings: Settings) -> Services:
        app = await anyio.to_thread.run_sync(chat_application, settings)
        readmodels = await anyio.to_thread.run_sync(read_model_recorder, settings.eventsourcing_env())
        nc = await nats.connect(settings.nats_servers, max_reconnect_attempts=-1)
        limits = RateLimiter(readmodels, settings.messages_per_minute, settings.tokens_per_day)
        return cls(settings, app, readmodels, nc, triton_aio.InferenceServerClient(settings.triton_url), limits)

    async def close(self) -> None:
        await self.nc.drain()
        await self.triton.close()
        # calls in hand finish before the pools they use close
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
        self.readmodels.datastore.close()
        self.app.close()

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking (database) call off the event loop."""
        context = contextvars.copy_context()
        future = asyncio.get_running_loop().run_in_executor(
            self.executor, context.run, partial(func, *args, **kwargs)
        )
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            while not future.done():  # the call goes on in its thread: let it return first
                try:
                    await asyncio.shield(future)
                except asyncio.CancelledError:
                    continue
                except Exception:  # noqa: BLE001 - its outcome goes nowhere: the caller is cancelled
                    break
            raise
