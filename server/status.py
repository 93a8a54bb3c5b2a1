"""How a request's failure becomes a gRPC status: one mapping for every protocol."""

from __future__ import annotations

import asyncio

import grpc

from gradserve.server import batcher as b
from gradserve.server.decode import InvalidInput

_STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    b.RequestTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    b.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    b.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    b.EngineFailed: grpc.StatusCode.INTERNAL,
    b.Closed: grpc.StatusCode.UNAVAILABLE,
}


class RequestFailed(Exception):
    """A request's outcome as a gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def of(cls, exc: BaseException) -> RequestFailed:
        if isinstance(exc, RequestFailed):
            return exc
        for kind, code in _STATUS.items():
            if isinstance(exc, kind):
                return cls(code, str(exc))
        if isinstance(exc, asyncio.CancelledError):
            return cls(grpc.StatusCode.CANCELLED, "the request was cancelled")
        return cls(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining
