"""Answering model requests, the same way for every protocol: unary calls and pipelined
bidirectional streams.

A protocol supplies a `Codec`: decode a request into a Ticket, encode a result (or a
failure, on a stream) into its response. This module does the rest, once: hand the ticket's
rows to its model's batcher, await the result, add the latency breakdown, count each
stream message in the metrics by its status, and end streams on a drain.

Streams are read ahead (up to `window.messages` messages and `window.bytes` bytes) while
earlier messages wait in the batcher or compute, so one stream keeps the engine busy;
responses are written in request order. A message that fails becomes its own error
response; the stream goes on.

Every request is submitted with the key of its caller (the `x-gradserve-client` metadata
value when the call carries one, else its connection), so the batcher can share batches
fairly between callers, and with the priority its protocol asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import grpc

from gradserve.server.core.batcher import RequestResult
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.errors import Closed, Undecodable
from gradserve.server.core.explain import Reduced
from gradserve.server.metrics import Metrics
from gradserve.server.serving.dataplane import Call, DataPlane
from gradserve.server.serving.tickets import Arrival, Ticket
from gradserve.server.tracing import Tracing
from gradserve.server.transport.intake import caller_of, deadline_of
from gradserve.server.transport.status import Failure, abort
from gradserve.wire.limits import MIB
from gradserve.wire.timing import Hops

Request = TypeVar("Request")
Response = TypeVar("Response")
StreamResponse = TypeVar("StreamResponse")

_DRAINING = Closed(
    "the server is shutting down: every message answered before this status was read and "
    "computed; send the rest again (to another replica)"
)


class Codec(Protocol[Request, Response, StreamResponse]):
    """One protocol's message conversions (the servicer implements it)."""

    def arrival(self, request: Request) -> Arrival:
        """What the request says of itself (id, model name), before anything is checked."""

    def decode(self, request: Request, arrival: Arrival) -> Ticket:
        """The request's complete ticket (model, validated rows to queue, priority,
        encoding), or raise a RequestError saying what is wrong."""

    def encode(self, ticket: Ticket, result: RequestResult | Reduced) -> Response:
        """The answer to a unary call, without its timing."""

    def add_timing(self, response: Response, hops: Hops) -> None:
        """Write the latency breakdown into an encoded answer."""

    def encode_stream(self, arrival: Arrival, outcome: Response | Failure) -> StreamResponse:
        """One stream answer: an encoded answer (with its timing) or a failure."""


@dataclass(frozen=True)
class StreamWindow:
    """How far one stream may read ahead of its answers: messages, and bytes they hold."""

    messages: int = 256
    bytes: int = 64 * MIB


class _ReadAhead:
    """Bytes one stream's read, unanswered messages hold; reading waits while over the limit
    (one message is always allowed, whatever its size), and while the server's memory budget
    has no room for another message as large as the last (streams slow down, not fail)."""

    def __init__(self, limit: int, memory: MemoryBudget) -> None:
        self.limit = limit
        self.held = 0
        self.last = 0
        self._memory = memory
        self._freed = asyncio.Event()

    async def room(self) -> None:
        while self.held >= self.limit:
            self._freed.clear()
            await self._freed.wait()
        await self._memory.room(self.last)

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        self.last = nbytes

    def remove(self, nbytes: int) -> None:
        self.held -= nbytes
        self._freed.set()


@dataclass(frozen=True, slots=True)
class _InFlight:
    """A stream message read and not yet answered: its ticket and the future of its result,
    or (ticket None) why it failed at once; and the bytes its rows hold."""

    arrival: Arrival
    ticket: Ticket | None
    outcome: asyncio.Future[RequestResult | Reduced] | Failure
    nbytes: int
    call: Call  # its caller, deadline and span


class Streams:
    """The readers of every open stream, so that a drain can stop them all at once."""

    def __init__(self) -> None:
        self._readers: set[asyncio.Task] = set()
        self.draining = False

    def add(self, reader: asyncio.Task) -> None:
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)

    def drain(self) -> None:
        """Stop reading every stream; each still answers what it already read, then ends."""
        self.draining = True
        for reader in list(self._readers):
            reader.cancel()


class Answerer(Generic[Request, Response, StreamResponse]):
    """Answers one protocol's model RPCs through its codec."""

    def __init__(
        self,
        codec: Codec[Request, Response, StreamResponse],
        metrics: Metrics,
        streams: Streams,
        *,
        service: str,
        unary_rpc: str,
        stream_rpc: str,
        window: StreamWindow,
        memory: MemoryBudget,
        plane: DataPlane,
    ) -> None:
        """`service`, `unary_rpc` and `stream_rpc` name the protocol's service and its two
        model calls (in spans); `plane`: the server's data plane."""
        self._codec = codec
        self._plane = plane
        self._unary_rpc = (service, unary_rpc)
        self._stream_rpc_names = (service, stream_rpc)
        self._memory = memory
        self._metrics = metrics
        self._streams = streams
        self._window = window
        self._stream_rpc = stream_rpc
        self._stream_requests: dict[grpc.StatusCode, object] = {}  # bound per code on first use
        self._stream_latency = metrics.latency.labels(stream_rpc)

    def _arrival(self, request: Request | Undecodable) -> Arrival:
        return Arrival() if isinstance(request, Undecodable) else self._codec.arrival(request)

    def _start(
        self, request: Request | Undecodable, arrival: Arrival, call: Call
    ) -> tuple[Ticket, asyncio.Future[RequestResult | Reduced]]:
        """Decode and queue one request; raises a RequestError if it cannot be queued. (The
        message itself is counted by whoever read it: a unary call's lease, a stream's
        read-ahead.)"""
        if isinstance(request, Undecodable):
            raise request.error
        ticket = self._codec.decode(request, arrival)
        return ticket, self._plane.start(ticket, call)

    def _finish(self, ticket: Ticket, result: RequestResult | Reduced, call: Call) -> Response:
        response = self._codec.encode(ticket, result)
        self._codec.add_timing(response, self._plane.answered(ticket, result, call))
        return response

    def _call(
        self, context: grpc.aio.ServicerContext, rpc: tuple[str, str], arrival: Arrival
    ) -> Call:
        """What the transport knows of a call: its caller, deadline and span."""
        caller = caller_of(context)
        if not self._plane.traces:
            return Call(caller, deadline_of(context))
        span = self._plane.span("/".join(rpc), context.invocation_metadata(), arrival.at, rpc,
                                caller, {"gradserve.request_id": arrival.id})  # fmt: skip
        return Call(caller, deadline_of(context), span)

    def _message_call(self, stream: Call, arrival: Arrival) -> Call:
        """One message of a stream: the stream's caller and deadline, and a span of its own
        under the stream's when the stream is traced."""
        if stream.span is None:
            return stream
        rpc = self._stream_rpc_names
        span = self._plane.span(f"{'/'.join(rpc)} message", None, arrival.at, rpc,
                                stream.caller, {"gradserve.request_id": arrival.id},
                                stream.span)  # fmt: skip
        return Call(stream.caller, stream.deadline, span)

    def _count_stream_message(self, code: grpc.StatusCode) -> None:
        counter = self._stream_requests.get(code)
        if counter is None:
            counter = self._metrics.requests.labels(self._stream_rpc, code.name)
            self._stream_requests[code] = counter
        counter.inc()

    async def unary(self, request: Request, context: grpc.aio.ServicerContext) -> Response:
        """One unary call: decode and queue, wait, answer; a failure becomes its status."""
        arrival = self._arrival(request)
        ticket = call = None
        try:
            call = self._call(context, self._unary_rpc, arrival)
            ticket, future = self._start(request, arrival, call)
            result = await future
        except (Exception, asyncio.CancelledError) as exc:
            failure = Failure.of(exc)
            span = None if call is None else call.span
            self._plane.failed(ticket, arrival.at, span, failure.code.name, failure.message)
            if isinstance(exc, asyncio.CancelledError):
                raise
            await abort(context, exc)
        return self._finish(ticket, result, call)

    async def stream(
        self, requests: AsyncIterator[Request], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamResponse]:
        """A pipelined stream with the call's deadline; a drain ends it with UNAVAILABLE
        after the answers to every message already read."""
        if self._streams.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(_DRAINING))
        whole = self._call(context, self._stream_rpc_names, Arrival())
        inflight: asyncio.Queue[_InFlight | None] = asyncio.Queue(self._window.messages)
        ahead = _ReadAhead(self._window.bytes, self._memory)

        async def read() -> None:
            try:
                messages = aiter(requests)
                while True:
                    await ahead.room()
                    try:
                        request = await anext(messages)
                    except StopAsyncIteration:
                        return
                    arrival = self._arrival(request)
                    call = self._message_call(whole, arrival)
                    try:
                        ticket, future = self._start(request, arrival, call)
                        item = _InFlight(arrival, ticket, future, ticket.nbytes, call)
                    except Exception as exc:
                        item = _InFlight(arrival, None, Failure.of(exc), 0, call)
                    ahead.add(item.nbytes)
                    del request  # the decoded rows are all a queued message still needs
                    await inflight.put(item)
            finally:
                await inflight.put(None)

        reader = asyncio.create_task(read())
        self._streams.add(reader)
        self._metrics.streams.inc()
        messages = 0
        try:
            while (item := await inflight.get()) is not None:
                outcome = item.outcome
                if isinstance(outcome, asyncio.Future):
                    try:
                        outcome = self._finish(item.ticket, await outcome, item.call)
                    except Exception as exc:
                        outcome = Failure.of(exc)
                        self._plane.failed(item.ticket, item.arrival.at, item.call.span,
                                           outcome.code.name, outcome.message)  # fmt: skip
                elif item.call.span is not None:
                    self._plane.failed(None, item.arrival.at, item.call.span, outcome.code.name,
                                       outcome.message)  # fmt: skip
                messages += 1
                code = outcome.code if isinstance(outcome, Failure) else grpc.StatusCode.OK
                self._count_stream_message(code)
                self._stream_latency.observe(time.perf_counter() - item.arrival.at)
                answer = self._codec.encode_stream(item.arrival, outcome)
                ahead.remove(item.nbytes)
                yield answer
            if reader.cancelled() and self._streams.draining:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(_DRAINING))
            await reader
        finally:
            if whole.span is not None:
                Tracing.ended(whole.span, {"gradserve.stream.messages": messages})
            self._metrics.streams.dec()
            reader.cancel()
            while not inflight.empty():
                item = inflight.get_nowait()
                if item is not None and isinstance(item.outcome, asyncio.Future):
                    item.outcome.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
