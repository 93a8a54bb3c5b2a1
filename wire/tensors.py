"""Tensors on the wire, once for the server and the SDK: bytes <-> numpy (little-endian,
row-major) and the float types as each protocol names them (native `DType`, the standard
protocol's "FP32"/"FP64", Triton's model-config `TYPE_FP32`/`TYPE_FP64`). Imports numpy and
the native messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradserve.v1 import gradserve_pb2 as pb


@dataclass(frozen=True)
class FloatType:
    """One float type as every protocol names it."""

    numpy: np.dtype  # little-endian
    wire: int  # gradserve.v1.DType value
    kserve: str  # the standard protocol's datatype name
    triton_config: str  # Triton ModelConfig DataType name


FLOAT32 = FloatType(np.dtype("<f4"), pb.FLOAT32, "FP32", "TYPE_FP32")
FLOAT64 = FloatType(np.dtype("<f8"), pb.FLOAT64, "FP64", "TYPE_FP64")
FLOAT_TYPES = (FLOAT32, FLOAT64)
_BY_WIRE = {t.wire: t for t in FLOAT_TYPES}
_BY_KSERVE = {t.kserve: t for t in FLOAT_TYPES}


def float_type(dtype: object) -> FloatType:
    """The FloatType of a numpy dtype (or its name); anything but float64 is float32."""
    return FLOAT64 if np.dtype(dtype) == np.float64 else FLOAT32


def by_wire(value: int) -> FloatType | None:
    """The FloatType of a native DType value, or None for one this version does not know."""
    return _BY_WIRE.get(value)


def by_kserve(name: str) -> FloatType | None:
    """The FloatType of a standard-protocol datatype name, or None."""
    return _BY_KSERVE.get(name)


def to_tensor(array: np.ndarray) -> pb.Tensor:
    """Encode a float32 or float64 array (any other dtype becomes float32)."""
    array = np.asarray(array)
    kind = float_type(array.dtype)
    data = np.ascontiguousarray(array, dtype=kind.numpy).tobytes()
    return pb.Tensor(shape=array.shape, dtype=kind.wire, data=data)


def from_tensor(tensor: pb.Tensor) -> np.ndarray:
    """Decode a tensor the server produced (trusted: no validation beyond numpy's)."""
    kind = by_wire(tensor.dtype)
    if kind is None:
        raise ValueError(f"unknown tensor dtype {tensor.dtype}")
    return np.frombuffer(tensor.data, dtype=kind.numpy).reshape(tuple(tensor.shape))
