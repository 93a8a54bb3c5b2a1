"""The engine process of a multi-frontend server: the one process that imports TensorFlow,
and the one scheduler of the server.

It loads and warms up every model, then listens on a local socket for frontends. Each
frontend sends sub-batches (its own micro-batches, up to --in-flight at once); they go into
this process's schedulers (core/scheduler.py), one per model, which merge the sub-batches of
every frontend into one device call per batch (never mixing models or derivative kinds, at
most --max-batch-size rows and, as in one process, at most the rows whose learned cost fits
--max-batch-ms, on the XLA ladder), sharing batches round robin between callers, whichever
frontend they reached (--fairness: each sub-batch names its callers' runs of rows, queued
one request each). Each sub-batch is queued with its requests' most urgent priority and latest
deadline: a HIGH sub-batch overtakes NORMAL rows queued here, and a sub-batch whose every
request is past its deadline is never computed. The server's whole --max-queue-rows is the
bound here: past it a sub-batch is refused (RESOURCE_EXHAUSTED).

One thread does all of it, without asyncio or an executor: it waits on every frontend's
socket at once (selectors), takes in every frame that arrived, runs one batch, answers each
sub-batch of it as soon as the batch is split, and looks at the sockets again before the
next batch (so a sub-batch that arrived meanwhile is in it, HIGH ones first). A failing
sub-batch is isolated by bisection and answered with its error; the frontend then bisects
it down to the request that fails. Any other error (a full queue, shutting down) crosses
with its kind and is not bisected.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import queue
import selectors
import signal
import socket
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

import numpy as np

from gradserve.server import logs
from gradserve.server.config import ServerConfig
from gradserve.server.core.contract import Engine, Priority, vector_shape
from gradserve.server.core.errors import (
    EngineFailed,
    InvalidInput,
    QueueFull,
    StartRefused,
    UnknownModel,
)
from gradserve.server.core.repository import LoadObserver, Repository
from gradserve.server.core.scheduler import RequestResult, Scheduler
from gradserve.server.metrics import Metrics
from gradserve.server.multiproc import messages, shm
from gradserve.server.multiproc.messages import (
    Control,
    ControlDone,
    EngineModel,
    Released,
    SubBatch,
    SubBatchAnswer,
)
from gradserve.server.multiproc.shm import Mapped, Segment
from gradserve.server.tracing import Tracing, unpack_contexts
from gradserve.wire.kinds import Derivative

log = logging.getLogger("gradserve.engine")

# The engine process's model repository (the assembly passes how it is opened; loading and
# warming up its versions is where TensorFlow is imported).
Load = Callable[[ServerConfig, LoadObserver], Repository]


class _Answer:
    """The reply of one sub-batch: its outcome is sent to its frontend the moment it is
    known. A sub-batch of several callers is queued as one request per caller's run of rows
    (each a scheduler.Reply of its own, a `_Part`), so that the engine process's fair
    batching sees callers, not frontends; the answer is sent once every run has its rows,
    or at the first failure (the frontend bisects what failed, as for an engine error)."""

    __slots__ = ("_done", "kind", "outputs", "parts", "scheduler", "session", "slot")

    def __init__(
        self, session: _Session, slot: int, scheduler: Scheduler, kind: Derivative, runs: int
    ) -> None:
        self.session, self.slot, self.scheduler, self.kind = session, slot, scheduler, kind
        self.parts: list[_Part] = []
        self.outputs: list[RequestResult | None] = [None] * runs
        self._done = False

    def done(self) -> bool:
        return self._done

    def part_done(self, index: int, result: RequestResult) -> None:
        self.outputs[index] = result
        if self._done or any(output is None for output in self.outputs):
            return
        self._finish()
        cap = self.scheduler.row_cap(self.kind)
        if len(self.outputs) == 1:
            self.session.answer(self.slot, self.outputs[0].y, self.outputs[0].dy_dx, cap)
            return
        y = np.concatenate([output.y for output in self.outputs])
        derivatives = [output.dy_dx for output in self.outputs]
        dy_dx = None if derivatives[0] is None else np.concatenate(derivatives)
        self.session.answer(self.slot, y, dy_dx, cap)

    def part_failed(self, exception: BaseException) -> None:
        if not self._done:
            self._finish()
            self.session.fail(self.slot, exception)

    def cancel(self) -> None:
        """Its frontend went away: withdraw its rows, answer nobody."""
        if not self._done:
            self._finish()

    def _finish(self) -> None:
        self._done = True
        self.session.replies.pop(self.slot, None)
        for part in self.parts:
            part.finish()


class _Part:
    """One caller's run of rows of a sub-batch, queued as a request of its own."""

    __slots__ = ("_done", "answer", "index", "pending")

    def __init__(self, answer: _Answer, index: int) -> None:
        self.answer, self.index = answer, index
        self.pending = None
        self._done = False

    def done(self) -> bool:
        return self._done or self.answer.done()

    def set_result(self, result: RequestResult) -> None:
        self._release()
        self.answer.part_done(self.index, result)

    def set_exception(self, exception: BaseException) -> None:
        self._release()
        self.answer.part_failed(exception)

    def finish(self) -> None:
        """The sub-batch is answered or withdrawn: this run's rows and bytes are freed."""
        self._release()

    def _release(self) -> None:
        if not self._done:
            self._done = True
            if self.pending is not None:
                self.answer.scheduler.finished(self.pending)


class _Session:
    """One frontend's connection. Each in-flight sub-batch occupies one of the frontend's
    slots: its rows lie in the frontend's segment of that slot, its answer goes into this
    session's segment of it."""

    def __init__(self, conn: Connection, number: int, slots: int) -> None:
        self.conn = conn
        self.frames = messages.FrameReader(conn)
        self.number = number  # the frontend's turn in fair batches
        self.replies: dict[int, _Answer] = {}
        self._slots = slots
        self._requests: dict[int, Mapped] = {}
        self._answers: dict[int, Segment] = {}
        self._prefix = f"gradserve-{os.getppid()}-e{number}s"

    def submit(
        self, message: SubBatch, models: dict[tuple[str, int], tuple[Scheduler, Engine]]
    ) -> None:
        """Queue a sub-batch, or answer its slot with why not; BadFrame (the session ends)
        for a slot that is in flight already or not one of the frontend's."""
        slot = message.slot
        if slot in self.replies or not 0 <= slot < self._slots:
            raise messages.BadFrame(f"slot {slot} is in flight or not one of 0..{self._slots - 1}")
        reply = None
        try:
            mapped = self._requests.setdefault(slot, Mapped())
            x = mapped.view(message.path, message.x)
            v = mapped.view(message.path, message.v)
            served = models.get((message.model, message.version))
            if served is None:
                raise UnknownModel(f"version {message.version} of {message.model!r} is not served")
            scheduler, engine = served
            kind = Derivative(message.kind)
            _check_rows(engine, kind, x, v)
            runs = message.callers or ((f"frontend:{self.number}", x.shape[0]),)
            reply = _Answer(self, slot, scheduler, kind, len(runs))
            traces = unpack_contexts(message.traces) if message.traces else None
            start = 0
            for index, (caller, rows) in enumerate(runs):
                part = _Part(reply, index)
                reply.parts.append(part)
                stop = start + rows
                part.pending = scheduler.admit(
                    x[start:stop], kind, message.deadline, None if v is None else v[start:stop],
                    caller, Priority(message.priority), part, traces,
                )  # fmt: skip
                start = stop
        except Exception as exc:
            if reply is not None:  # the runs admitted before one was refused
                reply.cancel()
            if isinstance(exc, QueueFull):
                exc = QueueFull(f"the engine process's {exc}")
            self.fail(slot, exc)
            return
        self.replies[slot] = reply

    def answer(self, slot: int, y: np.ndarray, dy_dx: np.ndarray | None, row_cap: int) -> None:
        segment = self._answers.get(slot)
        if segment is None:
            segment = self._answers[slot] = Segment(f"{self._prefix}{slot}")
        path, (y, dy_dx) = segment.write([y, dy_dx])
        self.send(SubBatchAnswer(path, y, dy_dx, slot=slot, row_cap=row_cap))

    def fail(self, slot: int, exc: BaseException) -> None:
        self.send(SubBatchAnswer.failed(exc, slot))

    def send(self, message: messages.Message) -> None:
        with contextlib.suppress(OSError):  # the frontend is gone; its EOF ends the session
            self.conn.send_bytes(messages.encode(message))

    def close(self) -> None:
        """The frontend went away: drop what it had queued; free this session's memory."""
        for reply in list(self.replies.values()):
            reply.cancel()
        self.conn.close()
        self.frames.close()
        for segment in self._answers.values():
            segment.close()
        for mapped in self._requests.values():
            mapped.close()


class _Loop:
    """The engine process's one thread: frontends' frames in, batches run, answers out; and
    the host of the model repository, whose loader thread hands it each change (`call`)."""

    def __init__(
        self, config: ServerConfig, metrics: Metrics, tracing: Tracing | None = None
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._tracing = tracing
        self.schedulers: dict[tuple[str, int], Scheduler] = {}
        # Every version a sub-batch may name: the served ones and the retiring ones, whose
        # frontends may still send rows of requests they admitted.
        self._models: dict[tuple[str, int], tuple[Scheduler, Engine]] = {}
        self._retiring: dict[tuple[str, int], tuple[concurrent.futures.Future, set[int]]] = {}
        self._delay_s = config.max_delay_us / 1e6
        self._selector = selectors.DefaultSelector()
        self._live: dict[int, _Session] = {}
        self._sessions = 0
        self._turn = 0  # the model whose batch goes next when several have rows
        self._stopping = False
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._call_wakeup, self._call_writer = socket.socketpair()
        self._call_writer.setblocking(False)
        self._call_wakeup.setblocking(False)
        self._thread: int | None = None  # the loop's, once it runs
        self.repository: Repository | None = None

    # -- the repository's host --------------------------------------------------------------

    def call(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the loop's thread and return its result (at once before the loop runs
        and on the loop's own thread)."""
        if self._thread is None or self._thread == threading.get_ident():
            return fn()
        done: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                done.set_result(fn())
            except Exception as exc:
                done.set_exception(exc)

        self._post(run)
        return done.result()

    def _post(self, fn: Callable[[], None]) -> None:
        self._calls.put(fn)
        with contextlib.suppress(BlockingIOError):
            self._call_writer.send(b"x")

    def serve(self, name: str, version: int, engine: Engine) -> None:
        self.call(lambda: self._add(name, version, engine))

    def retire(self, name: str, version: int) -> concurrent.futures.Future:
        released: concurrent.futures.Future = concurrent.futures.Future()
        self.call(lambda: self._retire(name, version, released))
        return released

    def broadcast(self) -> None:
        """The repository changed: every frontend gets the catalog (from any thread, without
        waiting; before the loop runs, the greeting carries it)."""
        if self._thread == threading.get_ident():
            self._broadcast()
        elif self._thread is not None:
            self._post(self._broadcast)

    def _add(self, name: str, version: int, engine: Engine) -> None:
        key = (name, version)
        if key in self._retiring:
            raise RuntimeError(f"version {version} of {name!r} is still being released")
        config = self._config
        scheduler = Scheduler(
            max_batch_size=config.max_batch_size,
            max_queue_rows=max(config.max_queue_rows, config.max_batch_size),
            fair=config.fairness,  # between callers, as the sub-batches name them
            max_batch_s=config.max_batch_ms / 1e3,
            ladder=engine.ladder,
            observer=self._metrics,
            watch=None if self._tracing is None else self._tracing.batches(name, str(version)),
        )
        self.schedulers[key] = scheduler
        self._models[key] = (scheduler, engine)
        self._broadcast()

    def _retire(self, name: str, version: int, released: concurrent.futures.Future) -> None:
        key = (name, version)
        if key not in self._models or key in self._retiring:
            released.set_result(None)
            return
        self._retiring[key] = (released, set(self._live))
        self._broadcast()
        self._release_drained()

    def _release(self, session: _Session, message: Released) -> None:
        retiring = self._retiring.get((message.name, message.version))
        if retiring is not None:
            retiring[1].discard(session.number)
        self._release_drained()

    def _release_drained(self) -> None:
        """Drop each retiring version whose every frontend has released it and whose rows
        are all answered: its engine (and memory) goes with it."""
        for key, (released, holders) in list(self._retiring.items()):
            if not holders & set(self._live) and self.schedulers[key].pending == 0:
                del self._retiring[key], self.schedulers[key], self._models[key]
                released.set_result(None)

    def catalog(self) -> list[EngineModel]:
        """Every version the repository knows: the served ones with their shapes."""
        served = {
            key: EngineModel(key[0], key[1], tuple(e.input_shape), tuple(e.output_shape),
                             e.device, np.dtype(e.numpy_dtype).name)
            for key, (_scheduler, e) in self._models.items()
            if key not in self._retiring
        }  # fmt: skip
        others = [
            EngineModel(s.name, s.version, (), (), "", "", s.state, s.reason)
            for s in (self.repository.statuses() if self.repository else [])
            if (s.name, s.version) not in served
        ]
        return sorted([*served.values(), *others], key=lambda m: (m.name, m.version))

    def _broadcast(self) -> None:
        catalog = self.catalog()
        for session in self._live.values():
            session.send(catalog)

    def _run_calls(self, wakeup: socket.socket) -> None:
        with contextlib.suppress(BlockingIOError):
            wakeup.recv(4096)
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call()

    def _control(self, session: _Session, message: Control) -> None:
        """A frontend's load or unload, on a thread of its own (a load takes seconds to
        minutes, and the repository does one at a time); its outcome goes back to it."""

        def run() -> None:
            try:
                if message.operation not in ("load", "unload"):
                    raise InvalidInput(f"no repository operation {message.operation!r}")
                getattr(self.repository, message.operation)(message.name)
                done = ControlDone(message.control_id)
            except Exception as exc:
                failed = SubBatchAnswer.failed(exc)
                done = ControlDone(message.control_id, failed.error, failed.error_kind)
            self.call(lambda: session.send(done))

        threading.Thread(target=run, name="gradserve-control", daemon=True).start()

    def run(self, listener: socket.socket, wakeup: socket.socket) -> None:
        """Serve until SIGTERM (`wakeup` becomes readable) and every admitted row is done."""
        self._thread = threading.get_ident()
        self._selector.register(listener, selectors.EVENT_READ, self._accept)
        self._selector.register(wakeup, selectors.EVENT_READ, self._stop)
        self._selector.register(self._call_wakeup, selectors.EVENT_READ, self._run_calls)
        self._run_calls(self._call_wakeup)  # any change made while the loop was starting
        while not (self._stopping and self._idle()):
            for key, _ in self._selector.select(self._timeout()):
                key.data(key.fileobj)
            self._run_batch()
            if self._retiring:
                self._release_drained()
        self._thread = None
        self._selector.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except OSError as exc:  # e.g. out of file descriptors: the frontend retries
            log.error("could not accept a frontend: %s", exc, extra={"event": "accept_failed"})
            return
        conn = Connection(sock.detach())
        try:
            if self._stopping:
                raise OSError("stopping")
            conn.send_bytes(messages.encode(self.catalog()))
        except OSError:  # the frontend went away before its greeting
            conn.close()
            return
        self._sessions += 1
        session = _Session(conn, self._sessions, self._config.in_flight)
        self._live[session.number] = session
        self._selector.register(conn, selectors.EVENT_READ, lambda _c: self._read(session))

    def _read(self, session: _Session) -> None:
        """Take in every frame the frontend has sent; end its session at EOF or a bad frame."""
        try:
            for frame in session.frames.frames():
                message = messages.decode(frame)
                if isinstance(message, SubBatch):
                    session.submit(message, self._models)
                elif isinstance(message, Released):
                    self._release(session, message)
                elif isinstance(message, Control):
                    self._control(session, message)
                else:
                    raise messages.BadFrame(f"a frontend sent a {type(message).__name__}")
        except messages.BadFrame as exc:
            log.error("closing a connection that sent a bad frame: %s", exc,
                      extra={"event": "bad_frame"})  # fmt: skip
            self._end(session)
        except (EOFError, OSError):
            self._end(session)

    def _end(self, session: _Session) -> None:
        self._selector.unregister(session.conn)
        self._live.pop(session.number, None)
        session.close()

    def _stop(self, wakeup: socket.socket) -> None:
        wakeup.recv(64)
        self._stopping = True
        for scheduler in self.schedulers.values():
            scheduler.stop_accepting()

    def _idle(self) -> bool:
        return all(scheduler.pending == 0 for scheduler in self.schedulers.values())

    def _timeout(self) -> float | None:
        """How long the sockets may be waited on: not at all while a batch is due; until the
        oldest row's --max-delay-us has passed while one is being gathered; else forever."""
        waits = [self._wait_s(s) for s in self.schedulers.values() if s.queued_rows]
        return min(waits) if waits else (0.5 if self._stopping else None)

    def _wait_s(self, scheduler: Scheduler) -> float:
        if not self._delay_s or scheduler.queued_rows >= scheduler.max_batch_size:
            return 0.0
        return max(0.0, scheduler.oldest_due() + self._delay_s - time.perf_counter())

    def _run_batch(self) -> None:
        """One batch of the next model version (round robin) whose rows are due."""
        keys = list(self.schedulers)
        for i in range(len(keys)):
            key = keys[(self._turn + i) % len(keys)]
            scheduler = self.schedulers[key]
            if scheduler.queued_rows and self._wait_s(scheduler) == 0.0:
                self._turn = (self._turn + i + 1) % len(keys)
                self._run(scheduler, self._models[key][1])
                return

    def _run(self, scheduler: Scheduler, engine: Engine) -> None:
        """One batch; a fault outside the engine call (forming, splitting or answering it)
        fails that batch's requests, not the process."""
        dispatched = time.perf_counter()
        try:
            parts = scheduler.take_batch(dispatched)
            if parts:
                scheduler.execute(parts, engine.run, dispatched)
        except Exception as exc:
            log.exception("a batch failed outside the engine")
            scheduler.fail_held(EngineFailed(f"internal error in the engine process: {exc}"))


def _check_rows(engine: Engine, kind: Derivative, x: np.ndarray, v: np.ndarray | None) -> None:
    """Rows that the model takes, with the vector the kind takes (the frontend validated its
    requests; this guards the engine against a frontend that did not)."""
    width = vector_shape(kind, engine.input_shape, engine.output_shape)
    dtype = np.dtype(engine.numpy_dtype)
    if x.ndim < 1 or tuple(x.shape[1:]) != tuple(engine.input_shape) or x.dtype != dtype:
        raise InvalidInput(f"rows of shape {x.shape} {x.dtype}; the model takes [n, "
                           f"{', '.join(map(str, engine.input_shape))}] {dtype}")  # fmt: skip
    if kind.needs_vector != (v is not None):
        raise InvalidInput(f"{kind.value} {'needs' if kind.needs_vector else 'takes no'} vector")
    if v is not None and (v.shape != (x.shape[0], *width) or v.dtype != dtype):
        raise InvalidInput(f"vectors of shape {v.shape} {v.dtype} for {x.shape[0]} rows")


def _exit_with_parent(parent: Connection, segments: str) -> None:
    """Thread: the supervisor holds the other end; EOF means it died, so this process ends,
    removing the shared-memory segments of the supervisor's children on its way out (the
    supervisor would have)."""
    with contextlib.suppress(EOFError, OSError):
        parent.recv()
    shm.remove_leftovers(segments)
    os._exit(1)


def _listen(address: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(64)
    return listener


def _serve(config: ServerConfig, address: str, parent: Connection, load: Load) -> None:
    metrics = Metrics()
    tracing = Tracing.start(config.trace, "engine")
    loop = _Loop(config, metrics, tracing)
    repository = load(config, metrics)
    loop.repository = repository
    repository.on_change = loop.broadcast
    repository.start(loop, config.poll_seconds)  # the versions to serve at start, loaded here
    schedulers = loop.schedulers
    metrics.queue_rows.set_function(lambda: sum(s.queued_rows for s in schedulers.values()))
    metrics.watch_costs(lambda: [(name, s.costs()) for (name, _v), s in list(schedulers.items())])
    http = metrics.serve("127.0.0.1", 0)
    wakeup, wakeup_writer = socket.socketpair()
    wakeup_writer.setblocking(False)
    signal.set_wakeup_fd(wakeup_writer.fileno())
    signal.signal(signal.SIGTERM, lambda *_: None)  # the wake-up byte does the work
    listener = _listen(address)
    parent.send(("ready", http.server_port))
    segments = f"gradserve-{os.getppid()}-"
    threading.Thread(target=_exit_with_parent, args=(parent, segments), daemon=True).start()
    log.info("engine process serving", extra={"event": "engine_ready", "address": address})
    try:
        loop.run(listener, wakeup)
    finally:
        repository.close()
        listener.close()
        http.shutdown()
        if tracing is not None:
            tracing.close()
    log.info("engine process stopped", extra={"event": "engine_stop"})


def run(config: ServerConfig, address: str, parent: Connection, load: Load) -> None:
    """Entry point of the engine process (spawned by the supervisor); `load` opens its model
    repository (the assembly's: its loader is where TensorFlow is imported)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which orders
    logs.configure(config.log_format, config.log_level)
    try:
        _serve(config, address, parent, load)
    except StartRefused as exc:  # its message says it all: no traceback
        log.error("%s", exc, extra={"event": "start_refused"})
        parent.send(("failed", str(exc)))
        raise SystemExit(1) from exc
    except Exception as exc:
        log.exception("engine process failed")
        parent.send(("failed", f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from exc
