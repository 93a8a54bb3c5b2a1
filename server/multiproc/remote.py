"""The engine process as a frontend sees it: one RemoteEngine per served model version, and
the engine's model repository (RemoteOwner) as the frontend's owner of its models.

A frontend process runs the same servicers and batchers as a single-process server; only
its engines are these stand-ins, whose `run` hands the frontend's micro-batch (a sub-batch)
to the engine process and waits for its outputs. The engine process merges sub-batches
from every frontend into its own device calls. No TensorFlow here.

A frontend keeps up to `window` sub-batches in flight (shared by all its models): each
takes a free slot, its rows are written into that slot's segment and a frame is sent from
the event loop's thread; the loop also reads the answers when the socket is readable (in
whatever order the engine process computes them: a HIGH sub-batch overtakes), copies each
answer's outputs out of the engine's segment for that slot and resolves its future, which
frees the slot; outputs of COPY_OFF_LOOP bytes or more are copied on a worker thread, so
that a large answer does not hold up the loop's other callers. A slot whose call was
cancelled stays taken until its answer arrives, so neither side ever writes memory the
other may still read.

The engine process sends its catalog again whenever the served versions change: the frontend
serves each new version as it is listed, and stops routing to a version the catalog no longer
lists; once its last request on that version is answered it tells the engine (Released), which
frees the version when every frontend has.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection

import numpy as np

from gradserve.server.core.contract import BatchHints, Outputs
from gradserve.server.core.errors import BY_NAME, EngineFailed, EngineUnavailable, RequestError
from gradserve.server.core.repository import READY, Host, VersionStatus
from gradserve.server.multiproc import messages
from gradserve.server.multiproc.messages import (
    Control,
    ControlDone,
    EngineModel,
    Released,
    SubBatch,
    SubBatchAnswer,
)
from gradserve.server.multiproc.shm import Mapped, Segment
from gradserve.server.tracing import pack_contexts
from gradserve.wire.kinds import Derivative

log = logging.getLogger(__name__)
_GONE = "the engine process is gone; this server is stopping: retry (another replica)"
_CONNECT_RETRY_S = 0.05
_NO_HINTS = BatchHints()
COPY_OFF_LOOP = 1 << 20  # bytes of outputs from which an answer is copied on a worker thread


class EngineLink:
    """A frontend's connection to the engine process, shared by its RemoteEngines."""

    def __init__(self, address: str, on_lost: Callable[[], None], window: int) -> None:
        self._conn: Connection = Client(address, family="AF_UNIX")
        prefix = f"gradserve-{os.getppid()}-f{os.getpid()}"
        self._segments = [Segment(f"{prefix}s{slot}") for slot in range(window)]
        self._answers = [Mapped() for _ in range(window)]
        self._waiting: dict[int, asyncio.Future[tuple[Outputs, int]]] = {}
        self._free: asyncio.Queue[int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._copies: set[asyncio.Task[None]] = set()
        self._on_lost = on_lost
        self._on_catalog: Callable[[list[EngineModel]], None] = lambda _c: None
        self._controls: dict[int, asyncio.Future[None]] = {}
        self._control_ids = itertools.count(1)
        self.window = window
        self.lost = False
        self.catalog: list[EngineModel] = messages.decode(self._conn.recv_bytes())
        self._frames = messages.FrameReader(self._conn)

    @classmethod
    def connect(
        cls, address: str, on_lost: Callable[[], None], abandon: threading.Event, window: int
    ) -> EngineLink:
        """Wait until the engine process listens at `address`, then connect; give up
        (RuntimeError) if `abandon` is set first."""
        while not abandon.is_set():
            try:
                return cls(address, on_lost, window)
            except (FileNotFoundError, ConnectionRefusedError):
                abandon.wait(_CONNECT_RETRY_S)
        raise RuntimeError("stopped before the engine process was ready")

    def start(
        self, loop: asyncio.AbstractEventLoop, on_catalog: Callable[[list[EngineModel]], None]
    ) -> None:
        """Loop: the free slots, and reading whenever the socket is readable; each catalog
        that comes goes to `on_catalog`."""
        self._loop = loop
        self._on_catalog = on_catalog
        self._free = asyncio.Queue()
        for slot in range(self.window):
            self._free.put_nowait(slot)
        self._loop.add_reader(self._conn.fileno(), self._read)

    async def control(self, operation: str, name: str) -> None:
        """Ask the engine process to load or unload model `name`; its error, if it failed."""
        if self.lost:
            raise EngineUnavailable(_GONE)
        control_id = next(self._control_ids)
        future = self._controls[control_id] = self._loop.create_future()
        try:
            self._conn.send_bytes(messages.encode(Control(operation, name, control_id)))
        except OSError as exc:
            self._lose(exc)
        await future

    def release(self, name: str, version: int) -> None:
        """Loop: this frontend sends no more of this version (its last request answered)."""
        if not self.lost:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(messages.encode(Released(name, version)))

    async def exchange(
        self,
        model: str,
        version: int,
        kind: Derivative,
        x: np.ndarray,
        v: np.ndarray | None,
        hints: BatchHints,
    ) -> tuple[Outputs, int]:
        """Send one sub-batch in a free slot and wait for its outputs, and the engine
        process's batch cap for `kind` it reported with them (0: none)."""
        slot = await self._free.get()
        if self.lost:
            self._free.put_nowait(slot)
            raise EngineUnavailable(_GONE)
        try:
            path, (x_ref, v_ref) = self._segments[slot].write([x, v])
        except BaseException:
            self._free.put_nowait(slot)  # nothing was sent: the slot is free again
            raise
        traces = pack_contexts(hints.traces) if hints.traces else b""
        message = SubBatch(model, kind.value, path, x_ref, v_ref, int(hints.priority),
                           hints.deadline, slot, version, traces, hints.callers)  # fmt: skip
        future = self._loop.create_future()
        self._waiting[slot] = future
        try:
            self._conn.send_bytes(messages.encode(message))
        except OSError as exc:
            self._lose(exc)
        return await future

    def _read(self) -> None:
        """Loop (the connection is readable): each answer in, its outputs copied out of the
        engine's segment (which it reuses for the slot's next answer), its call resolved."""
        try:
            for frame in self._frames.frames():
                answer = messages.decode(frame)
                if isinstance(answer, list):
                    self.catalog = answer
                    self._on_catalog(answer)
                    continue
                if isinstance(answer, ControlDone):
                    self._control_done(answer)
                    continue
                if not isinstance(answer, SubBatchAnswer) or not 0 <= answer.slot < self.window:
                    raise messages.BadFrame("the engine process sent no answer of a slot")
                if _output_bytes(answer) >= COPY_OFF_LOOP:
                    copy = self._loop.create_task(self._copy_then_resolve(answer))
                    self._copies.add(copy)
                    copy.add_done_callback(self._copies.discard)
                else:
                    self._resolve(answer, self._outcome(answer))
        except (EOFError, OSError, messages.BadFrame) as exc:
            self._loop.remove_reader(self._conn.fileno())
            self._lose(exc)

    def _control_done(self, done: ControlDone) -> None:
        future = self._controls.pop(done.control_id, None)
        if future is None or future.done():
            return
        if done.error:
            future.set_exception(BY_NAME.get(done.error_kind, EngineFailed)(done.error))
        else:
            future.set_result(None)

    async def _copy_then_resolve(self, answer: SubBatchAnswer) -> None:
        self._resolve(answer, await asyncio.to_thread(self._outcome, answer))

    def _outcome(self, answer: SubBatchAnswer) -> Outputs | Exception:
        """The answer's outputs, copied out, or the error its call ends with (whatever went
        wrong, so that the call and its slot never wait for good)."""
        try:
            answer.raise_error()
            mapped = self._answers[answer.slot]
            dy_dx = mapped.view(answer.path, answer.dy_dx)
            y = np.array(mapped.view(answer.path, answer.y))
            return Outputs(y, None if dy_dx is None else np.array(dy_dx))
        except RequestError as exc:
            return exc
        except Exception as exc:
            log.error("could not read an answer of the engine process: %s", exc,
                      extra={"event": "answer_unreadable"})  # fmt: skip
            return EngineUnavailable(f"the engine process's answer could not be read ({exc})")

    def _resolve(self, answer: SubBatchAnswer, outcome: Outputs | Exception) -> None:
        """Loop: the slot's answer is in; free the slot (cancelled calls included)."""
        future = self._waiting.pop(answer.slot, None)
        if future is None:  # none waits on it (the engine was lost): the slot is free already
            return
        self._free.put_nowait(answer.slot)
        if future.done():
            return
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result((outcome, answer.row_cap))

    def _lose(self, exc: BaseException) -> None:
        """Loop: the engine process is gone; every call in flight fails UNAVAILABLE."""
        if self.lost:
            return
        self.lost = True
        log.error("lost the engine process: %s", exc, extra={"event": "engine_lost"})
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(EngineUnavailable(_GONE))
        self._waiting.clear()
        for future in self._controls.values():
            if not future.done():
                future.set_exception(EngineUnavailable(_GONE))
        self._controls.clear()
        for slot in range(self.window):  # wake every caller waiting for a slot
            self._free.put_nowait(slot)
        self._on_lost()

    def close(self) -> None:
        if self._loop is not None and not self._conn.closed and not self._loop.is_closed():
            self._loop.remove_reader(self._conn.fileno())
        self._conn.close()
        self._frames.close()
        for segment in self._segments:
            segment.close()
        for mapped in self._answers:
            mapped.close()


def _output_bytes(answer: SubBatchAnswer) -> int:
    refs = [ref for ref in (answer.y, answer.dy_dx) if ref is not None]
    return sum(math.prod(ref.shape) * np.dtype(ref.dtype).itemsize for ref in refs)


class RemoteEngine:
    """One model of the engine process, with the interface of a local Engine except that
    `run` is a coroutine and up to `in_flight` calls may await at once (the batcher keeps
    that many sub-batches outstanding); its batcher passes it each batch's BatchHints, for
    the engine process's queue."""

    takes_hints = True
    ladder = ()  # the engine process pads; its frontends need not know to what

    def __init__(self, link: EngineLink, info: EngineModel) -> None:
        self._link = link
        self.name = info.name
        self.version = info.version
        self.input_shape = info.input_shape
        self.output_shape = info.output_shape
        self.device = info.device
        self.numpy_dtype = np.dtype(info.dtype)
        self.in_flight = link.window
        self._caps: dict[Derivative, int] = {}

    def batch_cap(self, kind: Derivative) -> int | None:
        """The engine process's batch cap for `kind`, as its last answer reported it: a
        larger sub-batch would be answered only after several of its batches, holding every
        caller in it (a 1-row caller's included) until the last (tuning log 72)."""
        return self._caps.get(kind)

    async def run(
        self,
        kind: Derivative,
        x: np.ndarray,
        v: np.ndarray | None = None,
        hints: BatchHints | None = None,
    ) -> Outputs:
        link = self._link
        outputs, cap = await link.exchange(self.name, self.version, kind, x, v, hints or _NO_HINTS)
        if cap:
            self._caps[kind] = cap
        return outputs


class RemoteOwner:
    """The engine process's model repository as a frontend's owner of its models: it serves
    what each catalog lists, reports its index, and forwards load and unload."""

    def __init__(self, connect: Callable[[], EngineLink], loop: asyncio.AbstractEventLoop) -> None:
        self._connect = connect
        self._loop = loop
        self.link: EngineLink | None = None
        self._host: Host | None = None
        self._serving: set[tuple[str, int]] = set()
        self._statuses: list[VersionStatus] = []

    def start(self, host: Host, poll_seconds: float = 0.0) -> None:
        """Worker thread: connect (waiting for the engine process), then serve its catalog."""
        self.link = self._connect()
        self._host = host

        async def begin() -> None:
            self.link.start(self._loop, self._apply)
            self._apply(self.link.catalog)

        asyncio.run_coroutine_threadsafe(begin(), self._loop).result()

    def _apply(self, catalog: list[EngineModel]) -> None:
        """Loop: serve the versions newly listed READY; retire those no longer listed."""
        self._statuses = [VersionStatus(m.name, m.version, m.state, m.reason) for m in catalog]
        ready = {(m.name, m.version): m for m in catalog if m.state == READY}
        for key in sorted(ready.keys() - self._serving):
            self._host.serve(*key, RemoteEngine(self.link, ready[key]))
            self._serving.add(key)
        for key in sorted(self._serving - ready.keys()):
            self._serving.discard(key)
            released = self._host.retire(*key)
            released.add_done_callback(lambda _f, key=key: self._released(key))

    def _released(self, key: tuple[str, int]) -> None:
        self._loop.call_soon_threadsafe(self.link.release, *key)

    def statuses(self) -> list[VersionStatus]:
        return list(self._statuses)

    async def request(self, operation: str, name: str) -> None:
        await self.link.control(operation, name)

    def close(self) -> None:
        """Nothing to stop here: the frontend closes the link."""
