"""The inference worker: turns each `ReplyRequested` event into exactly one outcome.

Workers share one durable JetStream pull consumer (explicit acks), so any number of them
split the requests. For each request the worker loads the prompt context from the events
(persona at the pinned version, the turns before the message), streams the reply from
Triton over gRPC, forwards every text delta on the conversation's core NATS subject, and
signals `in_progress` to JetStream while it generates. When generation ends it records
`ReplyCompleted` (or `ReplyFailed`) and only then acks. A request delivered again after
a worker died finds either a pending reply (it generates again, from the same pinned seed)
or a recorded outcome (it re-announces that outcome and acks): one outcome per request.
Each request is handled in a `worker reply` span that continues the message's trace from
the relay's headers: `prompt build`, `triton generate` (its first and last token marked),
`record reply` (chatbot/runtime/tracing.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import nats
import numpy as np
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry.trace import SpanKind
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio

from chatbot.bus.messaging import (
    CANCEL_SUBJECT_PREFIX,
    PROGRESS_SUBJECT_PREFIX,
    ReplyDone,
    ReplyError,
    TitleWritten,
    TokenDelta,
    consumer_filters,
    consumer_name,
    decode_event,
    event_filter,
    token_encoder,
    token_subject,
)
from chatbot.eventstore.application import chat_application
from chatbot.inference import contract
from chatbot.inference.errors import INVALID_REQUEST
from chatbot.inference.prompt import PromptBuilder, UnknownModel
from chatbot.runtime.config import Settings, load_settings
from chatbot.runtime.metrics import (
    FINISH_REASONS,
    REDELIVERIES,
    REPLIES,
    REPLIES_WRITING,
    TRITON_REQUEST,
    WORKER_FIRST_TOKEN,
    WORKER_TOKEN,
    bounded,
    serve,
)
from chatbot.runtime.process import setup_logging, stop_on_signals
from chatbot.runtime.tracing import (
    add_event,
    extract,
    set_attributes,
    setup_tracing,
    span,
)
from chatbot.runtime.tracing import shutdown as shutdown_tracing
from domain.app_replies import ReplyJob
from domain.application import ChatApplication
from projections.readmodels import read_model_recorder
from workers import retention
from workers.rollout import serving_model
from workers.routing import TritonRouter, unreachable
from workers.titles import TITLE_TIMEOUT_S, TITLE_TOKENS, clean_title, title_request

log = logging.getLogger("worker")
DURABLE = "workers"
MAX_DELIVER = 5  # attempts at generating a reply (a failed one is retried until then)
# JetStream delivers a request a few more times than that: a worker that dies during the
# last attempt leaves it to another, which records the failure instead of generating again,
# so no request runs out of deliveries without an outcome.
JETSTREAM_MAX_DELIVER = MAX_DELIVER + 3
CONCURRENCY = 64  # generations in flight per worker process; Triton batches them
CANCEL_MEMORY_S = 600.0
TRITON_WAIT_S = 60.0  # how long a request waits for an unreachable Triton to come back


class GenerationError(Exception):
    @property
    def permanent(self) -> bool:
        return INVALID_REQUEST in str(self)


@dataclass
class Generation:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float
    duration_ms: float
    model_version: str
    prep_ms: float = 0.0  # from the request's arrival to the Triton call

    def observe(self) -> None:
        """Count this recorded outcome and its token timings (chatbot/runtime/metrics.py)."""
        REPLIES.labels(finish_reason=bounded(self.finish_reason, FINISH_REASONS)).inc()
        if self.completion_tokens and self.ttft_ms:
            WORKER_FIRST_TOKEN.observe((self.prep_ms + self.ttft_ms) / 1000)
        if self.completion_tokens > 1:  # the first token's wait is the prompt's; the rest decode
            WORKER_TOKEN.observe((self.duration_ms - self.ttft_ms) / 1000 / (self.completion_tokens - 1))


def triton_inputs(messages: list[dict[str, str]], params: dict[str, Any]) -> list[InferInput]:
    """The `chat` model's inputs (chatbot/inference/contract.py): `messages`, every other
    input `params` names (the sampling values), `stop` only when non-empty and
    `background` only when true; keys of `params` that name no input are ignored."""
    values = {name: value for name, value in params.items() if name not in ("messages", "stop", "background")}
    values["messages"] = json.dumps(messages).encode()
    if params.get("stop"):
        values["stop"] = json.dumps(list(params["stop"])).encode()
    if params.get("background"):
        values["background"] = True
    inputs = []
    for spec in contract.INPUTS:
        if spec.name in values:
            tensor = InferInput(spec.name, list(contract.DIMS), spec.data_type)
            tensor.set_data_from_numpy(np.array([values[spec.name]], dtype=spec.numpy_dtype))
            inputs.append(tensor)
    return inputs


OUTPUTS = tuple(spec.name for spec in contract.OUTPUTS)


async def stream_reply(
    client: triton_aio.InferenceServerClient, model: str, request_id: str,
    messages: list[dict[str, str]], params: dict[str, Any], counts: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
    """Yield (delta, None) per streamed delta, then ("", final) with finish_reason, token
    counts and model version. Raises GenerationError on a Triton error. `counts`, if given,
    follows the token counts of every response (for a reply stopped before its end).
    Closing the generator early cancels the Triton request, which stops generating."""

    # A persona names a model as "name" (Triton's newest version) or "name/version" (pinned).
    name, _, version = model.partition("/")

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {
            "model_name": name, "model_version": version, "inputs": triton_inputs(messages, params),
            "request_id": request_id, "outputs": [InferRequestedOutput(n) for n in OUTPUTS],
        }

    responses = client.stream_infer(inputs_iterator=requests())
    started, outcome = time.perf_counter(), "error"
    try:
        async for result, error in responses:
            if error is not None:
                raise GenerationError(str(error))
            text = result.as_numpy("text")[0].decode("utf-8")
            finish = result.as_numpy("finish_reason")[0].decode()
            prompt_tokens = int(result.as_numpy("prompt_tokens")[0])
            completion_tokens = int(result.as_numpy("completion_tokens")[0])
            if counts is not None:
                counts.update(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                              model_version=result.get_response().model_version or version or "1")
            if text:
                yield text, None
            if finish:
                outcome = "ok"  # before the yield: the caller closes the stream once it has this
                yield "", {
                    "finish_reason": finish, "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "model_version": result.get_response().model_version or version or "1",
                }
                return
        raise GenerationError("the stream ended without a final response")
    except (GeneratorExit, asyncio.CancelledError):
        if outcome != "ok":
            outcome = "cancelled"  # closed before its end: a stop, a title's timeout, a shutdown
        raise
    finally:
        TRITON_REQUEST.labels(outcome=outcome).observe(time.perf_counter() - started)
        responses.cancel()  # a no-op after the final response; otherwise Triton stops


class Worker:
    def __init__(self, settings: Settings, app: ChatApplication, nc: nats.NATS, tritons: TritonRouter) -> None:
        self.settings, self.app, self.nc, self.tritons = settings, app, nc, tritons
        self.prompts = PromptBuilder(settings.model_repository)
        self.generating: dict[str, asyncio.Event] = {}  # reply id -> set to stop it
        REPLIES_WRITING.set_function(lambda: len(self.generating))
        self.cancelled: dict[str, float] = {}  # stops heard for replies not (yet) here
        self.progress: dict[str, list[str]] = {}  # reply id -> the text parts written so far
        self.titling: set[asyncio.Task[None]] = set()  # titles being written (workers/titles.py)

    async def on_progress(self, msg: Msg) -> None:
        """A client reconnected mid-reply: send the text so far, if this worker writes it."""
        reply_id = msg.subject.rsplit(".", 1)[-1]
        parts = self.progress.get(reply_id)
        if parts is not None and msg.reply:
            await msg.respond(token_encoder.encode(TokenDelta(reply_id, 0, "".join(parts))))

    async def on_cancel(self, msg: Msg) -> None:
        reply_id = msg.subject.rsplit(".", 1)[-1]
        if reply_id in self.generating:
            self.generating[reply_id].set()
            return
        now = time.monotonic()
        self.cancelled = {r: t for r, t in self.cancelled.items() if now - t < CANCEL_MEMORY_S}
        self.cancelled[reply_id] = now  # in case its request reaches this worker later

    async def handle(self, msg: Msg) -> None:
        """One reply request, in a span that continues its trace (the relay's headers)."""
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        with span("worker reply", SpanKind.CONSUMER, {"messaging.system": "nats", "messaging.delivery_count": delivered},
                  context=extract(msg.headers)):
            await self._handle(msg)

    async def _handle(self, msg: Msg) -> None:
        received = time.perf_counter()
        if msg.metadata and msg.metadata.num_delivered > 1:
            REDELIVERIES.labels(consumer=DURABLE).inc()
        event = decode_event(self.app.mapper, msg.headers or {}, msg.data)
        conversation_id, reply_id = event.originator_id, event.reply_id
        try:
            with span("prompt build"):
                job, messages = await asyncio.to_thread(self.prepare, conversation_id, reply_id)
            if job.status != "pending":
                log.info("reply %s already has an outcome (%s): re-announcing it", reply_id, job.status)
                await self.announce(job)
                await msg.ack()
                return
            delivered = msg.metadata.num_delivered if msg.metadata else 1
            if delivered > MAX_DELIVER + 1:  # the workers that tried it died: stop here, with an outcome
                await self.give_up_or_retry(msg, conversation_id, reply_id,
                                            f"no worker finished it in {delivered - 1} attempts", retry=False)
                return
            with span("triton generate"):
                generation = await self.generate(job, messages, msg, received)
                set_attributes({"gen_ai.usage.output_tokens": generation.completion_tokens,
                                "chat.finish_reason": bounded(generation.finish_reason, FINISH_REASONS)})
            with span("record reply"):
                recorded = await asyncio.to_thread(
                    self.app.complete_reply, conversation_id, reply_id,
                    text=generation.text, finish_reason=generation.finish_reason,
                    prompt_tokens=generation.prompt_tokens, completion_tokens=generation.completion_tokens,
                    ttft_ms=generation.ttft_ms, duration_ms=generation.duration_ms,
                    model_name=job.model.partition("/")[0], model_version=generation.model_version,
                )
            if not recorded:  # another delivery of this request won the race
                job = await asyncio.to_thread(self.app.reply_job, conversation_id, reply_id)
            else:
                generation.observe()
                log.info("reply %s: %d tokens, prep %.1f ms, ttft %.1f ms, %.0f ms in all", reply_id,
                         generation.completion_tokens, generation.prep_ms, generation.ttft_ms, generation.duration_ms)
            await self.announce(job, generation if recorded else None)
            await msg.ack()
            if recorded and job.untitled and self.settings.model_titles and generation.text.strip():
                task = asyncio.create_task(self.write_title(job))
                self.titling.add(task)
                task.add_done_callback(self.titling.discard)
        except GenerationError as e:
            await self.give_up_or_retry(msg, conversation_id, reply_id, str(e), retry=not e.permanent)
        except UnknownModel as e:  # the persona names no served model: trying again cannot help
            await self.give_up_or_retry(msg, conversation_id, reply_id, str(e), retry=False)
        except Exception as e:  # noqa: BLE001 - a worker must survive any one request
            log.exception("reply %s failed", reply_id)
            await self.give_up_or_retry(msg, conversation_id, reply_id, f"internal error: {type(e).__name__}")
        finally:
            # Only now: a client resuming while the outcome is being recorded (the reply still
            # pending in the events) must still get the text so far, here the whole of it.
            self.progress.pop(str(reply_id), None)

    def prepare(self, conversation_id: UUID, reply_id: UUID) -> tuple[ReplyJob, list[dict[str, str]]]:
        """Load the request's context and fit it to the model (blocking: runs in a thread)."""
        job = self.app.reply_job(conversation_id, reply_id)
        if job.status != "pending":
            return job, []
        max_tokens = int(job.params.get("max_tokens", 256))
        if self.settings.max_reply_tokens and max_tokens > self.settings.max_reply_tokens:
            max_tokens = self.settings.max_reply_tokens  # the operator's cap
            params = {**job.params, "max_tokens": max_tokens}
            if "min_tokens" in params:
                params["min_tokens"] = min(int(params["min_tokens"]), max_tokens)
            job = dataclasses.replace(job, params=params)
        return job, self.prompts.fit(job.model, job.messages, max_tokens)

    async def generate(self, job: ReplyJob, messages: list[dict[str, str]], msg: Msg, received: float) -> Generation:
        subject = token_subject(job.conversation_id)
        reply_id = str(job.reply_id)
        stop = self.generating[reply_id] = asyncio.Event()
        if self.cancelled.pop(reply_id, None) is not None:
            stop.set()  # stopped before it started
        heartbeat = asyncio.create_task(self.keep_alive(msg))
        parts = self.progress[reply_id] = []
        counts: dict[str, Any] = {"prompt_tokens": 0, "completion_tokens": 0, "model_version": ""}
        offset = 0
        started = time.perf_counter()
        ttft = 0.0

        def outcome(finish_reason: str, model_version: str) -> Generation:
            return Generation(
                text="".join(parts), finish_reason=finish_reason,
                prompt_tokens=counts["prompt_tokens"], completion_tokens=counts["completion_tokens"],
                ttft_ms=ttft, duration_ms=(time.perf_counter() - started) * 1000, model_version=model_version,
                prep_ms=(started - received) * 1000,
            )

        try:
            if stop.is_set():
                return outcome("cancelled", job.model.partition("/")[2])
            model = await serving_model(self.app, self.tritons.first, job.model, reply_id)  # the rollout picks
            # Its KV cache's home first (routing.py). While no instance can be reached (one is
            # restarting), wait here for up to TRITON_WAIT_S, the message kept in progress,
            # rather than spend the request's deliveries on a server that is coming back.
            deadline, pause = time.monotonic() + TRITON_WAIT_S, 0.25
            while True:
                unreachable_error: Exception | None = None
                for instance in self.tritons.order(job.conversation_id):
                    stream = stream_reply(self.tritons.clients[instance], model, reply_id, messages, job.params, counts)
                    try:
                        async with aclosing(stream):
                            async for delta, final in stream:
                                if final is not None:
                                    add_event("last token")
                                    self.tritons.mark_up(instance)
                                    return outcome(final["finish_reason"], final["model_version"])
                                if not parts:
                                    ttft = (time.perf_counter() - started) * 1000
                                    add_event("first token")
                                parts.append(delta)
                                await self.nc.publish(subject, token_encoder.encode(TokenDelta(reply_id, offset, delta)))
                                offset += len(delta)
                                if stop.is_set():
                                    break  # closing the stream cancels the Triton request
                    except Exception as e:  # noqa: BLE001 - only an unreachable instance is tried elsewhere
                        if parts or not unreachable(e):
                            raise
                        log.warning("reply %s: Triton at %s unreachable (%s)", reply_id, self.tritons.urls[instance], e)
                        await self.tritons.mark_down(instance)
                        unreachable_error = e
                        continue
                    break
                if unreachable_error is None or stop.is_set():
                    break
                if time.monotonic() + pause > deadline:
                    raise unreachable_error
                await asyncio.sleep(pause)
                pause = min(2 * pause, 2.0)
            if stop.is_set():
                return outcome("cancelled", counts["model_version"])
        finally:
            heartbeat.cancel()
            self.generating.pop(reply_id, None)
        raise GenerationError("no final response")

    async def write_title(self, job: ReplyJob) -> None:
        """Ask the model for the conversation's title after its first reply (from the message
        it answered) and record it if it looks like one; the title made by rule stays
        otherwise (workers/titles.py)."""
        asked = next((m["content"] for m in reversed(job.messages) if m["role"] == "user"), "")
        instance = self.tritons.order(job.conversation_id)[0]  # where the exchange is cached
        stream = stream_reply(self.tritons.clients[instance], job.model, f"title-{job.reply_id}",
                              title_request(asked),
                              {"max_tokens": TITLE_TOKENS, "temperature": 0.0, "background": True})
        parts, final = [], None
        try:
            async with asyncio.timeout(TITLE_TIMEOUT_S), aclosing(stream):
                async for delta, end in stream:
                    parts.append(delta)
                    final = end or final
            title = clean_title("".join(parts), final["finish_reason"] if final else "", asked)
            if title is None:
                log.info("conversation %s keeps its title: the model wrote %r", job.conversation_id, "".join(parts))
                return
            model = f"{job.model.partition('/')[0]}/{final['model_version'] if final else ''}"
            if await asyncio.to_thread(self.app.write_title, job.conversation_id, title, model):
                await self.nc.publish(token_subject(job.conversation_id),
                                      token_encoder.encode(TitleWritten(str(job.reply_id), title)))
        except Exception as e:  # noqa: BLE001 - a title is a nicety: the rule's stays
            log.info("conversation %s keeps its title: %s: %s", job.conversation_id, type(e).__name__, e)

    async def keep_alive(self, msg: Msg) -> None:
        """Tell JetStream we are still working, so it does not redeliver mid-generation."""
        while True:
            await asyncio.sleep(max(0.5, self.settings.ack_wait_s / 3))
            await msg.in_progress()

    async def announce(self, job: ReplyJob, generation: Generation | None = None) -> None:
        subject = token_subject(job.conversation_id)
        if generation is not None:
            done: Any = ReplyDone(str(job.reply_id), generation.text, generation.finish_reason)
        elif job.status == "complete":
            done = ReplyDone(str(job.reply_id), job.outcome.get("text", ""), job.outcome.get("finish_reason", "stop"))
        else:
            done = ReplyError(str(job.reply_id), job.outcome.get("error", "the reply failed"))
        await self.nc.publish(subject, token_encoder.encode(done))

    async def give_up_or_retry(
        self, msg: Msg, conversation_id: UUID, reply_id: UUID, error: str, retry: bool = True
    ) -> None:
        delivered = msg.metadata.num_delivered if msg.metadata else MAX_DELIVER
        if retry and delivered < MAX_DELIVER:
            log.warning("reply %s: %s (attempt %d, retrying)", reply_id, error, delivered)
            # 1, 2, 4, 8 s: what fails a whole attempt is a crash or a restart nearby (PostgreSQL,
            # NATS; an unreachable Triton is waited for in `generate`), and its user is waiting
            await msg.nak(delay=min(8, 2 ** (delivered - 1)))
            return
        log.error("reply %s: %s (attempt %d, giving up)", reply_id, error, delivered)
        with span("record reply"):
            failed = await asyncio.to_thread(self.app.fail_reply, conversation_id, reply_id, error)
        if failed:
            REPLIES.labels(finish_reason="error").inc()  # its one outcome (not a re-announced one)
        job = await asyncio.to_thread(self.app.reply_job, conversation_id, reply_id)
        await self.announce(job)
        await msg.ack()


async def main(settings: Settings) -> None:
    setup_logging("worker", settings.log_format)
    setup_tracing("worker")
    serve(settings.metrics_port, settings.metrics_host)
    stop = stop_on_signals()
    app = chat_application(settings)
    nc = await nats.connect(settings.nats_servers, max_reconnect_attempts=-1)
    js = nc.jetstream()
    tritons = TritonRouter(settings.triton_urls, triton_aio.InferenceServerClient)
    worker = Worker(settings, app, nc, tritons)
    sub = await js.pull_subscribe(
        # CHATBOT_CONSUME_PARTITIONS: a consumer of its own over those partitions only
        event_filter("Conversation.ReplyRequested"), durable=consumer_name(DURABLE, settings.consume_partitions),
        stream=settings.stream_name,
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=settings.ack_wait_s, max_deliver=JETSTREAM_MAX_DELIVER, max_ack_pending=10_000,
            filter_subjects=consumer_filters("Conversation.ReplyRequested", settings.consume_partitions),
        ),
    )
    await nc.subscribe(f"{CANCEL_SUBJECT_PREFIX}.*", cb=worker.on_cancel)
    await nc.subscribe(f"{PROGRESS_SUBJECT_PREFIX}.*", cb=worker.on_progress)
    # the retention sweep (workers/retention.py): one worker at a time records due expiries
    readmodels = read_model_recorder(settings.eventsourcing_env(), keys=app.keys)
    sweeper = asyncio.create_task(retention.run(settings, app, readmodels, stop))
    tasks: set[asyncio.Task[None]] = set()
    log.info("consuming reply requests (up to %d at once)", CONCURRENCY)
    while not stop.is_set():
        free = CONCURRENCY - len(tasks)
        if free == 0:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            continue
        try:
            # returns at once with what is waiting (up to `free`), else the first to arrive
            messages = await sub.fetch(free, timeout=1.0)
        except TimeoutError:  # nats-py raises its own subclass or the builtin, depending on where it timed out
            continue
        except nats.errors.Error as e:  # a NATS node or the consumer's leader is changing: ask again
            log.warning("fetching requests: %s; retrying", e)
            await asyncio.sleep(1.0)
            continue
        for msg in messages:
            task = asyncio.create_task(worker.handle(msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    # Let generations in flight finish: their outcomes get recorded and acked.
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    await sub.unsubscribe()
    try:  # a sweep under way finishes its conversation at most; don't outstay the stop grace period
        await asyncio.wait_for(sweeper, 5)
    except TimeoutError:
        log.warning("the retention sweep did not finish in 5 s: stopping without it")
    await nc.drain()
    await tritons.close()
    readmodels.datastore.close()
    app.close()
    shutdown_tracing()


def run() -> None:
    asyncio.run(main(load_settings()))
