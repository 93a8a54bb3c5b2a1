"""How a request's failure becomes a gRPC status: the one table for every protocol."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from gradserve.server.core import errors

_CODES: dict[type[BaseException], grpc.StatusCode] = {
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.RequestTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UnknownModel: grpc.StatusCode.NOT_FOUND,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.EngineFailed: grpc.StatusCode.INTERNAL,
    errors.EngineUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Closed: grpc.StatusCode.UNAVAILABLE,
    errors.LoadFailed: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ControlRefused: grpc.StatusCode.FAILED_PRECONDITION,
    asyncio.CancelledError: grpc.StatusCode.CANCELLED,
}


@dataclass(frozen=True)
class Failure:
    """A request's outcome as a gRPC status code and message."""

    code: grpc.StatusCode
    message: str

    @classmethod
    def of(cls, exc: BaseException) -> Failure:
        for kind in type(exc).__mro__:
            code = _CODES.get(kind)
            if code is not None:
                return cls(code, str(exc) or "the request was cancelled")
        return cls(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def refusing(handler: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]):
    """A servicer's handler whose RequestError (an unknown model, a refused load, a server
    still loading) ends the call with its status from the table; the one way every gRPC
    control call fails."""

    @functools.wraps(handler)
    async def handle(servicer: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(servicer, request, context)
        except errors.RequestError as exc:
            await abort(context, exc)

    return handle


async def abort(context: grpc.aio.ServicerContext, exc: BaseException) -> NoReturn:
    """End the call with the status `exc` maps to."""
    failure = Failure.of(exc)
    await context.abort(failure.code, failure.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover
