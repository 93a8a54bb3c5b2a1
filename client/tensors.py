"""numpy <-> gradserve.v1.Tensor: little-endian, row-major bytes plus shape and dtype."""

from __future__ import annotations

import numpy as np

from gradserve.v1 import gradserve_pb2 as pb

_NUMPY_TYPES = {pb.FLOAT32: np.dtype("<f4"), pb.FLOAT64: np.dtype("<f8")}


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode a float32 or float64 array (any other dtype becomes float32)."""
    array = np.asarray(array)
    dtype = pb.FLOAT64 if array.dtype == np.float64 else pb.FLOAT32
    data = np.ascontiguousarray(array, dtype=_NUMPY_TYPES[dtype]).tobytes()
    return pb.Tensor(shape=array.shape, dtype=dtype, data=data)


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """Decode a tensor the server produced (trusted: no validation beyond numpy's)."""
    dtype = _NUMPY_TYPES.get(tensor.dtype)
    if dtype is None:
        raise ValueError(f"unknown tensor dtype {tensor.dtype}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(tuple(tensor.shape))


def numpy_dtype(dtype: int) -> np.dtype | None:
    """The numpy dtype of a wire DType value, or None for a value this version does not know."""
    return _NUMPY_TYPES.get(dtype)
