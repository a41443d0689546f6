"""The API's composition root: settings, the write-side application, the read models,
the NATS connection and the Triton client, built once per process at start-up."""

from __future__ import annotations

from dataclasses import dataclass
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


@dataclass
class Services:
    settings: Settings
    app: ChatApplication
    readmodels: ReadModelRecorder
    nc: nats.NATS
    triton: triton_aio.InferenceServerClient
    limits: RateLimiter

    @classmethod
    async def create(cls, settings: Settings) -> Services:
        app = await anyio.to_thread.run_sync(chat_application, settings)
        readmodels = await anyio.to_thread.run_sync(read_model_recorder, settings.eventsourcing_env())
        nc = await nats.connect(settings.nats_url, max_reconnect_attempts=-1)
        limits = RateLimiter(readmodels, settings.messages_per_minute, settings.tokens_per_day)
        return cls(settings, app, readmodels, nc, triton_aio.InferenceServerClient(settings.triton_url), limits)

    async def close(self) -> None:
        await self.nc.drain()
        await self.triton.close()
        self.readmodels.datastore.close()
        self.app.close()

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking (database) call off the event loop."""
        return await anyio.to_thread.run_sync(lambda: func(*args, **kwargs))
