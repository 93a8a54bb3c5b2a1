"""What the batcher measures its work against: bytes held in memory, and engine time.

`MemoryBudget` counts the bytes every admitted, unfinished request holds (its message,
rows, vectors and the result it will produce) against one limit; every batcher of a server
shares one, so the bound is the server's, whatever the model. `CostModel` learns how long
an engine call of n rows of one kind takes from the calls it has seen, so that a batch can
be capped to fit a latency budget.

No gRPC, no TensorFlow: plain numbers. The frontends of a multi-process server share one
budget: its count lives in shared memory (multiproc/shared_count.py), checked and changed
under its lock, so that --max-queue-mb bounds the server, not each frontend's share of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gradserve.server.core.errors import QueueFull, RequestTooLarge
from gradserve.wire.limits import MIB


def size_text(nbytes: float) -> str:
    """A byte count for people: 512 B, 3.5 KiB, 240.0 MiB."""
    for unit, scale in (("MiB", MIB), ("KiB", 1024)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


class Count(Protocol):
    """Where a budget's held bytes are counted: `add` and `total`, a check and its change
    made together under `get_lock()`."""

    def get_lock(self) -> contextlib.AbstractContextManager: ...

    def add(self, nbytes: int) -> None: ...

    def total(self) -> int: ...

    def own(self) -> int:
        """This process's part of the total (what its metrics report, summed over processes)."""


class _Local:
    """A count of one process: no lock needed on its one event loop."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def get_lock(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def add(self, nbytes: int) -> None:
        self.value += nbytes

    def total(self) -> int:
        return self.value

    def own(self) -> int:
        return self.value


_SHARED_POLL_S = 0.05  # how often `room` looks again when other processes free bytes


class MemoryBudget:
    """Bytes held by admitted requests, against a limit shared by every batcher of a server
    (and, given a shared `count`, by every frontend process of it).

    The last `kept_bytes` of the limit are kept for reservations of at most `small_bytes`,
    so that large requests filling the budget cannot shut out small ones (a 1-row call
    behind a flood of 15 MB requests is still admitted)."""

    def __init__(
        self,
        limit_bytes: int,
        kept_bytes: int = 0,
        small_bytes: int = 0,
        count: Count | None = None,
    ) -> None:
        if limit_bytes < 1 or not 0 <= kept_bytes < limit_bytes or small_bytes < 0:
            raise ValueError("a memory budget needs at least one byte, and more than it keeps")
        self.limit = limit_bytes
        self.kept = kept_bytes
        self.small = small_bytes
        self._count: Count = _Local() if count is None else count
        self._shared = count is not None
        self._freed = asyncio.Event()

    @classmethod
    def for_server(cls, limit_bytes: int, count: Count | None = None) -> MemoryBudget:
        """The server's budget: its last sixteenth kept for reservations of at most a 64th of
        it (at 256 MiB: 16 MiB kept for reservations of up to 4 MiB; at 8 MiB, 128 KiB: a
        1-row 64x64x3 call and its answer, 96 KiB, still fit)."""
        return cls(limit_bytes, limit_bytes // 16, limit_bytes // 64, count)

    @property
    def held(self) -> int:
        """Bytes held now, by every process sharing the count."""
        return self._count.total()

    @property
    def held_here(self) -> int:
        """Bytes held now by this process's requests."""
        return self._count.own()

    @property
    def large_limit(self) -> int:
        """What reservations larger than `small` may fill: the limit but the kept share."""
        return self.limit - self.kept

    def reserve(self, nbytes: int) -> None:
        """Count `nbytes` more as held, or raise (holding nothing): RequestTooLarge when they
        could never fit, QueueFull when they do not fit now."""
        if nbytes > self.limit:
            raise RequestTooLarge(
                f"request needs {size_text(nbytes)} (its message, rows and result); at most "
                f"{size_text(self.limit)} may be queued at once; send fewer rows per request"
            )
        with self._count.get_lock():
            if not self.fits(nbytes):
                raise QueueFull(
                    f"queue full: {size_text(self.held)} of {size_text(self.limit)} are held by "
                    f"queued and running requests and this request needs {size_text(nbytes)}; "
                    "retry later"
                )
            self._count.add(nbytes)

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit now (large reservations leave the small ones' share)."""
        ceiling = self.limit if nbytes <= self.small else self.large_limit
        return self.held + nbytes <= ceiling

    def hold(self, nbytes: int) -> None:
        """Count `nbytes` more as held whatever the limit: bytes that exist already (an
        answer computed for an admitted request) and must be counted, not refused."""
        with self._count.get_lock():
            self._count.add(nbytes)

    def release(self, nbytes: int) -> None:
        """A request finished (answered, failed or cancelled): its bytes are free again."""
        with self._count.get_lock():
            self._count.add(-nbytes)
        if nbytes:
            self._freed.set()

    async def room(self, nbytes: int) -> None:
        """Wait until `nbytes` more would fit (at once when they never could: admission then
        refuses them with the reason). Bytes another process frees are seen within
        _SHARED_POLL_S."""
        while nbytes <= self.limit and not self.fits(nbytes):
            self._freed.clear()
            if not self._shared:
                await self._freed.wait()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._freed.wait(), _SHARED_POLL_S)


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """Expected engine seconds of a call of n rows: fixed_s + per_row_s * n."""

    fixed_s: float
    per_row_s: float
    calls: int  # engine calls measured so far

    def seconds(self, rows: int) -> float:
        return self.fixed_s + self.per_row_s * rows


class CostModel:
    """An engine's cost per call of one kind, fitted as fixed + per-row seconds to the calls
    measured, each older call weighing `decay` times less than the next (so the fit follows
    a machine whose speed changes, e.g. when it is shared).

    With calls of one size only, the whole cost is put on the rows (fixed = 0): that
    overestimates larger batches, so a cap learned from it errs on the short side and then
    grows as larger batches are measured.
    """

    def __init__(self, decay: float = 0.8) -> None:
        if not 0 < decay < 1:
            raise ValueError("decay must be between 0 and 1")
        self._decay = decay
        self._w = self._n = self._nn = self._t = self._nt = 0.0
        self.calls = 0

    def observe(self, rows: int, seconds: float) -> None:
        """One engine call of `rows` rows (as computed: padded, where the engine pads) took
        `seconds`."""
        d = self._decay
        self._w = d * self._w + 1
        self._n = d * self._n + rows
        self._nn = d * self._nn + rows * rows
        self._t = d * self._t + seconds
        self._nt = d * self._nt + rows * seconds
        self.calls += 1

    def estimate(self) -> CostEstimate | None:
        """The current fit, or None before any call was measured."""
        if not self.calls:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        variance = self._nn / self._w - mean_n * mean_n
        per_row = mean_t / mean_n
        fixed = 0.0
        if variance > (0.05 * mean_n) ** 2:  # sizes differ enough to tell the two terms apart
            slope = (self._nt / self._w - mean_n * mean_t) / variance
            if slope > 0:
                per_row, fixed = slope, max(0.0, mean_t - slope * mean_n)
        return CostEstimate(fixed, per_row, self.calls)

    def rows_within(self, budget_s: float, max_rows: int, sizes: Sequence[int] = ()) -> int:
        """The most rows (at most `max_rows`; one of `sizes` when the engine pads to them)
        whose expected cost fits `budget_s`; at least one row, and `max_rows` while nothing
        is known yet."""
        estimate = self.estimate()
        if estimate is None or estimate.per_row_s <= 0:
            return max_rows
        if sizes:
            within = budget_s * (1 + 1e-9)  # not lost to rounding when a size fits exactly
            fitting = [s for s in sizes if s <= max_rows and estimate.seconds(s) <= within]
            return max(fitting, default=1)
        rows = int((budget_s - estimate.fixed_s) / estimate.per_row_s + 1e-6)
        return max(1, min(max_rows, rows))
