"""Waiting for a server that is starting: the standard health service, polled until SERVING.

A gradserve server listens before its models are loaded and warmed up; until then its health
service answers NOT_SERVING for the overall server ("") and model calls answer UNAVAILABLE
("still loading"). `ReadinessWait` holds the state of one wait (deadline, pause between
checks, last answer seen) so that the blocking and the asyncio client share one rule and
differ only in how they sleep and call.

The health messages come from `grpcio-health-checking`, a small pure-Python package of the
gRPC project that the SDK depends on; it imports neither TensorFlow nor the server.
"""

from __future__ import annotations

import time

import grpc
from grpc_health.v1 import health_pb2

from gradserve.client.errors import GradserveError

SERVING = health_pb2.HealthCheckResponse.SERVING
OVERALL = health_pb2.HealthCheckRequest(service="")
FIRST_PAUSE_S = 0.05
LONGEST_PAUSE_S = 0.5
LONGEST_CHECK_S = 10.0
# The server is there but will never report health: waiting longer cannot help.
FATAL = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAUTHENTICATED})


class ReadinessWait:
    """One wait for SERVING, up to `timeout` seconds (None: no limit)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.pause = FIRST_PAUSE_S
        self.last = "no answer yet"

    def check_timeout(self) -> float:
        """Deadline of the next Check call: what is left, at most LONGEST_CHECK_S."""
        if self.deadline is None:
            return LONGEST_CHECK_S
        return min(max(self.deadline - time.monotonic(), 0.001), LONGEST_CHECK_S)

    def answered(self, response: health_pb2.HealthCheckResponse) -> bool:
        """Record a Check answer; True when the server is SERVING."""
        self.last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return response.status == SERVING

    def failed(self, error: grpc.RpcError) -> None:
        """Record a failed Check; raise at once if waiting cannot help."""
        if error.code() in FATAL:
            raise GradserveError.from_rpc(error) from None
        self.last = f"{error.code().name}: {error.details() or ''}".rstrip(": ")

    def next_pause(self) -> float:
        """Seconds to sleep before the next Check; raises DEADLINE_EXCEEDED when time is up."""
        left = None if self.deadline is None else self.deadline - time.monotonic()
        if left is not None and left <= 0:
            raise GradserveError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"server not ready within {self.timeout:g} s (last health answer: {self.last})",
            )
        pause = self.pause if left is None else min(self.pause, left)
        self.pause = min(self.pause * 2, LONGEST_PAUSE_S)
        return pause
