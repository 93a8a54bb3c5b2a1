"""Turn a request's raw tensor bytes into validated rows, or say what is wrong.

Shared by every protocol's servicer; knows numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from gradserve.server.core.errors import InvalidInput


def decode_rows(
    data: bytes,
    shape: Sequence[int],
    dtype: np.dtype,
    row_shape: Sequence[int],
    name: str = "x",
    to: np.dtype = np.float32,
) -> np.ndarray:
    """Validate little-endian row-major `data` of `shape` = [n, *row_shape]; return it as `to`.

    Rejects: a shape that is not [n, *row_shape], n < 1, a byte count that does not match
    the shape, and any NaN or Inf (also after conversion to `to`, where a value beyond its
    range becomes Inf).
    """
    shape = check_shape(shape, row_shape, name)
    itemsize = np.dtype(dtype).itemsize
    expected = math.prod(shape) * itemsize
    if len(data) != expected:
        product = "*".join(str(s) for s in shape)
        raise InvalidInput(
            f"{name} has {len(data)} bytes, but shape {shape} of {np.dtype(dtype).name} "
            f"needs {expected} bytes ({product}*{itemsize})"
        )
    rows = np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported just below
        rows = rows.astype(to, copy=False)
    check_finite(rows, name)
    return rows


def check_shape(shape: Sequence[int], row_shape: Sequence[int], name: str = "x") -> list[int]:
    """Return `shape` if it is [n >= 1, *row_shape]; raise InvalidInput saying what is wrong.
    Its length is checked before anything is done per dimension (a shape may be long)."""
    row = [int(s) for s in row_shape]
    expected = f"[n, {', '.join(str(d) for d in row)}]"
    if len(shape) != len(row) + 1:
        got = f"shape {[int(s) for s in shape]}" if len(shape) <= 8 else f"{len(shape)} dims"
        raise InvalidInput(f"{name} must have shape {expected} ({len(row) + 1} dims); got {got}")
    shape = [int(s) for s in shape]
    if shape[0] < 1:
        raise InvalidInput(f"{name} has shape {shape}: it needs at least one row")
    if shape[1:] != row:
        if len(row) == 1:
            raise InvalidInput(
                f"{name} has shape {shape}: the model expects {row[0]} value(s) per row, "
                f"got {shape[1]}"
            )
        raise InvalidInput(f"{name} has shape {shape}: the model expects rows of shape {row}")
    return shape


def check_finite(rows: np.ndarray, name: str = "x") -> None:
    """Raise InvalidInput naming the count and first position of NaN/Inf values."""
    finite = np.isfinite(rows)
    if not finite.all():
        bad = np.argwhere(~finite)
        where = ", ".join(str(int(i)) for i in bad[0])
        raise InvalidInput(
            f"{name} has {len(bad)} non-finite value(s) (NaN or Inf, or beyond the model's "
            f"float range), first at index [{where}]; every value must be a finite number"
        )
