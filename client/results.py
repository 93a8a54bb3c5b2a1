"""What the SDK hands back, and the request/response conversions both clients share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradserve.client.errors import GradserveError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.tensors import FLOAT64, from_tensor, status_code, to_tensor

DERIVATIVES = {
    "gradient": pb.GRADIENT,
    "jacobian": pb.JACOBIAN,
    "none": pb.NONE,
    "vjp": pb.VJP,
    "jvp": pb.JVP,
    "hessian": pb.HESSIAN,
    "hvp": pb.HVP,
    "integrated_gradients": pb.INTEGRATED_GRADIENTS,
    "smooth_grad": pb.SMOOTH_GRAD,
}
NEEDS_VECTOR = ("vjp", "jvp", "hvp")
EXPLANATIONS = ("integrated_gradients", "smooth_grad")
TAKES_TARGET = ("gradient", *EXPLANATIONS)
_IG_OPTIONS = ("baseline", "steps")
_SG_OPTIONS = ("samples", "noise", "seed", "noise_absolute")


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
    vjp [n, *X], jvp [n, *Y], hessian [n, *X, *X], hvp [n, *X]; [n, k, ...] for k tangents
    per row) or None; server timing. The explanation kinds set `attributions` [n, *X] instead
    of dy_dx, and integrated gradients `delta` [n] (sum of attributions - (F(x) - F(baseline)))."""

    id: str
    y: np.ndarray
    dy_dx: np.ndarray | None
    timing: Timing
    attributions: np.ndarray | None = None
    delta: np.ndarray | None = None


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
    x: object,
    derivative: str,
    request_id: str = "",
    model: str = "",
    v: object = None,
    *,
    target: int | None = None,
    **options: object,
) -> pb.EvaluateRequest:
    """The request message; `v` is the vector of vjp (y's shape), jvp and hvp (x's shape), or
    k of them per row ([n, k, ...]); `target` an index into the flattened output (gradient and
    the explanations). `options`: integrated_gradients takes baseline and steps; smooth_grad
    takes samples, noise, seed and noise_absolute (None keeps the server's default)."""
    name = derivative.lower()
    kind = DERIVATIVES.get(name)
    if kind is None:
        raise ValueError(f"derivative must be one of {sorted(DERIVATIVES)}, got {derivative!r}")
    if (v is None) == (name in NEEDS_VECTOR):
        raise ValueError(f"v is needed by {', '.join(NEEDS_VECTOR)} and only by them")
    if target is not None and name not in TAKES_TARGET:
        raise ValueError(f"target is for {', '.join(TAKES_TARGET)} only, not {derivative!r}")
    allowed = {"integrated_gradients": _IG_OPTIONS, "smooth_grad": _SG_OPTIONS}.get(name, ())
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{derivative!r} takes no option {', '.join(unknown)}")
    rows = as_rows(x)
    request = pb.EvaluateRequest(id=request_id, x=to_tensor(rows), derivative=kind, model=model)
    if v is not None:
        request.v.CopyFrom(to_tensor(as_rows(v)))
    if target is not None:
        request.target = int(target)
    if name in EXPLANATIONS:
        request.explain.CopyFrom(_explain(rows, given))
    return request


def _explain(rows: np.ndarray, options: dict[str, object]) -> pb.Explain:
    explain = pb.Explain(
        steps=int(options.get("steps", 0)),
        samples=int(options.get("samples", 0)),
        seed=int(options.get("seed", 0)),
        noise_absolute=bool(options.get("noise_absolute", False)),
    )
    if "noise" in options:
        explain.noise = float(options["noise"])
    if "baseline" in options:
        explain.baseline.CopyFrom(to_tensor(as_baseline(options["baseline"], rows)))
    return explain


def as_baseline(baseline: object, rows: np.ndarray) -> np.ndarray:
    """One baseline row (any shape holding one row's values, e.g. a scalar for a 1-input
    model) becomes [1, *X], broadcast by the server; [n, *X] is sent as is."""
    array = np.asarray(baseline)
    if array.dtype != np.float64:
        array = array.astype(np.float32)
    row = rows.shape[1:]
    if array.ndim < rows.ndim and array.size == int(np.prod(row)):
        return array.reshape(1, *row)
    return array


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
        attributions=_optional(response, "attributions"),
        delta=_optional(response, "delta"),
    )


def _optional(response: pb.EvaluateResponse, field: str) -> np.ndarray | None:
    return from_tensor(getattr(response, field)) if response.HasField(field) else None


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
