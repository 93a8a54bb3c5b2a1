"""The exception every SDK call raises for a server-side failure."""

from __future__ import annotations

import grpc


class GradserveError(Exception):
    """A request failed: `code` is the grpc.StatusCode, `message` the server's explanation."""

    def __init__(
        self, code: grpc.StatusCode, message: str, request_id: str = "", attempts: int = 1
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.attempts = attempts

    @classmethod
    def from_rpc(cls, error: grpc.RpcError, attempts: int = 1) -> GradserveError:
        return cls(error.code(), error.details() or "", attempts=attempts)
