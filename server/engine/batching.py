"""What every backend's engine does alike with a batch, framework-free: the batch shapes it
compiles (a ladder of padded sizes, or whole tiles of a deterministic engine), padding rows up
to them, splitting more rows than a call takes, and warming every kind up."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from gradserve.server.core import selfcheck
from gradserve.server.core.contract import ModelSpec, Outputs
from gradserve.wire.kinds import Derivative

# The one batch shape a deterministic engine's kernels ever see. It must be a multiple of every
# row block the kernels split a tile into, on every vector level, so that no row of a tile
# falls in a remainder block computed another way: on AVX2, oneDNN's kernels computed rows
# 30-31 of a 32-row tile with other bits (the 2-row remainder of 6-row blocks). 48 passes at
# SSE4.1, AVX, AVX2 and AVX-512, and as a multiple of 16 no elementwise op over a tile has a
# scalar tail at any vector width (tuning log 65); the self-check proves it on each machine.
TILE_ROWS = 48


def batch_ladder(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size (inclusive): the only batch shapes XLA compiles."""
    sizes = [1]
    while sizes[-1] < max_batch_size:
        sizes.append(min(sizes[-1] * 2, max_batch_size))
    return sizes


def ladder(max_batch_size: int, tile: int) -> list[int]:
    """The compiled batch shapes: powers of two up to max_batch_size, or with tiles, a power
    of two of tiles, up to the tiles max_batch_size needs."""
    if not tile:
        return batch_ladder(max_batch_size)
    return [tile * count for count in batch_ladder(-(-max_batch_size // tile))]


def rows_computed(n: int, sizes: list[int], tile: int) -> int:
    """The rows a call with n rows computes: the next of the compiled sizes (so no new shape
    is ever compiled), else a whole number of tiles, else n."""
    if sizes:
        return next(size for size in sizes if size >= n)
    if tile:
        return -(-n // tile) * tile
    return n


def pad(a: np.ndarray, rows: int, dtype: np.dtype) -> np.ndarray:
    """a as `dtype`, with zero rows appended up to `rows`."""
    a = np.asarray(a, dtype=dtype)
    n = a.shape[0]
    if rows == n:
        return a
    padded = np.zeros((rows, *a.shape[1:]), dtype=a.dtype)
    padded[:n] = a
    return padded


def padded(
    kind: Derivative, x: np.ndarray, v: np.ndarray | None, rows: int, dtype: np.dtype
) -> list[np.ndarray]:
    """A call's arguments: x and, for a kind that takes one, its vector v, each as `dtype`
    padded to `rows` rows."""
    args = [pad(x, rows, dtype)]
    if kind.needs_vector:
        if v is None:
            raise ValueError(f"{kind.value} needs a vector v")
        args.append(pad(v, rows, dtype))
    return args


def warm_up(engine, kinds, sizes: Callable[[Derivative], list[int]]) -> float:
    """An engine's `warm_up`: each of `kinds` run once at each of its `sizes` on zero rows
    (and zero vectors), so that everything it compiles or traces is ready before the server
    serves, and a deterministic engine's self-check of each kind has run; returns seconds."""
    start = time.perf_counter()
    spec = ModelSpec.of(engine, engine.max_batch_size, engine.max_batch_size)
    for kind in kinds:
        shape = spec.vector_shape(kind)
        for size in sizes(kind):
            x = np.zeros((size, *engine.input_shape), engine.numpy_dtype)
            v = None if shape is None else np.zeros((size, *shape), engine.numpy_dtype)
            engine.run(kind, x, v)
    return time.perf_counter() - start


Call = Callable[[Derivative, np.ndarray, np.ndarray | None], Outputs]


def in_parts(
    call: Call, kind: Derivative, x: np.ndarray, v: np.ndarray | None, step: int
) -> Outputs:
    """`call` on x (and v) in parts of at most `step` rows, the answers joined (the batcher
    never sends more than a call takes; direct callers such as the benchmark may)."""
    if x.shape[0] <= step:
        return call(kind, x, v)
    parts = [call(kind, x[i : i + step], None if v is None else v[i : i + step])
             for i in range(0, x.shape[0], step)]  # fmt: skip
    dy_dx = None if parts[0].dy_dx is None else np.concatenate([p.dy_dx for p in parts])
    return Outputs(np.concatenate([p.y for p in parts]), dy_dx)


def run_checked(engine, call: Call, checked: set[Derivative], kind: Derivative,
                x: np.ndarray, v: np.ndarray | None) -> Outputs:  # fmt: skip
    """An engine's `run`: `call` on the rows in parts of at most its max batch. A deterministic
    engine's first call of a kind runs the kind's self-check first (SelfCheckFailed: it cannot
    keep its promise here) and adds it to `checked`, so no answer of a kind ever comes before
    its check passed."""
    if engine.tile and kind not in checked:
        spec = ModelSpec.of(engine, engine.tile, engine.tile)
        selfcheck.verify(call, kind, engine.tile, engine.input_shape, spec.vector_shape(kind),
                         engine.numpy_dtype, engine.name)  # fmt: skip
        checked.add(kind)
    return in_parts(call, kind, x, v, engine.max_batch_size)
