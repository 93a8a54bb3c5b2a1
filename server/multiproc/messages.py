"""What a frontend and the engine process say to each other, and its bytes on their socket.

The engine's catalog (every model version it knows: the ones it serves with their shapes, the
others with their state and why; sent as a greeting and again whenever it changes), a
sub-batch (frontend -> engine, naming its model's version) and its answer (engine ->
frontend), a repository operation (frontend -> engine: load or unload a model) and its
outcome, and a frontend's word that it has released a version the catalog no longer serves
(its last request on it answered). Each is sent as one length-delimited frame of
a versioned binary format, never pickled: whatever can connect to the engine's socket can
at most send a frame that is refused, not code to run. A frame starts with the format's
version and the message's type; strings are length-prefixed UTF-8, numbers little-endian;
an array is referred to by where it lies in the sender's shared-memory segment (shm.py).
A sub-batch names its slot: one of the frontend's in-flight places (a request segment on
its side, an answer segment on the engine's), free again once its answer has been read; the
answer names the same slot, since answers come in the order the engine computes them. A
sub-batch also carries the trace context of each traced request it holds (opaque bytes
here: tracing.py packs and unpacks them), so that the engine's batch span links to them,
and its callers' runs of rows (caller key, rows), so that the engine process shares its
batches between callers, not between frontends.

Knows the standard library only (and shm's ArrayRef).
"""

from __future__ import annotations

import math
import os
import socket
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection

from gradserve.server.core.contract import Priority, Shape
from gradserve.server.core.errors import BY_NAME, EngineFailed, RequestError
from gradserve.server.multiproc.shm import ArrayRef

VERSION = 6
_CATALOG, _SUB_BATCH, _ANSWER, _CONTROL, _CONTROL_DONE, _RELEASED = 1, 2, 3, 4, 5, 6
_HEAD = struct.Struct("<BB")  # version, message type
_U8, _U16, _U32 = struct.Struct("<B"), struct.Struct("<H"), struct.Struct("<I")
_SCHEDULE = struct.Struct("<BdHI")  # priority, deadline (NaN: none), slot, model version
_REF = struct.Struct("<QB")  # offset, number of dimensions


class BadFrame(ValueError):
    """Bytes that are not a message of this format (or of another version of it)."""


_LENGTH = struct.Struct("!i")  # Connection.send_bytes's frame length
MAX_FRAME = 1 << 20  # a message is a header of a few hundred bytes; larger is not one
_CHUNK = 1 << 16


class FrameReader:
    """The frames that have arrived on a connection, taken without blocking and without a
    poll per frame: one non-blocking receive (MSG_DONTWAIT on a duplicate of the socket, so
    that sending on the connection stays blocking) per time the socket is readable, cut into
    the length-prefixed frames Connection.send_bytes writes."""

    def __init__(self, conn: Connection) -> None:
        self._socket = socket.socket(fileno=os.dup(conn.fileno()))
        self._buffer = bytearray()
        self._ended = False

    def frames(self) -> list[bytes]:
        """Every complete frame received so far (perhaps none); EOFError once the other side
        has closed and every frame has been taken; BadFrame for a length no frame has."""
        while not self._ended:
            try:
                chunk = self._socket.recv(_CHUNK, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            self._buffer += chunk
            self._ended = not chunk
            if len(chunk) < _CHUNK:
                break
        frames, buffer, start = [], self._buffer, 0
        while len(buffer) - start >= _LENGTH.size:
            (size,) = _LENGTH.unpack_from(buffer, start)
            if not 0 <= size <= MAX_FRAME:
                raise BadFrame(f"a frame of {size} bytes (at most {MAX_FRAME})")
            end = start + _LENGTH.size + size
            if end > len(buffer):
                break
            frames.append(bytes(buffer[start + _LENGTH.size : end]))
            start = end
        del buffer[:start]
        if not frames and self._ended:
            raise EOFError("the other side closed the connection")
        return frames

    def close(self) -> None:
        self._socket.close()


@dataclass(frozen=True, slots=True)
class EngineModel:
    """What the engine process tells a frontend about each model version it knows: the
    shapes of one it serves (state READY), or the state and reason of one it does not."""

    name: str
    version: int
    input_shape: Shape
    output_shape: Shape
    device: str
    dtype: str
    state: str = "READY"
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Control:
    """Frontend -> engine: `operation` (load, unload) model `name`; `control_id` matches the
    outcome to the call."""

    operation: str
    name: str
    control_id: int


@dataclass(frozen=True, slots=True)
class ControlDone:
    """Engine -> frontend: how an operation ended ("" error: it succeeded)."""

    control_id: int
    error: str = ""
    error_kind: str = ""


@dataclass(frozen=True, slots=True)
class Released:
    """Frontend -> engine: it sends no more sub-batches of this version."""

    name: str
    version: int


@dataclass(frozen=True, slots=True)
class SubBatch:
    """Frontend -> engine: rows of one model and kind, in the frontend's segment, with what
    the engine process schedules them by (core.contract.BatchHints): the most urgent
    priority of their requests and their latest deadline (time.monotonic())."""

    model: str
    kind: str
    path: str
    x: ArrayRef
    v: ArrayRef | None
    priority: int = Priority.NORMAL
    deadline: float | None = None
    slot: int = 0
    version: int = 1
    traces: bytes = b""  # the traced requests' contexts (tracing.pack_contexts)
    callers: tuple[tuple[str, int], ...] = ()  # (caller key, rows) per run, in row order


@dataclass(frozen=True, slots=True)
class SubBatchAnswer:
    """Engine -> frontend: the outputs in the engine's segment, or what went wrong: the
    error's message and its kind (a name in errors.BY_NAME), so that the frontend raises the
    same error and it keeps its status (a full engine queue is RESOURCE_EXHAUSTED, not an
    engine failure to bisect)."""

    path: str = ""
    y: ArrayRef | None = None
    dy_dx: ArrayRef | None = None
    error: str = ""
    error_kind: str = EngineFailed.__name__
    slot: int = 0
    # The engine process's batch cap for the sub-batch's kind after computing it (0: none
    # given), which the frontend's next sub-batches keep to (core/contract.Engine.batch_cap).
    row_cap: int = 0

    @classmethod
    def failed(cls, exc: BaseException, slot: int = 0) -> SubBatchAnswer:
        """The answer for a sub-batch that ended with `exc`: a RequestError as itself; the
        engine failing on the rows (or anything else) as EngineFailed with its cause."""
        if isinstance(exc, RequestError) and not isinstance(exc, EngineFailed):
            return cls(error=str(exc), error_kind=type(exc).__name__, slot=slot)
        return cls(error=str(exc.__cause__ or exc), slot=slot)

    def raise_error(self) -> None:
        """Raise the error this answer carries (none when it carries outputs)."""
        if self.error:
            raise BY_NAME.get(self.error_kind, EngineFailed)(self.error)


Message = list[EngineModel] | SubBatch | SubBatchAnswer | Control | ControlDone | Released


def encode(message: Message) -> bytes:
    """One frame for `message` (a catalog is the list of EngineModels)."""
    if isinstance(message, Control):
        parts = [_HEAD.pack(VERSION, _CONTROL), _U32.pack(message.control_id)]
        parts += [_text(message.operation), _text(message.name)]
    elif isinstance(message, ControlDone):
        parts = [_HEAD.pack(VERSION, _CONTROL_DONE), _U32.pack(message.control_id)]
        parts += [_text(message.error), _text(message.error_kind)]
    elif isinstance(message, Released):
        parts = [_HEAD.pack(VERSION, _RELEASED), _U32.pack(message.version), _text(message.name)]
    elif isinstance(message, SubBatch):
        deadline = math.nan if message.deadline is None else message.deadline
        schedule = _SCHEDULE.pack(message.priority, deadline, message.slot, message.version)
        parts = [_HEAD.pack(VERSION, _SUB_BATCH), schedule]
        parts += [_text(message.model), _text(message.kind), _text(message.path)]
        parts += [_ref(message.x), _ref(message.v), _U32.pack(len(message.traces)), message.traces]
        parts.append(_U32.pack(len(message.callers)))
        parts += [
            part for caller, rows in message.callers for part in (_text(caller), _U32.pack(rows))
        ]
    elif isinstance(message, SubBatchAnswer):
        parts = [_HEAD.pack(VERSION, _ANSWER), _U16.pack(message.slot), _U32.pack(message.row_cap)]
        parts.append(_text(message.path))
        parts.append(_ref(message.y))
        parts += [_ref(message.dy_dx), _text(message.error), _text(message.error_kind)]
    else:
        parts = [_HEAD.pack(VERSION, _CATALOG), _U32.pack(len(message))]
        for model in message:
            parts += [_text(model.name), _U32.pack(model.version)]
            parts += [_shape(model.input_shape), _shape(model.output_shape)]
            parts += [_text(model.device), _text(model.dtype), _text(model.state)]
            parts.append(_text(model.reason))
    return b"".join(parts)


def decode(frame: bytes) -> Message:
    """The message in `frame`; BadFrame if it is not one of this version."""
    reader = _Reader(frame)
    try:
        version, kind = reader.unpack(_HEAD)
        if version != VERSION:
            raise BadFrame(f"frame of format version {version}; this process speaks {VERSION}")
        message = _DECODERS[kind](reader) if kind in _DECODERS else None
        if message is None or reader.pos != len(frame):
            raise BadFrame(f"not a message of format version {VERSION}")
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise BadFrame(f"malformed frame ({len(frame)} bytes): {exc}") from None
    return message


def _text(value: str) -> bytes:
    data = value.encode()
    return _U32.pack(len(data)) + data


def _shape(shape: Shape) -> bytes:
    return _U8.pack(len(shape)) + struct.pack(f"<{len(shape)}Q", *shape)


def _ref(ref: ArrayRef | None) -> bytes:
    if ref is None:
        return _U8.pack(0)
    dims = struct.pack(f"<{len(ref.shape)}Q", *ref.shape)
    return _U8.pack(1) + _REF.pack(ref.offset, len(ref.shape)) + dims + _text(ref.dtype)


class _Reader:
    """Reads a frame front to back; struct.error when it ends too soon."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.pos = 0

    def unpack(self, layout: struct.Struct) -> tuple:
        values = layout.unpack_from(self.data, self.pos)
        self.pos += layout.size
        return values

    def dims(self, n: int) -> tuple[int, ...]:
        return self.unpack(struct.Struct(f"<{n}Q"))

    def raw(self) -> bytes:
        (n,) = self.unpack(_U32)
        if self.pos + n > len(self.data):
            raise struct.error("a string runs past the frame's end")
        value = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return value

    def text(self) -> str:
        return self.raw().decode()

    def shape(self) -> Shape:
        (n,) = self.unpack(_U8)
        return self.dims(n)

    def ref(self) -> ArrayRef | None:
        (present,) = self.unpack(_U8)
        if present == 0:
            return None
        if present != 1:
            raise ValueError("an array reference's flag is neither 0 nor 1")
        offset, n = self.unpack(_REF)
        shape = self.dims(n)
        return ArrayRef(offset, shape, self.text())


def _sub_batch(reader: _Reader) -> SubBatch:
    priority, deadline, slot, version = reader.unpack(_SCHEDULE)
    model, kind, path = reader.text(), reader.text(), reader.text()
    x = reader.ref()
    if x is None:
        raise ValueError("a sub-batch without rows")
    v = reader.ref()
    traces = reader.raw()
    (runs,) = reader.unpack(_U32)
    if runs > x.shape[0]:
        raise ValueError(f"{runs} callers' runs for {x.shape[0]} rows")
    callers = tuple((reader.text(), reader.unpack(_U32)[0]) for _ in range(runs))
    if callers and sum(rows for _, rows in callers) != x.shape[0]:
        raise ValueError(f"callers' runs of {sum(r for _, r in callers)} rows for {x.shape[0]}")
    deadline = None if math.isnan(deadline) else deadline
    return SubBatch(model, kind, path, x, v, priority, deadline, slot, version, traces, callers)


def _answer(reader: _Reader) -> SubBatchAnswer:
    (slot,), (row_cap,) = reader.unpack(_U16), reader.unpack(_U32)
    path, y, dy_dx = reader.text(), reader.ref(), reader.ref()
    return SubBatchAnswer(path, y, dy_dx, reader.text(), reader.text(), slot, row_cap)


def _catalog(reader: _Reader) -> list[EngineModel]:
    (count,) = reader.unpack(_U32)
    return [
        EngineModel(reader.text(), reader.unpack(_U32)[0], reader.shape(), reader.shape(),
                    reader.text(), reader.text(), reader.text(), reader.text())
        for _ in range(count)
    ]  # fmt: skip


def _control(reader: _Reader) -> Control:
    (control_id,) = reader.unpack(_U32)
    return Control(reader.text(), reader.text(), control_id)


def _control_done(reader: _Reader) -> ControlDone:
    (control_id,) = reader.unpack(_U32)
    return ControlDone(control_id, reader.text(), reader.text())


def _released(reader: _Reader) -> Released:
    (version,) = reader.unpack(_U32)
    return Released(reader.text(), version)


_DECODERS = {
    _CATALOG: _catalog,
    _SUB_BATCH: _sub_batch,
    _ANSWER: _answer,
    _CONTROL: _control,
    _CONTROL_DONE: _control_done,
    _RELEASED: _released,
}
