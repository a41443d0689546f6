"""The API's composition root: settings, the write-side application, the read models,
the NATS connection and the Triton client, built once per process at start-up.

Blocking (database) calls run on a thread pool of the process's own (`CallPool`): jobs go
on one queue, and each result comes back to the event loop as a callback that settles an
asyncio future. At a few thousand calls a second this is most of what a call costs, so it
skips what `run_in_executor` adds: a `concurrent.futures.Future` (a lock and a condition
each), the pool's idle-thread semaphore and the chaining of the two futures. anyio's
semantics are kept: the call sees the caller's context variables, and a caller that is
cancelled unwinds only once its call has returned.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, TypeVar

import anyio.to_thread
import nats
from tritonclient.grpc import aio as triton_aio

from api.key_use import KeyUseStore
from api.limits import RateLimiter
from api.sessions import REFRESH_S as SESSIONS_REFRESH_S
from api.sessions import SessionStore
from api.throttle import AuthThrottle
from chatbot.eventstore.application import chat_application
from chatbot.runtime.config import Settings
from domain.application import ChatApplication
from projections.readmodels import ReadModelRecorder, read_model_recorder

T = TypeVar("T")
log = logging.getLogger("api")
THREADS = 40  # as many as anyio's default thread limiter allows


class CallPool:
    """Threads that run blocking calls for event loops and hand each result back as a
    loop callback."""

    def __init__(self, threads: int, name: str) -> None:
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.closed = False
        self.threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

    def submit(self, func: Callable[[], T]) -> asyncio.Future[T]:
        if self.closed:
            raise RuntimeError("the call pool is shut down")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self.jobs.put((loop, future, func))
        return future

    def _work(self) -> None:
        while (job := self.jobs.get()) is not None:
            loop, future, func = job
            try:
                outcome, failed = func(), False
            except StopIteration as e:  # a future cannot hold StopIteration
                outcome, failed = RuntimeError(f"{func!r} raised StopIteration"), True
                outcome.__cause__ = e
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                outcome, failed = e, True
            try:
                loop.call_soon_threadsafe(_settle, future, outcome, failed)
            except RuntimeError:
                pass  # the loop closed meanwhile: nobody waits for this outcome
            del job, loop, future, func, outcome  # nothing of a finished call stays referenced

    def shutdown(self) -> None:
        """Let the calls in hand finish, then stop the threads; later calls are refused."""
        self.closed = True
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


def _settle(future: asyncio.Future[Any], outcome: Any, failed: bool) -> None:
    if future.cancelled():
        return
    if failed:
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


@dataclass
class Services:
    settings: Settings
    app: ChatApplication
    readmodels: ReadModelRecorder
    nc: nats.NATS
    triton: triton_aio.InferenceServerClient
    limits: RateLimiter
    throttle: AuthThrottle
    sessions: SessionStore
    key_use: KeyUseStore
    executor: CallPool = field(default_factory=lambda: CallPool(THREADS, "db"), repr=False)
    quiet_replies: Any = field(default=None, repr=False)  # api.reply_stream.QuietReplies, made on first use
    ended_sessions: Any = field(default=None, repr=False)  # api.chat_socket.EndedSessions, made on first use
    session_watch: asyncio.Task[None] | None = field(default=None, repr=False)

    @classmethod
    async def create(cls, settings: Settings) -> Services:
        app = await anyio.to_thread.run_sync(chat_application, settings)
        readmodels = await anyio.to_thread.run_sync(
            partial(read_model_recorder, settings.eventsourcing_env(), keys=app.keys))
        nc = await nats.connect(settings.nats_servers, max_reconnect_attempts=-1)
        limits = RateLimiter(readmodels, settings.messages_per_minute, settings.tokens_per_day)
        throttle = AuthThrottle(readmodels, settings.auth_attempts_per_address, settings.login_failures_per_account,
                                settings.secret_key)
        sessions = SessionStore(readmodels, settings.token_ttl_s)
        key_use = KeyUseStore(readmodels)
        await anyio.to_thread.run_sync(sessions.refresh)  # every end young enough to matter, before serving
        services = cls(settings, app, readmodels, nc, triton_aio.InferenceServerClient(settings.triton_urls[0]), limits,
                       throttle, sessions, key_use)
        services.session_watch = asyncio.create_task(services.watch_sessions())
        return services

    async def watch_sessions(self) -> None:
        """Learn, every REFRESH_S, the sessions other processes ended (api/sessions.py)."""
        while True:
            await asyncio.sleep(SESSIONS_REFRESH_S)
            try:
                await self.call(self.sessions.refresh)
            except Exception:  # noqa: BLE001 - the database is away: try again next round
                log.warning("could not read the ended sessions; trying again", exc_info=True)

    async def close(self) -> None:
        if self.session_watch is not None:
            self.session_watch.cancel()
        if self.quiet_replies is not None and self.quiet_replies.task is not None:
            self.quiet_replies.task.cancel()
        await self.key_use.close()
        await self.nc.drain()
        await self.triton.close()
        # calls in hand finish before the pools they use close
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
        self.readmodels.datastore.close()
        self.app.close()

    async def call(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking (database) call off the event loop."""
        context = contextvars.copy_context()
        future = self.executor.submit(partial(context.run, func, *args, **kwargs))
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
