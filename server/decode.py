"""Turn a request's raw tensor bytes into validated float32 rows, or say what is wrong.

Shared by every protocol's servicer; knows numpy only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class InvalidInput(ValueError):
    """The request's tensor is malformed; the message says what was expected."""


def decode_rows(
    data: bytes, shape: Sequence[int], dtype: np.dtype, width: int, name: str = "x"
) -> np.ndarray:
    """Validate little-endian row-major `data` of `shape` and return float32 rows [n, width].

    Rejects: a shape that is not [n, d], n < 1, d != width, a byte count that
    does not match the shape, and any NaN or Inf (also after float64 -> float32
    conversion, where a value beyond float32's range becomes Inf).
    """
    n, d = check_shape(shape, width, name)
    itemsize = np.dtype(dtype).itemsize
    expected = n * d * itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"{name} has {len(data)} bytes, but shape {[n, d]} of {np.dtype(dtype).name} "
            f"needs {expected} bytes ({n}*{d}*{itemsize})"
        )
    rows = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(n, d)
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        rows = rows.astype(np.float32, copy=False)
    check_finite(rows, name)
    return rows


def check_shape(shape: Sequence[int], width: int, name: str = "x") -> tuple[int, int]:
    """Return (n, d) for a shape [n >= 1, width]; raise InvalidInput saying what is wrong."""
    shape = [int(s) for s in shape]
    if len(shape) != 2:
        raise InvalidInput(f"{name} must have shape [n, {width}] (2 dims); got shape {shape}")
    n, d = shape
    if n < 1:
        raise InvalidInput(f"{name} has shape {shape}: it needs at least one row")
    if d != width:
        raise InvalidInput(
            f"{name} has shape {shape}: the model expects {width} value(s) per row, got {d}"
        )
    return n, d


def check_finite(rows: np.ndarray, name: str = "x") -> None:
    """Raise InvalidInput naming the count and first position of NaN/Inf values."""
    finite = np.isfinite(rows)
    if not finite.all():
        bad = np.argwhere(~finite)
        row, col = (int(i) for i in bad[0])
        raise InvalidInput(
            f"{name} has {len(bad)} non-finite value(s) (NaN or Inf, or beyond float32 range), "
            f"first at row {row}, column {col}; every value must be a finite number"
        )
