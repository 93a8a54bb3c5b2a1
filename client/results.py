"""What the SDK hands back, and the request/response conversions both clients share."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradserve.client.errors import GradserveError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import native
from gradserve.wire.kinds import BASELINE, Derivative
from gradserve.wire.status import status_code
from gradserve.wire.tensors import FLOAT64, from_tensor, to_tensor
from gradserve.wire.timing import FIELDS, Hops

# The server's latency breakdown of one request, as the SDK hands it back (Result.timing).
Timing = Hops


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
    """A served model as the server describes it: shapes, dtype, kinds, batch limits."""

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
    version: str = "",
    **options: object,
) -> pb.EvaluateRequest:
    """The request message; `v` is the vector of vjp (y's shape), jvp and hvp (x's shape), or
    k of them per row ([n, k, ...]); `target` an index into the flattened output (gradient and
    the explanations). `options`: the explanation's options (`Derivative.options`:
    integrated_gradients takes baseline and steps; smooth_grad takes samples, noise,
    noise_absolute and seed); None keeps the server's default. `version`: the model's
    version ("": its default, the highest served)."""
    kind = kind_of(derivative)
    if (v is None) == kind.needs_vector:
        raise ValueError(f"v is needed by {_names(k for k in Derivative if k.needs_vector)} "
                         "and only by them")  # fmt: skip
    if target is not None and not kind.takes_target:
        takers = _names(k for k in Derivative if k.takes_target)
        raise ValueError(f"target is for {takers} only, not {derivative!r}")
    allowed = {option.name: option for option in kind.options}
    given = {key: value for key, value in options.items() if value is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ValueError(f"{derivative!r} takes no option {', '.join(unknown)}")
    rows = as_rows(x)
    request = pb.EvaluateRequest(
        id=request_id, x=to_tensor(rows), derivative=native.NUMBER[kind], model=model,
        version=str(version),
    )  # fmt: skip
    if v is not None:
        request.v.CopyFrom(to_tensor(as_rows(v)))
    if target is not None:
        request.target = int(target)
    if kind.explains:
        request.explain.SetInParent()
        for name, value in given.items():
            if name == BASELINE.name:
                request.explain.baseline.CopyFrom(to_tensor(as_baseline(value, rows)))
            else:
                setattr(request.explain, name, allowed[name].type(value))
    return request


def stream_request(
    item: object, derivative: str, request_id: str, model: str, options: dict
) -> pb.EvaluateRequest:
    """One stream message: `item` is x, or (x, v) for the kinds that take a vector."""
    if kind_of(derivative).needs_vector:
        x, v = item
        return make_request(x, derivative, request_id, model, v, **options)
    return make_request(item, derivative, request_id, model, **options)


def kind_of(derivative: str) -> Derivative:
    """The kind a derivative name means (any case); ValueError naming the kinds if none."""
    kind = Derivative.named(derivative)
    if kind is None:
        names = sorted(k.value for k in Derivative)
        raise ValueError(f"derivative must be one of {names}, got {derivative!r}")
    return kind


def _names(kinds) -> str:
    return ", ".join(kind.value for kind in kinds)


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
        timing=Timing(**{name: getattr(t, name) for name in FIELDS}),
        attributions=_optional(response, "attributions"),
        delta=_optional(response, "delta"),
    )


def _optional(response: pb.EvaluateResponse, field: str) -> np.ndarray | None:
    return from_tensor(getattr(response, field)) if response.HasField(field) else None


@dataclass(frozen=True)
class ModelVersion:
    """One model version in the server's repository index: READY (served), LOADING,
    UNLOADING or UNAVAILABLE (failed to load, or retired), and why it is not ready."""

    model: str
    version: str
    state: str
    reason: str = ""


def to_versions(index: pb.RepositoryIndexResponse) -> list[ModelVersion]:
    return [ModelVersion(v.model, v.version, v.state, v.reason) for v in index.versions]


def to_model_info(info: pb.ModelInfo) -> ModelInfo:
    names = {number: kind.value for number, kind in native.KIND.items()}
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
