"""The engine process of a multi-frontend server: the one process that imports TensorFlow.

It loads and warms up every model, then listens on a local socket for frontends. Each
frontend sends sub-batches (its own micro-batches); they go into this process's batchers,
one per model, which merge the sub-batches of every frontend into one device call per
batch (never mixing models or derivative kinds, at most --max-batch-size rows and, as in
one process, at most the rows whose learned cost fits --max-batch-ms, on the XLA ladder),
computed on this process's event loop thread, sharing batches round robin between
frontends (--fairness). A
failing sub-batch is isolated by the batcher's bisection and answered with its error; the
frontend then bisects it down to the request that fails. Any other error (a full queue,
shutting down) crosses with its kind and is not bisected. Each sub-batch is queued with
its requests' most urgent priority and latest deadline (a HIGH request overtakes NORMAL
rows queued here; a sub-batch whose every request is past its deadline is never computed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, Listener

import numpy as np

from gradserve.server import logs
from gradserve.server.config import ServerConfig
from gradserve.server.core.batcher import Batcher, Result
from gradserve.server.core.contract import Engine, Priority
from gradserve.server.core.errors import QueueFull
from gradserve.server.metrics import Metrics
from gradserve.server.multiproc import messages, shm
from gradserve.server.multiproc.messages import EngineModel, SubBatch, SubBatchAnswer
from gradserve.server.multiproc.shm import Mapped, Segment
from gradserve.wire.kinds import Derivative

log = logging.getLogger("gradserve.engine")

# How the engine process loads and warms up its models (the assembly passes its loader).
Load = Callable[[ServerConfig], list[Engine]]


class _Session:
    """One frontend's connection: its sub-batches in, their answers out (loop thread).

    Each in-flight sub-batch occupies one of the frontend's slots: its rows lie in the
    frontend's segment of that slot, its answer goes into this session's segment of it."""

    def __init__(
        self, conn: Connection, batchers: dict[str, Batcher], number: int, slots: int
    ) -> None:
        self._conn = conn
        self._slots = slots
        self._batchers = batchers
        self._requests: dict[int, Mapped] = {}
        self._answers: dict[int, Segment] = {}
        self._prefix = f"gradserve-{os.getppid()}-e{number}s"
        self._number = number  # the frontend's turn in fair batches
        self._pending: dict[int, asyncio.Future[Result]] = {}
        self.closed = False

    def submit(self, message: SubBatch) -> None:
        slot = message.slot
        try:
            if slot in self._pending or not 0 <= slot < self._slots:
                raise ValueError(f"slot {slot} is in flight or not one of 0..{self._slots - 1}")
            mapped = self._requests.setdefault(slot, Mapped())
            x = mapped.view(message.path, message.x)
            v = mapped.view(message.path, message.v)
            batcher = self._batchers[message.model]
            future = batcher.submit(
                x, Derivative(message.kind), message.deadline, v,
                caller=self._number, priority=Priority(message.priority),
            )  # fmt: skip
        except QueueFull as exc:
            self._send(SubBatchAnswer.failed(QueueFull(f"the engine process's {exc}"), slot))
            return
        except Exception as exc:
            self._send(SubBatchAnswer.failed(exc, slot))
            return
        self._pending[slot] = future
        future.add_done_callback(lambda done: self._answer(slot, done))

    def _answer(self, slot: int, future: asyncio.Future[Result]) -> None:
        self._pending.pop(slot, None)
        if self.closed or future.cancelled():
            return
        error = future.exception()
        if error is not None:
            self._send(SubBatchAnswer.failed(error, slot))
            return
        result = future.result()
        segment = self._answers.get(slot)
        if segment is None:
            segment = self._answers[slot] = Segment(f"{self._prefix}{slot}")
        path, (y, dy_dx) = segment.write([result.y, result.dy_dx])
        self._send(SubBatchAnswer(path, y, dy_dx, slot=slot))

    def _send(self, answer: SubBatchAnswer) -> None:
        with contextlib.suppress(OSError):  # the frontend is gone; its reader ends the session
            self._conn.send_bytes(messages.encode(answer))

    def close(self) -> None:
        """The frontend went away: drop what it had queued; free this session's memory."""
        self.closed = True
        for future in list(self._pending.values()):
            future.cancel()
        self._conn.close()
        for segment in self._answers.values():
            segment.close()
        for mapped in self._requests.values():
            mapped.close()


def _read(conn: Connection, session: _Session, loop: asyncio.AbstractEventLoop) -> None:
    """Thread: hand each sub-batch of one frontend to the loop; end the session at EOF."""
    while True:
        try:
            message = messages.decode(conn.recv_bytes())
            if not isinstance(message, SubBatch):
                raise messages.BadFrame(f"a frontend sent a {type(message).__name__}")
        except messages.BadFrame as exc:
            log.error("closing a connection that sent a bad frame: %s", exc,
                      extra={"event": "bad_frame"})  # fmt: skip
            loop.call_soon_threadsafe(session.close)
            return
        except (EOFError, OSError):
            loop.call_soon_threadsafe(session.close)
            return
        loop.call_soon_threadsafe(session.submit, message)


def _accept(
    listener: Listener, infos, batchers, slots: int, loop: asyncio.AbstractEventLoop
) -> None:
    """Thread: greet every frontend that connects and start reading its sub-batches."""
    number = 0
    while True:
        try:
            conn = listener.accept()
        except OSError:
            return
        number += 1
        conn.send_bytes(messages.encode(infos))
        session = _Session(conn, batchers, number, slots)
        threading.Thread(target=_read, args=(conn, session, loop), daemon=True).start()


def _exit_with_parent(parent: Connection, segments: str) -> None:
    """Thread: the supervisor holds the other end; EOF means it died, so this process ends,
    removing the shared-memory segments of the supervisor's children on its way out (the
    supervisor would have)."""
    with contextlib.suppress(EOFError, OSError):
        parent.recv()
    shm.remove_leftovers(segments)
    os._exit(1)


async def _serve(config: ServerConfig, address: str, parent: Connection, load: Load) -> None:
    engines = await asyncio.to_thread(load, config)
    metrics = Metrics()
    batchers = {
        engine.name: Batcher(
            engine.run,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_delay_us / 1e6,
            max_queue_rows=max(config.max_queue_rows, config.max_batch_size),
            fair=config.fairness,  # between frontends: each is one caller here
            max_batch_s=config.max_batch_ms / 1e3,
            ladder=getattr(engine, "ladder", ()),
            observer=metrics,
            inline=True,  # this loop only hands sub-batches in and answers out
        )
        for engine in engines
    }
    for batcher in batchers.values():
        batcher.start()
    metrics.queue_rows.set_function(lambda: sum(b.queued_rows for b in batchers.values()))
    metrics.watch_costs(lambda: [(name, b.costs()) for name, b in batchers.items()])
    infos = [
        EngineModel(e.name, tuple(e.input_shape), tuple(e.output_shape), e.device,
                  np.dtype(e.numpy_dtype).name)
        for e in engines
    ]  # fmt: skip
    http = metrics.serve("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    listener = Listener(address, family="AF_UNIX")
    accepting = (listener, infos, batchers, config.in_flight, loop)
    threading.Thread(target=_accept, args=accepting, daemon=True).start()
    parent.send(("ready", http.server_port))
    segments = f"gradserve-{os.getppid()}-"
    threading.Thread(target=_exit_with_parent, args=(parent, segments), daemon=True).start()
    log.info("engine process serving", extra={"event": "engine_ready", "address": address})
    await stop.wait()
    listener.close()
    for batcher in batchers.values():
        await batcher.close()
    http.shutdown()
    log.info("engine process stopped", extra={"event": "engine_stop"})


def run(config: ServerConfig, address: str, parent: Connection, load: Load) -> None:
    """Entry point of the engine process (spawned by the supervisor); `load` loads and warms
    up the models (the assembly's loader: this is where TensorFlow is imported)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which orders
    logs.configure(config.log_format, config.log_level)
    try:
        asyncio.run(_serve(config, address, parent, load))
    except Exception as exc:
        log.exception("engine process failed")
        parent.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
