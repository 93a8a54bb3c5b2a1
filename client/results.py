"""What the SDK hands back, and the request/response conversions both clients share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradserve.client.errors import GradserveError
from gradserve.codec import FLOAT64, from_tensor, status_code, to_tensor
from gradserve.v1 import gradserve_pb2 as pb

DERIVATIVES = {
    "gradient": pb.GRADIENT,
    "jacobian": pb.JACOBIAN,
    "none": pb.NONE,
    "vjp": pb.VJP,
    "jvp": pb.JVP,
    "hessian": pb.HESSIAN,
    "hvp": pb.HVP,
}
NEEDS_VECTOR = ("vjp", "jvp", "hvp")


@dataclass(frozen=True)
class Timing:
    """The server's latency breakdown of one request, in microseconds, and the rows of its
    (largest) batch: decode (arrival to queued), queue (to dispatched in a batch), handoff
    (to engine start), compute (engine), encode (engine end to answer); total is arrival to
    answer inside the server."""

    queue_us: int
    compute_us: int
    batch_rows: int
    decode_us: int = 0
    handoff_us: int = 0
    encode_us: int = 0
    total_us: int = 0


@dataclass(frozen=True)
class Result:
    """y [n, *Y]; dy_dx shaped per derivative (gradient [n, *X], jacobian [n, *Y, *X],
    vjp [n, *X], jvp [n, *Y], hessian [n, *X, *X], hvp [n, *X]) or None; server timing."""

    id: str
    y: np.ndarray
    dy_dx: np.ndarray | None
    timing: Timing


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    input_width: int
    output_width: int
    derivatives: tuple[str, ...]
    device: str
    max_batch_size: int
    max_request_rows: int
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()
    dtype: str = "float32"


def as_rows(x: object) -> np.ndarray:
    """A scalar, a 1-D array (one value per row of a 1-input model) or [n, d] -> [n, d].

    float64 stays float64 on the wire (the server converts); other types become float32.
    """
    array = np.asarray(x)
    if array.dtype != np.float64:
        array = array.astype(np.float32)
    if array.ndim == 0:
        return array.reshape(1, 1)
    if array.ndim == 1:
        return array.reshape(-1, 1)
    return array


def make_request(
    x: object, derivative: str, request_id: str = "", model: str = "", v: object = None
) -> pb.EvaluateRequest:
    """The request message; `v` is the vector of vjp (y's shape), jvp and hvp (x's shape)."""
    kind = DERIVATIVES.get(derivative.lower())
    if kind is None:
        raise ValueError(f"derivative must be one of {sorted(DERIVATIVES)}, got {derivative!r}")
    if (v is None) == (derivative.lower() in NEEDS_VECTOR):
        raise ValueError(f"v is needed by {', '.join(NEEDS_VECTOR)} and only by them")
    request = pb.EvaluateRequest(
        id=request_id, x=to_tensor(as_rows(x)), derivative=kind, model=model
    )
    if v is not None:
        request.v.CopyFrom(to_tensor(as_rows(v)))
    return request


def to_result(response: pb.EvaluateResponse) -> Result:
    """Decode a response; a stream response that carries an error raises GradserveError."""
    if response.HasField("error"):
        raise GradserveError(status_code(response.error.code), response.error.message, response.id)
    t = response.timing
    return Result(
        id=response.id,
        y=from_tensor(response.y),
        dy_dx=from_tensor(response.dy_dx) if response.HasField("dy_dx") else None,
        timing=Timing(
            t.queue_us,
            t.compute_us,
            t.batch_rows,
            t.decode_us,
            t.handoff_us,
            t.encode_us,
            t.total_us,
        ),
    )


def to_model_info(info: pb.ModelInfo) -> ModelInfo:
    names = {v: k for k, v in DERIVATIVES.items()}
    return ModelInfo(
        name=info.name,
        version=info.version,
        input_width=info.input_width,
        output_width=info.output_width,
        derivatives=tuple(names.get(d, str(d)) for d in info.derivatives),
        device=info.device,
        max_batch_size=info.max_batch_size,
        max_request_rows=info.max_request_rows,
        input_shape=tuple(info.input_shape),
        output_shape=tuple(info.output_shape),
        dtype="float64" if info.dtype == FLOAT64.wire else "float32",
    )
