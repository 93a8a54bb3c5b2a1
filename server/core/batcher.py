"""Micro-batching on an event loop: a Scheduler (core/scheduler.py) driven by one worker.

The worker forms a batch as soon as the engine is free, from whatever is queued (no fixed
wait at low load, unless `max_delay_s`); while the engine computes, new rows accumulate for
the next batch. Each request's future is its ticket: cancelling it withdraws whatever rows
are not yet dispatched and frees the request's bytes.

`compute` is any function (Derivative, x [n, ...]) -> Outputs, called as compute(kind, x, v)
for the kinds that take a vector v (row-aligned with x), run on one dedicated thread.
Several batchers (one per model) may share that thread by sharing an executor. With
`in_flight` N, `compute` instead returns an awaitable (the engine process's exchange) and
up to N batches are outstanding at once: the next batch is formed while earlier ones are
being computed elsewhere. This module knows nothing of gRPC or protobuf.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Hashable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from gradserve.server.core.contract import Priority
from gradserve.server.core.errors import Closed, EngineFailed
from gradserve.server.core.scheduler import (
    BatchWatch,
    Called,
    Compute,
    KindCost,
    Observer,
    Part,
    RequestResult,
    Scheduler,
    batch_rows,
    call_args,
    fail,
    hints_of,
    timed,
)
from gradserve.wire.kinds import Derivative

__all__ = ["BatchWatch", "Batcher", "KindCost", "Observer", "RequestResult"]

log = logging.getLogger(__name__)


class Batcher:
    """Queue + single worker in front of a compute function: the event loop's driver of a
    Scheduler, which it holds. Use as `async with`."""

    def __init__(
        self,
        compute: Compute,
        *,
        max_delay_s: float = 0.0,
        executor: ThreadPoolExecutor | None = None,
        hints: bool = False,
        in_flight: int = 0,
        **scheduling: Any,
    ) -> None:
        """`scheduling`: the Scheduler's settings (max_batch_size, max_queue_rows, memory,
        result_row_bytes, fair, max_batch_s, ladder, observer, watch, engine_cap).
        `max_delay_s`: how long an idle engine may be held to gather a larger batch;
        `executor`: the engine thread (shared by several batchers; None: one of its own);
        `hints`: pass `compute` each batch's BatchHints as `hints=` (an engine that schedules
        further: the engine process); `in_flight`: `compute` returns an awaitable and up to
        this many batches may be awaited at once (0: a plain function, one batch at a time,
        on the executor)."""
        if max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")
        self._idle = asyncio.Event()
        self._idle.set()
        self.scheduler = Scheduler(**scheduling, on_idle=self._idle.set)
        self._compute = compute
        self._hints = hints
        self.max_delay_s = max_delay_s
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(in_flight) if in_flight else None
        self._outstanding: set[asyncio.Task[None]] = set()
        self._owns_executor = executor is None and not in_flight
        if self._owns_executor:
            executor = ThreadPoolExecutor(1, thread_name_prefix="gradserve-engine")
        self._executor = executor

    # -- the scheduler's state, as callers read it --------------------------------------------

    @property
    def queued_rows(self) -> int:
        return self.scheduler.queued_rows

    @property
    def max_queue_rows(self) -> int:
        return self.scheduler.max_queue_rows

    @property
    def pending(self) -> int:
        return self.scheduler.pending

    @property
    def batches_run(self) -> int:
        return self.scheduler.batches_run

    def request_bytes(self, x: np.ndarray, kind: Derivative, v: np.ndarray | None = None) -> int:
        return self.scheduler.request_bytes(x, kind, v)

    def row_cap(self, kind: Derivative) -> int:
        return self.scheduler.row_cap(kind)

    def costs(self) -> list[KindCost]:
        return self.scheduler.costs()

    def waiting_callers(self) -> set[Hashable]:
        return self.scheduler.waiting_callers()

    # -- driving it ------------------------------------------------------------------------------

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
        *,
        caller: Hashable = None,
        priority: Priority = Priority.NORMAL,
        trace: object = None,
    ) -> asyncio.Future[RequestResult]:
        """Queue rows x [n, ...] (and v, row-aligned, for kinds that take a vector); the
        future resolves to their RequestResult.

        `deadline` is on the event loop's clock (loop.time()). `caller` is any key that names
        who sends the request (batches are shared fairly between callers); `priority` HIGH
        goes before NORMAL; its bytes are counted against the memory budget. Raises at once,
        queueing nothing, when the batcher is closing or the queue is full (rows or bytes).
        Cancelling the future withdraws whatever rows are not yet dispatched and frees the
        request's bytes. `trace` is the request's, handed to the watch with its batches.
        """
        scheduler = self.scheduler
        future: asyncio.Future[RequestResult] = asyncio.get_running_loop().create_future()
        pending = scheduler.admit(x, kind, deadline, v, caller, priority, future, trace)
        future.add_done_callback(lambda _f: scheduler.finished(pending))
        self._idle.clear()
        self._wakeup.set()
        return future

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (Closed); admitted ones still complete."""
        self.scheduler.stop_accepting()
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
        if self._outstanding:
            await asyncio.gather(*self._outstanding, return_exceptions=True)
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    async def _supervise(self) -> None:
        """Run the worker loop; if it ever fails, fail the batch it held and start it again,
        so no admitted request is left waiting on a dead worker."""
        while True:
            try:
                await self._run()
                return
            except asyncio.CancelledError:
                self.scheduler.fail_held(Closed("the server stopped before this request finished"))
                raise
            except Exception as exc:
                log.exception("batch worker failed; restarting it")
                self.scheduler.observer.restarted()
                self.scheduler.fail_held(EngineFailed(f"internal error in the batch worker: {exc}"))

    async def _run(self) -> None:
        scheduler = self.scheduler
        while True:
            if scheduler.queued_rows == 0:
                if scheduler.closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._slots is not None:
                await self._slots.acquire()  # meanwhile rows accumulate for a fuller batch
                try:
                    parts, dispatched = await self._next_batch()
                except BaseException:  # a fault (or closing) before the batch is out: the
                    self._slots.release()  # permit goes back, or the worker would starve
                    raise
                if parts:
                    self._launch(parts, dispatched)
                else:
                    self._slots.release()
                    await asyncio.sleep(0)  # let done-callbacks run before looking again
                continue
            parts, dispatched = await self._next_batch()
            if not parts:
                await asyncio.sleep(0)  # let pending done-callbacks run before looking again
                continue
            await self._execute(parts, dispatched)
            scheduler.handed_over()

    async def _next_batch(self) -> tuple[list[Part], float]:
        """The next batch (after max_delay_s of gathering, if set) and when it was taken."""
        if self.max_delay_s > 0:
            await self._wait_for_fill()
        dispatched = time.perf_counter()
        return self.scheduler.take_batch(dispatched), dispatched

    def _launch(self, parts: list[Part], dispatched: float) -> None:
        """Await one batch in its own task (in_flight mode); its slot is freed when done."""
        self.scheduler.handed_over()
        task = asyncio.get_running_loop().create_task(self._outstanding_batch(parts, dispatched))
        self._outstanding.add(task)
        task.add_done_callback(self._outstanding.discard)

    async def _outstanding_batch(self, parts: list[Part], dispatched: float) -> None:
        try:
            await self._execute(parts, dispatched)
        except asyncio.CancelledError:
            fail(parts, Closed("the server stopped before this request finished"))
            raise
        except Exception as exc:
            log.exception("an outstanding batch failed outside the engine")
            fail(parts, EngineFailed(f"internal error in the batch worker: {exc}"))
        finally:
            self._slots.release()

    async def _wait_for_fill(self) -> None:
        """Hold the batch until it is full or the oldest request has waited max_delay_s."""
        scheduler = self.scheduler
        oldest = scheduler.oldest_due()
        until = (time.perf_counter() if oldest is None else oldest) + self.max_delay_s
        while scheduler.queued_rows < scheduler.max_batch_size and not scheduler.closing:
            remaining = until - time.perf_counter()
            if remaining <= 0:
                return
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)

    async def _execute(self, parts: list[Part], dispatched: float) -> None:
        """Run one batch, bisected on an engine error (Scheduler.calls), on the executor or,
        in in_flight mode, awaited."""
        calls = self.scheduler.calls(parts, dispatched)
        with contextlib.suppress(StopIteration):
            batch = next(calls)
            while True:
                try:
                    outcome = await self._call(batch)
                except Exception as exc:
                    outcome = exc
                batch = calls.send(outcome)

    async def _call(self, parts: list[Part]) -> Called:
        kind = parts[0].pending.kind
        compute = self._compute
        if self._hints:
            compute = functools.partial(compute, hints=hints_of(parts))
        xs, vs = batch_rows(parts)
        if self._slots is not None:
            return await _awaited(compute, kind, xs, vs)
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, timed, compute, kind, xs, vs
        )


async def _awaited(
    compute: Compute, kind: Derivative, xs: list[np.ndarray], vs: list[np.ndarray] | None
) -> Called:
    """As scheduler.timed, for a `compute` that returns an awaitable (in_flight mode)."""
    args = call_args(kind, xs, vs)
    began = time.perf_counter()
    outputs = await compute(*args)
    return outputs, began, time.perf_counter()
