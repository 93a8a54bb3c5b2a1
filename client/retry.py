"""Retrying idempotent calls: jittered exponential backoff within the caller's deadline.

Only statuses that say "try again" are retried (UNAVAILABLE: server draining or a replica
gone; RESOURCE_EXHAUSTED: queue full; CANCELLED when the caller did not cancel: grpc's
transport cancels a few innocent calls when many others on the same connection are
cancelled at once). INVALID_ARGUMENT and the rest never are: the same request would fail
the same way.

With `wait_for_ready`, UNAVAILABLE (a server still loading its models, or not reachable yet)
is retried until the deadline without using up the attempts, pausing at most
WARMING_PAUSE_S between tries so a server that becomes ready is used soon after.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED}
)


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` in all (1 = no retry); delays drawn from [0, min(max, initial * 2**i)]."""

    attempts: int = 10
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    codes: frozenset[grpc.StatusCode] = RETRYABLE

    def delay(self, retry: int) -> float:
        growth = 2 ** min(retry, 60)  # capped: a patient wait can retry many times
        return random.uniform(0.0, min(self.max_backoff, self.initial_backoff * growth))


NO_RETRY = RetryPolicy(attempts=1)
WARMING_PAUSE_S = 0.5


class Attempts:
    """Tracks one logical call's attempts against its overall deadline (None: no deadline)."""

    def __init__(
        self, policy: RetryPolicy, timeout: float | None, wait_for_ready: bool = False
    ) -> None:
        self.policy = policy
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.wait_for_ready = wait_for_ready
        self.made = 0
        self.counted = 0  # attempts that count against policy.attempts

    def remaining(self) -> float | None:
        """Seconds left for the next attempt (at least a millisecond), or None."""
        if self.deadline is None:
            return None
        return max(self.deadline - time.monotonic(), 0.001)

    def backoff(self, code: grpc.StatusCode) -> float | None:
        """After a failed attempt: seconds to wait before the next, or None to give up."""
        self.made += 1
        if code not in self.policy.codes:
            return None
        if self.wait_for_ready and code == grpc.StatusCode.UNAVAILABLE:
            delay = min(self.policy.delay(self.made - 1), WARMING_PAUSE_S)
        else:
            self.counted += 1
            if self.counted >= self.policy.attempts:
                return None
            delay = self.policy.delay(self.counted - 1)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay
