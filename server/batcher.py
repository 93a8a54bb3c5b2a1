"""Micro-batching: every caller's rows go into one queue, one worker runs them on the engine.

The worker forms a batch as soon as the engine is free, from whatever is queued
(no fixed wait at low load); while the engine computes, new rows accumulate for
the next batch, up to `max_batch_size` rows. Batches never mix derivative kinds.
A request larger than a batch is split across batches and reassembled. A request
that is cancelled, or whose deadline passes, before its rows are dispatched is
dropped and its rows freed. If the engine fails on a batch, the batch is bisected
so only the request that fails on its own gets the error.

This module knows nothing of gRPC or protobuf: `compute` is any function
(Derivative, x [n, ...]) -> Outputs, called as compute(kind, x, v) for the kinds that take
a vector v (row-aligned with x), run on one dedicated thread. Several batchers (one per
model) may share that thread by sharing an executor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gradserve.server.contract import ENGINE_KINDS, Derivative, Outputs
from gradserve.server.errors import (
    Closed,
    DeadlineExpired,
    EngineFailed,
    EngineUnavailable,
    QueueFull,
    RequestError,
    RequestTooLarge,
)

log = logging.getLogger(__name__)

Compute = Callable[..., Outputs]


@dataclass(frozen=True, slots=True)
class Timing:
    """A request's hops inside the batcher, which add up to its time there. A request split
    over several engine calls also waits between them; each hop is summed over its calls."""

    queue_us: int  # waiting to be dispatched (a split request: also between its batches)
    handoff_us: int  # batch dispatched -> engine started (concatenation, thread hand-off)
    compute_us: int  # inside the engine
    batch_rows: int  # the largest batch it was part of
    queued: float  # time.perf_counter() when it was admitted
    done: float  # time.perf_counter() when its last engine call ended


@dataclass(frozen=True, slots=True)
class Result:
    y: np.ndarray
    dy_dx: np.ndarray | None
    timing: Timing


class Observer:
    """What the batcher reports as it works (metrics implement it); the default ignores it."""

    def batch(self, kind: Derivative, rows: int, seconds: float) -> None:
        """One successful engine call of `rows` rows that took `seconds`."""

    def queued(self, seconds: float) -> None:
        """A request's first rows left the queue after waiting `seconds`."""


class _Pending:
    """One request in the queue; `next_row` marks how far it has been dispatched."""

    __slots__ = (
        "batch_rows",
        "compute_s",
        "deadline",
        "dy_dx",
        "enqueued",
        "future",
        "handoff_s",
        "kind",
        "last_end",
        "n",
        "next_row",
        "started",
        "v",
        "waited_s",
        "x",
        "y",
    )

    def __init__(self, x, v, kind, future, deadline, enqueued) -> None:
        self.x: np.ndarray = x
        self.v: np.ndarray | None = v
        self.n: int = x.shape[0]
        self.kind: Derivative = kind
        self.future: asyncio.Future[Result] = future
        self.deadline: float | None = deadline
        self.enqueued: float = enqueued
        self.next_row = 0
        self.started: float | None = None
        self.compute_s = 0.0
        self.handoff_s = 0.0
        self.waited_s = 0.0
        self.last_end = 0.0
        self.batch_rows = 0
        self.y: np.ndarray | None = None
        self.dy_dx: np.ndarray | None = None


@dataclass
class _Part:
    """Rows [start, stop) of one pending request, placed in a batch."""

    pending: _Pending
    start: int
    stop: int


class Batcher:
    """Queue + single worker in front of a compute function. Use as `async with`."""

    def __init__(
        self,
        compute: Compute,
        *,
        max_batch_size: int = 1024,
        max_delay_s: float = 0.0,
        max_queue_rows: int = 1 << 20,
        observer: Observer | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if max_batch_size < 1 or max_queue_rows < 1 or max_delay_s < 0:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1, max_delay_s >= 0")
        self._compute = compute
        self._observer = observer or Observer()
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_rows = max_queue_rows
        self._queues: dict[Derivative, deque[_Pending]] = {kind: deque() for kind in ENGINE_KINDS}
        self._queued_rows = 0
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._worker: asyncio.Task[None] | None = None
        self._owns_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(1, thread_name_prefix="gradserve-engine")
        self._in_flight: list[_Part] = []
        self.batches_run = 0
        self.pending = 0  # requests admitted and not yet finished (answered, failed, cancelled)
        self.restarts = 0

    @property
    def queued_rows(self) -> int:
        """Rows admitted but not yet handed to the engine."""
        return self._queued_rows

    async def __aenter__(self) -> Batcher:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._supervise(), name="batcher")

    def submit(
        self,
        x: np.ndarray,
        kind: Derivative,
        deadline: float | None = None,
        v: np.ndarray | None = None,
    ) -> asyncio.Future[Result]:
        """Queue rows x [n, ...] (and v, row-aligned, for kinds that take a vector); the
        future resolves to their Result.

        `deadline` is on the event loop's clock (loop.time()). Raises at once,
        queueing nothing, when the batcher is closing or the queue is full.
        Cancelling the future withdraws whatever rows are not yet dispatched.
        """
        if self._closing:
            raise Closed("the server is shutting down and accepts no new requests")
        n = x.shape[0]
        if n < 1:
            raise ValueError("a request needs at least one row")
        if n > self.max_queue_rows:
            raise RequestTooLarge(
                f"request has {n} rows; at most {self.max_queue_rows} rows fit in one request"
            )
        if self._queued_rows + n > self.max_queue_rows:
            raise QueueFull(
                f"queue full: {self._queued_rows} of {self.max_queue_rows} rows are waiting and "
                f"this request adds {n}; retry later"
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        pending = _Pending(x, v, kind, future, deadline, time.perf_counter())
        future.add_done_callback(lambda _f: self._finished(pending))
        self._queues[kind].append(pending)
        self._queued_rows += n
        self.pending += 1
        self._idle.clear()
        self._wakeup.set()
        return future

    async def evaluate(
        self,
        x: np.ndarray,
        kind: Derivative,
        deadline: float | None = None,
        v: np.ndarray | None = None,
    ) -> Result:
        return await self.submit(x, kind, deadline, v)

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (Closed); admitted ones still complete."""
        self._closing = True
        self._wakeup.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every admitted request has finished; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Refuse new requests, finish every admitted one, then stop the worker."""
        self.stop_accepting()
        if self._worker is not None:
            await self._worker
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    def _finished(self, pending: _Pending) -> None:
        self.pending -= 1
        self._withdraw(pending)
        if self.pending == 0:
            self._idle.set()

    def _withdraw(self, pending: _Pending) -> None:
        """Free the not-yet-dispatched rows of a finished (answered, failed, cancelled) request."""
        self._queued_rows -= pending.n - pending.next_row
        pending.next_row = pending.n

    async def _supervise(self) -> None:
        """Run the worker loop; if it ever fails, fail the batch it held and start it again,
        so no admitted request is left waiting on a dead worker."""
        while True:
            try:
                await self._run()
                return
            except asyncio.CancelledError:
                _fail(self._in_flight, Closed("the server stopped before this request finished"))
                raise
            except Exception as exc:
                self.restarts += 1
                log.exception("batch worker failed; restarting it")
                _fail(self._in_flight, EngineFailed(f"internal error in the batch worker: {exc}"))
                self._in_flight = []

    async def _run(self) -> None:
        while True:
            if self._queued_rows == 0:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self.max_delay_s > 0:
                await self._wait_for_fill()
            dispatched = time.perf_counter()
            parts = self._take_batch(dispatched)
            if not parts:
                await asyncio.sleep(0)  # let pending done-callbacks run before looking again
                continue
            await self._execute(parts, dispatched)
            self._in_flight = []

    async def _wait_for_fill(self) -> None:
        """Hold the batch until it is full or the oldest request has waited max_delay_s."""
        heads = [q[0].enqueued for q in self._queues.values() if q]
        until = min(heads, default=time.perf_counter()) + self.max_delay_s
        while self._queued_rows < self.max_batch_size and not self._closing:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    def _take_batch(self, taken: float) -> list[_Part]:
        """Up to max_batch_size rows of one kind, oldest request first, dispatched at `taken`
        (time.perf_counter())."""
        now = asyncio.get_running_loop().time()
        for queue in self._queues.values():
            while queue and self._drop_if_dead(queue[0], now):
                queue.popleft()
        live = [q for q in self._queues.values() if q]
        if not live:
            return []
        queue = min(live, key=lambda q: q[0].enqueued)
        parts: list[_Part] = []
        self._in_flight = parts  # so that a fault from here on fails these, not strands them
        room = self.max_batch_size
        while queue and room:
            pending = queue[0]
            if self._drop_if_dead(pending, now):
                queue.popleft()
                continue
            take = min(room, pending.n - pending.next_row)
            parts.append(_Part(pending, pending.next_row, pending.next_row + take))
            pending.next_row += take
            self._queued_rows -= take
            room -= take
            if pending.started is None:
                pending.started = taken
                pending.waited_s = taken - pending.enqueued
                self._observer.queued(pending.waited_s)
            else:  # the next part of a split request
                pending.waited_s += taken - pending.last_end
            if pending.next_row == pending.n:
                queue.popleft()
        return parts

    def _drop_if_dead(self, pending: _Pending, now: float) -> bool:
        """True (and its rows freed now, not in a later callback) for a finished request."""
        if _is_dead(pending, now):
            self._withdraw(pending)
            return True
        return False

    async def _execute(self, parts: list[_Part], dispatched: float) -> None:
        """Run one batch; on an engine error, bisect so only the failing request fails."""
        kind = parts[0].pending.kind
        x = _rows(parts, "x")
        args = (kind, x) if parts[0].pending.v is None else (kind, x, _rows(parts, "v"))
        loop = asyncio.get_running_loop()
        try:
            outputs, began, ended = await loop.run_in_executor(
                self._executor, _timed, self._compute, args
            )
        except EngineUnavailable as exc:  # nothing ran: no request is to blame
            _fail(parts, exc)
            return
        except Exception as exc:
            if len(parts) == 1:
                log.warning("engine failed on a request of %d rows: %s", x.shape[0], exc)
                error = EngineFailed(f"the engine failed on this request: {exc}")
                error.__cause__ = exc
                _fail(parts, error)
                return
            middle = len(parts) // 2
            await self._execute(parts[:middle], dispatched)
            await self._execute(parts[middle:], dispatched)
            return
        self.batches_run += 1
        self._observer.batch(kind, x.shape[0], ended - began)
        _deliver(parts, outputs, began - dispatched, ended - began, ended)


def _timed(compute: Compute, args: tuple) -> tuple[Outputs, float, float]:
    """Run on the engine thread: the outputs and when the call began and ended."""
    began = time.perf_counter()
    outputs = compute(*args)
    return outputs, began, time.perf_counter()


def _rows(parts: list[_Part], field: str) -> np.ndarray:
    """The batch's rows of `x` or `v`: a view for one part, a concatenation for several."""
    if len(parts) == 1:
        p = parts[0]
        return getattr(p.pending, field)[p.start : p.stop]
    return np.concatenate([getattr(p.pending, field)[p.start : p.stop] for p in parts])


def _is_dead(pending: _Pending, now: float) -> bool:
    """True for a request already finished (e.g. cancelled); fails one past its deadline."""
    if pending.future.done():
        return True
    if pending.deadline is not None and now >= pending.deadline:
        pending.future.set_exception(
            DeadlineExpired("the deadline passed while the request waited in the queue")
        )
        return True
    return False


def _fail(parts: list[_Part], error: RequestError) -> None:
    for part in parts:
        if not part.pending.future.done():
            part.pending.future.set_exception(error)


def _deliver(
    parts: list[_Part], outputs: Outputs, handoff_s: float, compute_s: float, ended: float
) -> None:
    """Split a batch's outputs back to its requests; resolve those now complete."""
    batch_rows = sum(p.stop - p.start for p in parts)
    offset = 0
    for part in parts:
        pending, rows = part.pending, part.stop - part.start
        chunk = slice(offset, offset + rows)
        offset += rows
        if pending.future.done():
            continue
        pending.compute_s += compute_s
        pending.handoff_s += handoff_s
        pending.last_end = ended
        pending.batch_rows = max(pending.batch_rows, batch_rows)
        if rows == pending.n:
            pending.y = outputs.y[chunk]
            pending.dy_dx = None if outputs.dy_dx is None else outputs.dy_dx[chunk]
        else:
            _store(pending, outputs, chunk, part)
        if part.stop == pending.n:  # parts of a request run in order, so this one completes it
            timing = Timing(
                queue_us=round(pending.waited_s * 1e6),
                handoff_us=round(pending.handoff_s * 1e6),
                compute_us=round(pending.compute_s * 1e6),
                batch_rows=pending.batch_rows,
                queued=pending.enqueued,
                done=ended,
            )
            pending.future.set_result(Result(pending.y, pending.dy_dx, timing))


def _store(pending: _Pending, outputs: Outputs, chunk: slice, part: _Part) -> None:
    """Copy one slice of a split request's results into its own buffers."""
    if pending.y is None:
        pending.y = np.empty((pending.n, *outputs.y.shape[1:]), outputs.y.dtype)
        if outputs.dy_dx is not None:
            pending.dy_dx = np.empty((pending.n, *outputs.dy_dx.shape[1:]), outputs.dy_dx.dtype)
    pending.y[part.start : part.stop] = outputs.y[chunk]
    if pending.dy_dx is not None and outputs.dy_dx is not None:
        pending.dy_dx[part.start : part.stop] = outputs.dy_dx[chunk]
