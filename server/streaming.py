"""Pipelined bidirectional streams, shared by every protocol's servicer.

The stream is read ahead (up to `window` messages) while earlier messages wait in the
batcher or compute, so one stream keeps the engine busy; responses are written in request
order. A message that fails becomes its own error response; the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

import grpc

from gradserve.server.batcher import Result
from gradserve.server.status import RequestFailed, deadline_of

Request = TypeVar("Request")
Response = TypeVar("Response")


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


def _draining() -> RequestFailed:
    return RequestFailed(
        grpc.StatusCode.UNAVAILABLE,
        "the server is shutting down: every message answered before this status was read and "
        "computed; send the rest again (to another replica)",
    )


async def pipelined(
    requests: AsyncIterator[Request],
    start: Callable[[Request], asyncio.Future[Result]],
    respond: Callable[[Request, Result | RequestFailed], Response],
    window: int,
    streams: Streams,
) -> AsyncIterator[Response]:
    """`start` validates and queues one message (raising RequestFailed if it cannot);
    `respond` turns its result or failure into the response message. Raises RequestFailed
    (UNAVAILABLE) after the last answer when a drain stopped the stream."""
    if streams.draining:
        raise _draining()
    inflight: asyncio.Queue[tuple[Request, asyncio.Future[Result] | RequestFailed] | None]
    inflight = asyncio.Queue(window)

    async def read() -> None:
        try:
            async for request in requests:
                try:
                    outcome: asyncio.Future[Result] | RequestFailed = start(request)
                except RequestFailed as failure:
                    outcome = failure
                await inflight.put((request, outcome))
        finally:
            await inflight.put(None)

    reader = asyncio.create_task(read())
    streams.add(reader)
    try:
        while (item := await inflight.get()) is not None:
            request, outcome = item
            if isinstance(outcome, asyncio.Future):
                try:
                    outcome = await outcome
                except Exception as exc:
                    outcome = RequestFailed.of(exc)
            yield respond(request, outcome)
        if reader.cancelled() and streams.draining:
            raise _draining()
        await reader
    finally:
        reader.cancel()
        while not inflight.empty():
            item = inflight.get_nowait()
            if item is not None and isinstance(item[1], asyncio.Future):
                item[1].cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader


Submit = Callable[[Request, float | None], asyncio.Future[Result]]


async def answer_unary(
    request: Request,
    context: grpc.aio.ServicerContext,
    submit: Submit,
    respond: Callable[[Request, Result], Response],
) -> Response:
    """One unary call: validate and queue, wait, answer; a failure becomes the call's status."""
    try:
        result = await submit(request, deadline_of(context))
    except Exception as exc:
        failure = RequestFailed.of(exc)
        await context.abort(failure.code, failure.message)
    return respond(request, result)


async def answer_stream(
    requests: AsyncIterator[Request],
    context: grpc.aio.ServicerContext,
    submit: Submit,
    respond: Callable[[Request, Result | RequestFailed], Response],
    window: int,
    streams: Streams,
) -> AsyncIterator[Response]:
    """A pipelined stream with the call's deadline; a drain ends it with its status."""
    deadline = deadline_of(context)
    responses = pipelined(requests, lambda r: submit(r, deadline), respond, window, streams)
    try:
        async with contextlib.aclosing(responses):
            async for response in responses:
                yield response
    except RequestFailed as failure:
        await context.abort(failure.code, failure.message)
