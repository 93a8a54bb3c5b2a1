"""Scheduling rows into batches, without asyncio: the one scheduler of a process.

Every caller's rows are queued; a batch is formed from whatever is queued when the engine
is free, up to `max_batch_size` rows (fewer when the learned cost of more would exceed
`max_batch_s`, on the engine's padding ladder where it pads). Batches never mix derivative
kinds. A request larger than a batch is split across batches and reassembled. A request
that is cancelled, or whose deadline passes, before its rows are dispatched is dropped and
its rows (and bytes) freed. If the engine fails on a batch, the batch is bisected so only
the request that fails on its own gets the error.

Bounds and fairness:
- Admission counts rows (`max_queue_rows`) and bytes (a MemoryBudget shared by every
  scheduler of a server): past either, a request is refused at once and nothing queued is
  dropped.
- Each caller (a plain key) has its own queue per priority and kind; a batch is filled
  deficit round robin in rows across the callers with rows of its kind, so a caller with one
  row is in the next batch however many rows another caller has queued. HIGH priority rows
  go before NORMAL ones. With `fair=False` every caller shares one queue (first come, first
  served).

A request is answered through its reply: anything with done(), set_result() and
set_exception() (an asyncio.Future in the Batcher, which drives this class on an event loop;
a plain callback object in the engine process's loop, which drives it without one). Whoever
drives it calls `finished` once a reply is done. Deadlines are on time.monotonic() (the
asyncio loop's clock). Knows nothing of gRPC, protobuf or asyncio.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Generator, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gradserve.server.core.budget import CostEstimate, CostModel, MemoryBudget
from gradserve.server.core.contract import ENGINE_KINDS, BatchHints, Outputs, Priority
from gradserve.server.core.errors import (
    NOT_BLAMED,
    Closed,
    DeadlineExpired,
    EngineFailed,
    QueueFull,
    RequestError,
    RequestTooLarge,
)
from gradserve.server.core.timing import SchedulerTiming
from gradserve.wire.kinds import Derivative

log = logging.getLogger(__name__)

Compute = Callable[..., Outputs]
Called = tuple[Outputs, float, float]  # an engine call's outputs, and when it began and ended


class Reply(Protocol):
    """How a request's outcome reaches whoever waits for it (asyncio.Future fits)."""

    def done(self) -> bool: ...

    def set_result(self, result: RequestResult) -> None: ...

    def set_exception(self, exception: BaseException) -> None: ...


@dataclass(frozen=True, slots=True)
class RequestResult:
    y: np.ndarray
    dy_dx: np.ndarray | None
    timing: SchedulerTiming


class Observer:
    """What the batcher reports as it works (metrics implement it); the default ignores it."""

    def batch(self, kind: Derivative, rows: int, seconds: float) -> None:
        """One successful engine call of `rows` rows that took `seconds`."""

    def queued(self, seconds: float) -> None:
        """A request's first rows left the queue after waiting `seconds`."""

    def restarted(self) -> None:
        """The batch worker failed on its own (a bug, not an engine error) and was started
        again; the requests of the batch it held failed."""


class BatchWatch(Protocol):
    """Who follows every engine call of one scheduler with its requests (the statistics of
    its model version, the batch spans of tracing)."""

    def batch_done(
        self, parts: list[Part], dispatched: float, began: float, ended: float, split: float,
        error: BaseException | None,
    ) -> None:  # fmt: skip
        """An engine call of `parts` (each part's `pending.trace` is what its request was
        admitted with): dispatched, began and ended (time.perf_counter()), its outputs split
        back to its requests at `split`; `error` if it failed (then began = ended = split:
        the moment its failure was seen)."""


class Watches:
    """Several watches as one."""

    def __init__(self, *watches: BatchWatch) -> None:
        self._watches = watches

    def batch_done(self, *args: object) -> None:
        for watch in self._watches:
            watch.batch_done(*args)


class _Pending:
    """One request in the queue; `next_row` marks how far it has been dispatched."""

    __slots__ = (
        "batch_rows",
        "caller",
        "compute_s",
        "deadline",
        "dy_dx",
        "enqueued",
        "future",
        "handoff_s",
        "kind",
        "last_end",
        "n",
        "nbytes",
        "next_row",
        "priority",
        "rows_done",
        "started",
        "trace",
        "v",
        "waited_s",
        "x",
        "y",
    )

    def __init__(
        self, x, v, kind, future, deadline, enqueued, caller, nbytes, priority, trace
    ) -> None:
        self.x: np.ndarray | None = x
        self.v: np.ndarray | None = v
        self.n: int = x.shape[0]
        self.kind: Derivative = kind
        self.future: Reply = future
        self.deadline: float | None = deadline
        self.enqueued: float = enqueued
        self.caller: Hashable = caller
        self.nbytes: int = nbytes
        self.priority: Priority = priority
        self.trace: object = trace
        self.next_row = 0
        self.rows_done = 0
        self.started: float | None = None
        self.compute_s = 0.0
        self.handoff_s = 0.0
        self.waited_s = 0.0
        self.last_end = 0.0
        self.batch_rows = 0
        self.y: np.ndarray | None = None
        self.dy_dx: np.ndarray | None = None


class _CallerQueue:
    """One caller's requests of one priority and kind, oldest first, and its turn's credit."""

    __slots__ = ("deficit", "requests", "since")

    def __init__(self, since: float) -> None:
        self.requests: deque[_Pending] = deque()
        self.deficit = 0  # rows it may still take in its current turn
        self.since = since  # when it last became due: its first request queued, or last served


class _Lane:
    """The requests of one priority and kind: a queue per caller, callers in turn order."""

    __slots__ = ("callers", "order")

    def __init__(self) -> None:
        self.callers: dict[Hashable, _CallerQueue] = {}
        self.order: deque[Hashable] = deque()

    def __bool__(self) -> bool:
        return bool(self.order)

    def add(self, pending: _Pending) -> None:
        queue = self.callers.get(pending.caller)
        if queue is None:
            queue = self.callers[pending.caller] = _CallerQueue(pending.enqueued)
            self.order.append(pending.caller)
        queue.requests.append(pending)

    def due_since(self) -> float:
        """How long the most neglected of its callers has waited for a turn."""
        return min(queue.since for queue in self.callers.values())

    def front(self) -> _CallerQueue:
        return self.callers[self.order[0]]

    def drop_front(self) -> None:
        """The caller whose turn it is has nothing left: it leaves the rotation."""
        del self.callers[self.order.popleft()]


@dataclass
class Part:
    """Rows [start, stop) of one pending request, placed in a batch."""

    pending: _Pending
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class KindCost:
    """What the batcher has learned of one derivative kind's engine cost, and its batch cap."""

    kind: Derivative
    estimate: CostEstimate
    row_cap: int  # the most rows a batch of this kind takes now


class Scheduler:
    """Queues, admission, fairness, priorities, deadlines, batch formation and the learned
    cost per kind; the driver (Batcher, or the engine process's loop) calls the engine."""

    def __init__(
        self,
        *,
        max_batch_size: int = 1024,
        max_queue_rows: int = 1 << 20,
        memory: MemoryBudget | None = None,
        result_row_bytes: Mapping[Derivative, int] | None = None,
        fair: bool = True,
        max_batch_s: float = 0.0,
        ladder: Sequence[int] = (),
        observer: Observer | None = None,
        watch: BatchWatch | None = None,
        on_idle: Callable[[], None] | None = None,
        engine_cap: Callable[[Derivative], int | None] | None = None,
    ) -> None:
        """`memory`: the byte budget admission counts against (None: bytes unbounded);
        `result_row_bytes`: bytes one row's answer takes, per kind (counted at admission);
        `fair`: a queue per caller, batches filled round robin (False: one shared queue);
        `max_batch_s`: engine-time budget per batch (0: rows only); `ladder`: the batch sizes
        the engine pads to (empty: it does not pad); `watch`: told of every engine call;
        `on_idle`: called whenever every admitted request has finished; `engine_cap`: the
        engine's own cap on a batch's rows per kind, now (Engine.batch_cap), kept to as well."""
        if max_batch_size < 1 or max_queue_rows < 1 or max_batch_s < 0:
            raise ValueError("max_batch_size and max_queue_rows must be >= 1, max_batch_s >= 0")
        self.observer = observer or Observer()
        self._on_idle = on_idle
        self._engine_cap = engine_cap
        self._watch = watch
        self.max_batch_size = max_batch_size
        self.max_queue_rows = max_queue_rows
        self.max_batch_s = max_batch_s
        self.fair = fair
        self.memory = memory
        self._result_row_bytes = dict(result_row_bytes or {})
        self._ladder = sorted(ladder)
        self._costs: dict[Derivative, CostModel] = {kind: CostModel() for kind in ENGINE_KINDS}
        self._lanes: dict[Priority, dict[Derivative, _Lane]] = {
            priority: {kind: _Lane() for kind in ENGINE_KINDS} for priority in Priority
        }
        self._queued_rows = 0
        self.closing = False
        self._in_flight: list[Part] = []
        self.batches_run = 0
        self.pending = 0  # requests admitted and not yet finished (answered, failed, cancelled)

    @property
    def queued_rows(self) -> int:
        """Rows admitted but not yet handed to the engine."""
        return self._queued_rows

    def waiting_callers(self) -> set[Hashable]:
        """The callers with rows queued now, as fair batching keys them."""
        return {caller for lanes in self._lanes.values() for lane in lanes.values()
                for caller in lane.callers}  # fmt: skip

    def request_bytes(self, x: np.ndarray, kind: Derivative, v: np.ndarray | None = None) -> int:
        """The bytes a request holds until it is answered: its rows, its vectors and the
        answer it will produce (its message is counted by whoever read it)."""
        vector = 0 if v is None else v.nbytes
        return x.nbytes + vector + x.shape[0] * self._result_row_bytes.get(kind, 0)

    def admit(
        self,
        x: np.ndarray,
        kind: Derivative,
        deadline: float | None,
        v: np.ndarray | None,
        caller: Hashable,
        priority: Priority,
        reply: Reply,
        trace: object = None,
    ) -> _Pending:
        """Queue rows x [n, ...] (and v, row-aligned, for kinds that take a vector), answered
        through `reply`; its bytes (`request_bytes`) are counted against the memory budget.
        Raises at once, queueing nothing, when closing or the queue is full (rows or bytes).
        The driver calls `finished` with the returned request once its reply is done.
        `trace` is the request's own, handed back with its batches to the watch."""
        if self.closing:
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
        priority = Priority(priority)
        nbytes = self.request_bytes(x, kind, v)
        if self.memory is not None:
            self.memory.reserve(nbytes)
        key = caller if self.fair else None
        pending = _Pending(
            x, v, kind, reply, deadline, time.perf_counter(), key, nbytes, priority, trace
        )
        self._lanes[priority][kind].add(pending)
        self._queued_rows += n
        self.pending += 1
        return pending

    def row_cap(self, kind: Derivative) -> int:
        """The most rows the next batch of `kind` may take: max_batch_size, or fewer when
        the learned cost of more would exceed max_batch_s or the engine caps it lower."""
        cap = self.max_batch_size
        if self.max_batch_s:
            cap = self._costs[kind].rows_within(self.max_batch_s, cap, self._ladder)
        engine = self._engine_cap(kind) if self._engine_cap is not None else None
        return cap if engine is None else max(1, min(cap, engine))

    def costs(self) -> list[KindCost]:
        """The learned engine cost and current batch cap of every kind measured so far."""
        learned = []
        for kind, model in self._costs.items():
            estimate = model.estimate()
            if estimate is not None:
                learned.append(KindCost(kind, estimate, self.row_cap(kind)))
        return learned

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (Closed); admitted ones still complete."""
        self.closing = True

    def fail_held(self, error: RequestError) -> None:
        """Fail the requests of the batch last taken, where a fault outside the engine (in
        forming or splitting it) left it unanswered; the scheduler goes on."""
        fail(self._in_flight, error)
        self._in_flight = []

    def handed_over(self) -> None:
        """The batch last taken is in the driver's hands now (computed, or awaited by a task
        of its own that answers it whatever happens): fail_held no longer concerns it."""
        self._in_flight = []

    def oldest_due(self) -> float | None:
        """When the most neglected caller with queued rows became due (perf_counter)."""
        lanes = [lane for by_kind in self._lanes.values() for lane in by_kind.values() if lane]
        return min((lane.due_since() for lane in lanes), default=None)

    def finished(self, pending: _Pending) -> None:
        """A request is answered, failed or cancelled: free its rows and bytes, and drop its
        arrays (a cancelled one may still sit in its caller's queue until its turn)."""
        self.pending -= 1
        self._withdraw(pending)
        if self.memory is not None:
            self.memory.release(pending.nbytes)
        pending.x = pending.v = pending.y = pending.dy_dx = None
        if self.pending == 0 and self._on_idle is not None:
            self._on_idle()

    def _withdraw(self, pending: _Pending) -> None:
        """Free the not-yet-dispatched rows of a finished (answered, failed, cancelled) request."""
        self._queued_rows -= pending.n - pending.next_row
        pending.next_row = pending.n

    def _next_kind(self) -> Derivative | None:
        """The kind of the next batch: that of the lane whose most neglected caller has
        waited longest, among the HIGH lanes if any has rows, else the NORMAL ones."""
        for priority in (Priority.HIGH, Priority.NORMAL):
            live = [
                (lane.due_since(), kind) for kind, lane in self._lanes[priority].items() if lane
            ]
            if live:
                return min(live, key=lambda due: due[0])[1]
        return None

    def take_batch(self, taken: float) -> list[Part]:
        """Up to row_cap rows of one kind, HIGH callers first, each priority's callers in
        deficit round robin, dispatched at `taken` (time.perf_counter())."""
        kind = self._next_kind()
        if kind is None:
            return []
        now = time.monotonic()
        starts: dict[_Pending, int] = {}  # request -> its first row in this batch
        room = self.row_cap(kind)
        try:
            for priority in (Priority.HIGH, Priority.NORMAL):
                room = self._fill(self._lanes[priority][kind], room, starts, taken, now)
        finally:  # even on a fault, so that the worker fails these rather than strands them
            parts = [Part(pending, start, pending.next_row) for pending, start in starts.items()]
            self._in_flight = parts
        return parts

    def _fill(
        self, lane: _Lane, room: int, starts: dict[_Pending, int], taken: float, now: float
    ) -> int:
        """Give up to `room` rows of `lane` to the batch, deficit round robin: the caller
        whose turn it is gets a quantum (an equal share of the room) of rows from its oldest
        requests, then the next caller; a turn cut short by a full batch resumes in the next
        one. Returns the room left."""
        if not lane:
            return room
        quantum = max(1, room // len(lane.order))
        while room and lane:
            queue = lane.front()
            while queue.requests and self._drop_if_dead(queue.requests[0], now):
                queue.requests.popleft()
            if not queue.requests:
                lane.drop_front()
                continue
            if queue.deficit <= 0:
                queue.deficit = quantum
            pending = queue.requests[0]
            take = min(room, queue.deficit, pending.n - pending.next_row)
            if pending not in starts:
                starts[pending] = pending.next_row
                self._dispatching(pending, taken)
            pending.next_row += take
            self._queued_rows -= take
            room -= take
            queue.deficit -= take
            queue.since = taken
            if pending.next_row == pending.n:
                queue.requests.popleft()
            if not queue.requests:
                lane.drop_front()
            elif queue.deficit == 0:
                lane.order.rotate(-1)
        return room

    def _dispatching(self, pending: _Pending, taken: float) -> None:
        """Account for a request's rows leaving the queue in a batch dispatched at `taken`."""
        if pending.started is None:
            pending.started = taken
            pending.waited_s = taken - pending.enqueued
            self.observer.queued(pending.waited_s)
        else:  # the next part of a split request
            since = max(pending.last_end, pending.started)  # an earlier part may be in flight
            pending.waited_s += max(0.0, taken - since)

    def _drop_if_dead(self, pending: _Pending, now: float) -> bool:
        """True (and its rows freed now, not in a later callback) for a finished request."""
        if _is_dead(pending, now):
            self._withdraw(pending)
            return True
        return False

    def _padded(self, rows: int) -> int:
        """The rows the engine computes for a batch of `rows`: the next ladder size."""
        return next((size for size in self._ladder if size >= rows), rows)

    def execute(self, parts: list[Part], compute: Compute, dispatched: float) -> None:
        """Run one batch on this thread, bisected on an engine error (`calls`)."""
        calls = self.calls(parts, dispatched)
        with contextlib.suppress(StopIteration):
            batch = next(calls)
            while True:
                try:
                    outcome = timed(compute, batch[0].pending.kind, *batch_rows(batch))
                except Exception as exc:
                    outcome = exc
                batch = calls.send(outcome)

    def calls(
        self, parts: list[Part], dispatched: float
    ) -> Generator[list[Part], Called | Exception, None]:
        """The engine calls one batch takes, one after the other: yields the parts to compute
        next; the driver computes them and sends back (outputs, began, ended) or the
        exception the engine raised. On an error the batch is bisected, so only the failing
        request fails. Every driver (a thread here, an event loop in Batcher) runs this one
        plan."""
        todo = [parts]
        while todo:
            parts = live_parts(todo.pop())
            if not parts:
                continue
            outcome = yield parts
            if not isinstance(outcome, Exception):
                self.succeeded(parts, *outcome, dispatched)
                continue
            self.batch_failed(parts, dispatched, outcome)
            if not self.failed_whole(parts, outcome):
                middle = len(parts) // 2
                todo += [parts[middle:], parts[:middle]]  # the first half first

    def batch_failed(self, parts: list[Part], dispatched: float, exc: Exception) -> None:
        """Tell the watch of an engine call that failed (before any bisection)."""
        if self._watch is not None:
            now = time.perf_counter()
            self._tell_watch(parts, dispatched, now, now, now, exc)

    def failed_whole(self, parts: list[Part], exc: Exception) -> bool:
        """Fail the batch's requests with `exc` if it is nobody's fault (NOT_BLAMED) or the
        batch is one request (True); False: the caller bisects the batch."""
        if isinstance(exc, NOT_BLAMED):  # e.g. nothing ran, or the engine's queue is full
            fail(parts, exc)
            return True
        if len(parts) > 1:
            return False
        log.warning(
            "engine failed on a request of %d rows: %s", parts[0].stop - parts[0].start, exc
        )
        error = EngineFailed(f"the engine failed on this request: {exc}")
        error.__cause__ = exc
        fail(parts, error)
        return True

    def succeeded(
        self, parts: list[Part], outputs: Outputs, began: float, ended: float, dispatched: float
    ) -> None:
        """Learn the batch's cost and split its outputs back to its requests."""
        self.batches_run += 1
        kind = parts[0].pending.kind
        rows = sum(p.stop - p.start for p in parts)
        self._costs[kind].observe(self._padded(rows), ended - began)
        self.observer.batch(kind, rows, ended - began)
        _deliver(parts, outputs, began - dispatched, ended - began, ended)
        if self._watch is not None:
            self._tell_watch(parts, dispatched, began, ended, time.perf_counter(), None)

    def _tell_watch(self, *batch: object) -> None:
        """Tell the watch of a batch; a watch that fails (statistics, tracing) is logged and
        never fails the batch's requests."""
        try:
            self._watch.batch_done(*batch)
        except Exception:
            log.exception("the batch watch failed; the batch's requests are answered anyway")


def timed(
    compute: Compute, kind: Derivative, xs: list[np.ndarray], vs: list[np.ndarray] | None
) -> tuple[Outputs, float, float]:
    """Join the parts' rows, compute; the outputs and when the call began and ended (run on
    the engine thread where there is one, so that joining large batches does not hold up an
    event loop)."""
    args = call_args(kind, xs, vs)
    began = time.perf_counter()
    outputs = compute(*args)
    return outputs, began, time.perf_counter()


def call_args(kind: Derivative, xs: list[np.ndarray], vs: list[np.ndarray] | None) -> tuple:
    """The engine call's arguments: the kind, the parts' rows joined, and their vectors."""
    x = joined(xs)
    return (kind, x) if vs is None else (kind, x, joined(vs))


def hints_of(parts: list[Part]) -> BatchHints:
    """A batch's most urgent priority, latest deadline (deadlines are on the asyncio
    loop's clock, time.monotonic(), as BatchHints wants them), traced requests, and its
    callers' runs of rows."""
    deadlines = [p.pending.deadline for p in parts]
    deadline = None if None in deadlines else max(deadlines)
    traces = tuple(p.pending.trace for p in parts if p.pending.trace is not None)
    callers: list[tuple[str, int]] = []
    for part in parts:
        caller, rows = str(part.pending.caller or ""), part.stop - part.start
        if callers and callers[-1][0] == caller:
            callers[-1] = (caller, callers[-1][1] + rows)
        else:
            callers.append((caller, rows))
    return BatchHints(max(p.pending.priority for p in parts), deadline, traces, tuple(callers))


def _slices(parts: list[Part], field: str) -> list[np.ndarray]:
    """The batch's rows of `x` or `v`, as one view per part."""
    return [getattr(p.pending, field)[p.start : p.stop] for p in parts]


def live_parts(parts: list[Part]) -> list[Part]:
    """The parts whose request still waits (one may have been cancelled meanwhile)."""
    return [p for p in parts if not p.pending.future.done()]


def batch_rows(parts: list[Part]) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    """The batch's rows of x and v, one view per part (taken now: a cancelled request drops
    its arrays)."""
    vs = None if parts[0].pending.v is None else _slices(parts, "v")
    return _slices(parts, "x"), vs


def joined(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


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


def fail(parts: list[Part], error: RequestError) -> None:
    for part in parts:
        if not part.pending.future.done():
            part.pending.future.set_exception(error)


def _deliver(
    parts: list[Part], outputs: Outputs, handoff_s: float, compute_s: float, ended: float
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
        pending.rows_done += rows
        if pending.rows_done == pending.n:  # its last part (parts may finish in any order)
            timing = SchedulerTiming(
                queue_us=round(pending.waited_s * 1e6),
                handoff_us=round(pending.handoff_s * 1e6),
                compute_us=round(pending.compute_s * 1e6),
                batch_rows=pending.batch_rows,
                queued=pending.enqueued,
                done=ended,
            )
            pending.future.set_result(RequestResult(pending.y, pending.dy_dx, timing))


def _store(pending: _Pending, outputs: Outputs, chunk: slice, part: Part) -> None:
    """Copy one slice of a split request's results into its own buffers."""
    if pending.y is None:
        pending.y = np.empty((pending.n, *outputs.y.shape[1:]), outputs.y.dtype)
        if outputs.dy_dx is not None:
            pending.dy_dx = np.empty((pending.n, *outputs.dy_dx.shape[1:]), outputs.dy_dx.dtype)
    pending.y[part.start : part.stop] = outputs.y[chunk]
    if pending.dy_dx is not None and outputs.dy_dx is not None:
        pending.dy_dx[part.start : part.stop] = outputs.dy_dx[chunk]
