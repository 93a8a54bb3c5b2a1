"""What the layers agree on: engine outputs, the Engine interface, the served model's shape,
priorities. The derivative kinds themselves are the wire vocabulary's (`gradserve.wire.kinds`).

Free of TensorFlow and protobuf, so every layer can import it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from gradserve.server.core.errors import InvalidInput
from gradserve.wire.kinds import Derivative

Shape = tuple[int, ...]


# What the engine computes in one call; the explanation kinds are built from these.
ENGINE_KINDS = tuple(kind for kind in Derivative if not kind.explains)


class Priority(enum.IntEnum):
    """How urgently a request wants its rows computed: HIGH (interactive) rows go into the
    next batch before any NORMAL (bulk) rows."""

    NORMAL = 0
    HIGH = 1


class Outputs(NamedTuple):
    """One engine call's results: y [n, *Y] and dy_dx (None for Derivative.NONE)."""

    y: np.ndarray
    dy_dx: np.ndarray | None


@dataclass(frozen=True, slots=True)
class BatchHints:
    """What a scheduler behind the engine needs of one batch (the engine process, which
    queues the sub-batches of every frontend): its most urgent priority, and its latest
    deadline on the system's monotonic clock (time.monotonic(), the asyncio loop's clock in
    every process of the machine; None when a request of it has none). A batch past that
    deadline holds no request anyone still waits for."""

    priority: Priority = Priority.NORMAL
    deadline: float | None = None
    traces: tuple[object, ...] = ()  # the spans of its traced requests (opaque here)
    # Whose rows it holds, in order: (caller key, rows) per run of one caller's rows, so that
    # the scheduler behind the engine shares its batches between callers, not between the
    # frontends they happen to reach.
    callers: tuple[tuple[str, int], ...] = ()


class Engine(Protocol):
    """What the server needs of a loaded model (server.engine.Engine; fakes in tests)."""

    name: str
    input_shape: Shape
    output_shape: Shape
    device: str
    # What it can do, declared (never probed): the batch sizes it pads a call to, smallest
    # first (empty: it computes any size as it comes); 0, or how many calls may be awaited at
    # once when `run` returns an awaitable (the engine process's link); and whether `run`
    # takes each batch's hints (BatchHints: the engine process's queue).
    ladder: Sequence[int]
    in_flight: int
    takes_hints: bool

    @property
    def numpy_dtype(self) -> np.dtype: ...

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs: ...

    def batch_cap(self, kind: Derivative) -> int | None:
        """The most rows one call of `kind` should carry now, as the engine schedules them
        itself (the engine process: its own batch cap, as last reported); None: no cap of
        its own beyond the batcher's."""
        ...


def vector_shape(kind: Derivative, input_shape: Shape, output_shape: Shape) -> Shape | None:
    """Per-row shape of the vector `v` a derivative takes: VJP a cotangent shaped like a row
    of y, JVP and HVP a tangent shaped like a row of x; None for the other kinds."""
    if kind is Derivative.VJP:
        return output_shape
    if kind in (Derivative.JVP, Derivative.HVP):
        return input_shape
    return None


def vectors_per_row(kind: Derivative, shape: Shape, given: Sequence[int]) -> Shape:
    """The per-row shape of vectors given as an array of shape `given`: [*shape], one per
    row, or [k, *shape], k tangents per row (k from `given`). The one rule of every protocol;
    InvalidInput, saying both forms, for trailing dimensions that are neither."""
    if len(given) != len(shape) + 2:
        return shape
    if tuple(given[2:]) != tuple(shape) or given[1] < 1:
        raise InvalidInput(vector_forms(kind, shape, given))
    return (int(given[1]), *shape)


def vector_forms(kind: Derivative, shape: Shape, given: Sequence[int]) -> str:
    """Why vectors of shape `given` do not fit, and the two forms that would."""
    dims = ", ".join(map(str, shape))
    return (f"v has shape {list(given)}; {kind.value} takes [n, {dims}] (one tangent per row) "
            f"or [n, k, {dims}] (k >= 1 tangents per row)")  # fmt: skip


@dataclass(frozen=True)
class ModelSpec:
    """What the servicers need to know of a served model, without TensorFlow."""

    name: str
    version: str
    input_shape: Shape
    output_shape: Shape
    device: str
    max_batch_size: int
    max_request_rows: int
    dtype: str = "float32"

    @property
    def input_width(self) -> int:
        return math.prod(self.input_shape)

    @property
    def output_width(self) -> int:
        return math.prod(self.output_shape)

    @classmethod
    def of(
        cls, engine: Engine, max_batch_size: int, max_request_rows: int, version: int = 1
    ) -> ModelSpec:
        return cls(
            name=engine.name,
            version=str(version),
            input_shape=tuple(engine.input_shape),
            output_shape=tuple(engine.output_shape),
            device=engine.device,
            max_batch_size=max_batch_size,
            max_request_rows=max_request_rows,
            dtype=np.dtype(engine.numpy_dtype).name,
        )

    def vector_shape(self, kind: Derivative) -> Shape | None:
        """Per-row shape of the vector `v` the derivative takes, or None."""
        return vector_shape(kind, self.input_shape, self.output_shape)

    def result_row_bytes(self, kind: Derivative) -> int:
        """Bytes of one row's dy_dx for `kind` (0: no derivative): what --max-result-mb
        bounds."""
        result = self.result_shape(kind)
        return 0 if result is None else math.prod(result) * np.dtype(self.dtype).itemsize

    def answer_row_bytes(self, kind: Derivative) -> int:
        """Bytes one row of the answer to `kind` takes, its y and its dy_dx: what admission
        counts."""
        return self.output_width * np.dtype(self.dtype).itemsize + self.result_row_bytes(kind)

    def result_shape(self, kind: Derivative) -> Shape | None:
        """Per-row shape of dy_dx for `kind` (None: no derivative)."""
        x, y = self.input_shape, self.output_shape
        return {
            Derivative.NONE: None,
            Derivative.GRADIENT: x,
            Derivative.JACOBIAN: y + x,
            Derivative.VJP: x,
            Derivative.JVP: y,
            Derivative.HESSIAN: x + x,
            Derivative.HVP: x,
            Derivative.INTEGRATED_GRADIENTS: x,
            Derivative.SMOOTH_GRAD: x,
        }[kind]
