"""Explanations and multi-tangent products, as ordinary rows for the batcher.

A request of n input rows is expanded here into more rows of a kind the engine computes, the
rows are submitted to the model's batcher like any caller's (so they share device calls with
other callers' rows of the same kind and are split past the batch size), and the result is
reduced back to n rows before it is answered:

- `target` t (gradient and the explanation kinds): the derivative of output t of the flattened
  per-row output instead of the sum of outputs: a VJP whose cotangent is one-hot at t.
- Integrated gradients: `steps` + 1 points on the straight path from the baseline b to x,
  x_j = b + (j / steps) (x - b) for j = 0..steps (the first is b and the last is x exactly),
  each a GRADIENT row (or a one-hot VJP row for a target). The path integral of the gradient is
  taken by composite Simpson's rule (see `quadrature_weights`), so
  attributions = (x - b) * sum_j w_j dF/dx(x_j). For a smooth model its error falls as
  1/steps^4. The end points give F(b) and F(x) without extra rows:
  delta = sum(attributions) - (F(x) - F(b)).
- SmoothGrad: the mean gradient over `samples` copies x + N(0, sigma^2), drawn with
  numpy.random.default_rng(seed) in the shape [n, samples, *X], so a seed reproduces a
  result. sigma = noise * (max(x_i) - min(x_i)) per row (the noise level of the SmoothGrad
  paper), or sigma = noise when `noise_absolute`. One extra clean row per input gives y = F(x).
- k tangents per row (vjp, jvp, hvp with v of shape [n, k, *V]): x is repeated k times, the
  n*k rows computed, and the answer reshaped to [n, k, ...]; y is F(x) once per row.

Reductions run in float64 and are returned in the model's float type.

This module knows numpy, the contract and the batcher's `submit` only: no gRPC, no protobuf,
no TensorFlow.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradserve.server.core.batcher import RequestResult
from gradserve.server.core.contract import ModelSpec, vector_forms, vectors_per_row
from gradserve.server.core.errors import InvalidInput, QueueFull, RequestTooLarge
from gradserve.server.core.timing import SchedulerTiming
from gradserve.wire.kinds import (
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    TARGET,
    Derivative,
    takers,
)
from gradserve.wire.limits import MIB

# batcher.submit(x, kind, deadline, v, **admission) -> future of the rows' RequestResult;
# raises when not admitted.
Submit = Callable[..., "asyncio.Future[RequestResult]"]


class InvalidRequest(InvalidInput):
    """The request's options do not make sense for its kind or model (INVALID_ARGUMENT)."""


class ExpansionTooLarge(InvalidRequest):
    """The expanded request can never be admitted; the message says what would fit."""


@dataclass(frozen=True)
class Options:
    """What a request adds to (kind, x, v): its target and explanation options, named as in
    `gradserve.wire.kinds` (defaults too)."""

    target: int | None = None
    steps: int = DEFAULT_STEPS
    baseline: np.ndarray | None = None  # [n, *X] or [1, *X] (broadcast); None: zeros
    samples: int = DEFAULT_SAMPLES
    noise: float = DEFAULT_NOISE
    noise_absolute: bool = False
    seed: int = 0


@dataclass(frozen=True)
class Limits:
    """The server's bounds an expansion must respect (in expanded rows)."""

    max_rows: int  # rows one request may hold in the queue (--max-queue-rows)
    max_result_bytes: int  # bytes of the expanded result held at once (--max-result-mb)


@dataclass(frozen=True)
class Reduced:
    """A reduced answer: y [n, *Y]; dy_dx for derivative kinds ([n, k, ...] for k tangents);
    attributions [n, *X] for the explanation kinds; delta [n] for integrated gradients."""

    y: np.ndarray
    dy_dx: np.ndarray | None
    timing: SchedulerTiming
    attributions: np.ndarray | None = None
    delta: np.ndarray | None = None


@dataclass(frozen=True)
class Work:
    """The rows to queue for one request, and how their RequestResult becomes its answer."""

    kind: Derivative  # what the engine computes for the rows
    x: np.ndarray
    v: np.ndarray | None
    per_row: int  # queued rows per input row
    reduce: Callable[[RequestResult], Reduced] | None  # None: the RequestResult is the answer
    what: str  # the expansion in words, for limit messages
    fewer: str  # what else to lower when even one input row does not fit

    @property
    def rows(self) -> int:
        """The request's own rows, before any expansion."""
        return self.x.shape[0] // self.per_row

    @property
    def expanded(self) -> bool:
        return self.reduce is not None


def expand(
    spec: ModelSpec,
    limits: Limits,
    kind: Derivative,
    x: np.ndarray,
    v: np.ndarray | None = None,
    options: Options | None = None,
) -> Work:
    """The rows to queue for a request of `kind` at rows x (and v): plain rows as they are;
    a target, an explanation or k tangents expanded. Raises InvalidRequest (options that do
    not make sense for the kind or model) or ExpansionTooLarge (an expansion that can never
    be admitted, saying what would fit)."""
    work = _expanded(spec, kind, x, v, options or Options())
    if work.reduce is not None:
        check_limits(work, spec, limits, x.shape[0])
    return work


def submit(
    work: Work, submit_rows: Submit, deadline: float | None = None, **admission: Any
) -> asyncio.Future[RequestResult] | asyncio.Future[Reduced]:
    """Queue the work's rows; the future resolves to the Reduced answer (or to the batcher's
    RequestResult when nothing was expanded).

    `admission` (the batcher's `caller` and `priority`) is passed on with the rows as
    queued, expanded or not: the expanded rows are queued as their caller's, at its
    priority, and the batcher counts their bytes (rows, vectors, expanded results) against
    its memory budget. Raises at once, queueing nothing, the batcher's own refusals
    (QueueFull and RequestTooLarge then also say what the rows were expanded from).
    """
    if work.reduce is None:
        return submit_rows(work.x, work.kind, deadline, work.v, **admission)
    try:
        rows = submit_rows(work.x, work.kind, deadline, work.v, **admission)
    except (QueueFull, RequestTooLarge) as refused:
        raise type(refused)(f"{refused} (the request is {work.what})") from None
    return asyncio.ensure_future(_reduced(rows, work.reduce))


async def _reduced(
    rows: asyncio.Future[RequestResult], reduce: Callable[[RequestResult], Reduced]
) -> Reduced:
    # Cancelling this task cancels `rows`, which withdraws its undispatched rows.
    return reduce(await rows)


def check_applicable(kind: Derivative, given: Iterable[str], what: str) -> None:
    """Refuse options (or a target) that `kind` does not take, naming the kinds that do;
    `what` is how the protocol calls them ("parameter", "explain option")."""
    taken = {option.name for option in kind.options}
    if kind.takes_target:
        taken.add(TARGET.name)
    extra = sorted(set(given) - taken)
    if extra:
        owners = "; ".join(f"{name} is for {_kind_names(takers(name))}" for name in extra)
        raise InvalidRequest(
            f"{what}(s) {extra} do not apply to derivative {kind.value!r} ({owners})"
        )


def _kind_names(kinds: Iterable[Derivative]) -> str:
    names = [kind.value for kind in kinds]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _expanded(
    spec: ModelSpec, kind: Derivative, x: np.ndarray, v: np.ndarray | None, options: Options
) -> Work:
    n = x.shape[0]
    target = _checked_target(spec, kind, options.target)
    if kind is Derivative.INTEGRATED_GRADIENTS:
        return _integrated_gradients(spec, x, options, target)
    if kind is Derivative.SMOOTH_GRAD:
        return _smooth_grad(spec, x, options, target)
    if target is not None:  # a gradient of one output
        return Work(Derivative.VJP, x, one_hot(n, spec.output_shape, target, x.dtype), 1,
                    None, f"{n} rows", "")  # fmt: skip
    k = tangent_count(spec, kind, v)
    if k is None:
        return Work(kind, x, v, 1, None, f"{n} rows", "")
    return _tangents(spec, kind, x, v, k)


def _checked_target(spec: ModelSpec, kind: Derivative, target: int | None) -> int | None:
    if target is None:
        return None
    if not kind.takes_target:
        raise InvalidRequest(
            f"target is for {_kind_names(takers(TARGET.name))}, not {kind.value} "
            "(vjp takes any output weighting as v)"
        )
    if not 0 <= target < spec.output_width:
        raise InvalidRequest(
            f"target {target} is out of range: the model has {spec.output_width} output(s) "
            f"per row (shape {list(spec.output_shape)}, flattened); use 0..{spec.output_width - 1}"
        )
    return target


def tangent_count(spec: ModelSpec, kind: Derivative, v: np.ndarray | None) -> int | None:
    """k when v carries k tangents per row ([n, k, *V]); None for one per row ([n, *V])."""
    shape = spec.vector_shape(kind)
    if v is None or shape is None:
        return None
    try:
        per_row = vectors_per_row(kind, shape, v.shape)
    except InvalidInput as exc:  # a request's own error here, as every check of this module
        raise InvalidRequest(str(exc)) from None
    if v.ndim != 1 + len(per_row):
        raise InvalidRequest(vector_forms(kind, shape, v.shape))
    return int(per_row[0]) if len(per_row) > len(shape) else None


def one_hot(rows: int, output_shape: tuple[int, ...], target: int, dtype) -> np.ndarray:
    """Cotangents [rows, *Y] selecting flattened output `target` of every row."""
    v = np.zeros((rows, math.prod(output_shape)), dtype)
    v[:, target] = 1
    return v.reshape(rows, *output_shape)


def _derivative_rows(spec: ModelSpec, rows: np.ndarray, target: int | None):
    """(kind, v) that differentiate the sum of outputs, or output `target`, at `rows`."""
    if target is None:
        return Derivative.GRADIENT, None
    return Derivative.VJP, one_hot(rows.shape[0], spec.output_shape, target, rows.dtype)


def _scalar(spec: ModelSpec, y: np.ndarray, target: int | None) -> np.ndarray:
    """The differentiated scalar per row, in float64: output `target`, or the sum."""
    flat = y.reshape(y.shape[0], -1).astype(np.float64)
    return flat.sum(axis=1) if target is None else flat[:, target]


# -- integrated gradients --------------------------------------------------------------------


def quadrature_weights(steps: int) -> np.ndarray:
    """Weights of the path integral over [0, 1] on steps + 1 equally spaced points.

    Composite Simpson's rule, h/3 (1, 4, 2, 4, ..., 4, 1) with h = 1/steps, when steps is
    even; for odd steps Simpson's rule on the first steps - 3 intervals and Simpson's 3/8
    rule, 3h/8 (1, 3, 3, 1), on the last three; steps = 1 is the trapezoid. Every weight is
    positive, they sum to 1, and polynomials up to degree 3 (degree 1 for steps = 1) are
    integrated exactly.
    """
    h = 1.0 / steps
    if steps == 1:
        return np.array([0.5, 0.5])
    w = np.zeros(steps + 1)
    even = steps if steps % 2 == 0 else steps - 3
    if even:
        w[0 : even + 1 : 2] += 2 * h / 3
        w[1:even:2] += 4 * h / 3
        w[0] -= h / 3
        w[even] -= h / 3
    if steps % 2:
        w[even : even + 4] += 3 * h / 8 * np.array([1.0, 3.0, 3.0, 1.0])
    return w


def _path(x: np.ndarray, baseline: np.ndarray, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The path rows [n * (steps + 1), *X], for each row b + (j / steps)(x - b) for
    j = 0..steps with the ends exactly b and x (`baseline` is [1, *X] or [n, *X]), and
    x - baseline in float64."""
    alphas = np.arange(steps + 1, dtype=np.float64) / steps
    b64 = baseline.astype(np.float64)
    difference = x.astype(np.float64) - b64
    alphas = alphas.reshape((1, -1) + (1,) * (x.ndim - 1))
    path = (b64[:, None] + alphas * difference[:, None]).astype(x.dtype)
    path[:, 0], path[:, -1] = baseline, x
    return path.reshape(-1, *x.shape[1:]), difference


def _baseline(x: np.ndarray, baseline: np.ndarray | None) -> np.ndarray:
    if baseline is None:
        return np.zeros((1, *x.shape[1:]), x.dtype)
    if baseline.shape[1:] != x.shape[1:] or baseline.shape[0] not in (1, x.shape[0]):
        raise InvalidRequest(
            f"baseline has shape {list(baseline.shape)}; expected [1, *X] (one for every row) "
            f"or [{x.shape[0]}, *X] (one per row of x), X = {list(x.shape[1:])}"
        )
    return baseline.astype(x.dtype, copy=False)


def _integrated_gradients(
    spec: ModelSpec, x: np.ndarray, options: Options, target: int | None
) -> Work:
    steps = options.steps
    if steps < 1:
        raise InvalidRequest(f"steps is {steps}; integrated gradients needs steps >= 1")
    baseline = _baseline(x, options.baseline)
    rows, difference = _path(x, baseline, steps)
    kind, v = _derivative_rows(spec, rows, target)
    n, points = x.shape[0], steps + 1
    weights = quadrature_weights(steps)

    def reduce(result: RequestResult) -> Reduced:
        gradients = result.dy_dx.reshape(n, points, -1)
        mean = np.matmul(weights, gradients)  # float64 [n, prod(X)]: the rule's weighted sum
        attributions = difference * mean.reshape(x.shape)
        y = result.y.reshape(n, points, *result.y.shape[1:])
        gap = _scalar(spec, y[:, -1], target) - _scalar(spec, y[:, 0], target)
        delta = attributions.reshape(n, -1).sum(axis=1) - gap
        return Reduced(y[:, -1], None, result.timing, attributions.astype(x.dtype),
                      delta.astype(x.dtype))  # fmt: skip

    what = f"integrated gradients of {n} row(s) x {points} path points = {n * points} rows"
    return Work(kind, rows, v, points, reduce, what, "fewer steps")


# -- SmoothGrad ------------------------------------------------------------------------------


def noisy_rows(x: np.ndarray, samples: int, noise: float, absolute: bool, seed: int):
    """[n, samples + 1, *X]: each row itself, then `samples` noisy copies (see the module)."""
    n = x.shape[0]
    x64 = x.astype(np.float64)
    if absolute:
        sigma = np.full(n, noise)
    else:
        flat = x64.reshape(n, -1)
        sigma = noise * (flat.max(axis=1) - flat.min(axis=1))
    eps = np.random.default_rng(seed).standard_normal((n, samples, *x.shape[1:]))
    shape = (n, 1) + (1,) * (x.ndim - 1)
    rows = np.empty((n, samples + 1, *x.shape[1:]), x.dtype)
    rows[:, 0] = x
    rows[:, 1:] = x64[:, None] + sigma.reshape(shape) * eps
    return rows


def _smooth_grad(spec: ModelSpec, x: np.ndarray, options: Options, target: int | None) -> Work:
    samples, noise, seed = options.samples, options.noise, options.seed
    if samples < 1:
        raise InvalidRequest(f"samples is {samples}; smooth_grad needs samples >= 1")
    if not (math.isfinite(noise) and noise >= 0):
        raise InvalidRequest(f"noise is {noise}; it must be a finite number >= 0")
    if seed < 0:
        raise InvalidRequest(f"seed is {seed}; it must be >= 0")
    rows = noisy_rows(x, samples, noise, options.noise_absolute, seed)
    if not np.isfinite(rows).all():
        raise InvalidRequest(f"noise {noise} takes the noisy copies beyond the model's range")
    n, per_row = x.shape[0], samples + 1
    rows = rows.reshape(n * per_row, *x.shape[1:])
    kind, v = _derivative_rows(spec, rows, target)

    def reduce(result: RequestResult) -> Reduced:
        gradients = result.dy_dx.reshape(n, per_row, *x.shape[1:])[:, 1:]
        mean = gradients.astype(np.float64).mean(axis=1)
        y = result.y.reshape(n, per_row, *result.y.shape[1:])[:, 0]
        return Reduced(y, None, result.timing, mean.astype(x.dtype))

    what = f"smooth_grad of {n} row(s) x {per_row} (samples + 1) = {n * per_row} rows"
    return Work(kind, rows, v, per_row, reduce, what, "fewer samples")


# -- k tangents per row ----------------------------------------------------------------------


def _tangents(spec: ModelSpec, kind: Derivative, x: np.ndarray, v: np.ndarray, k: int) -> Work:
    n = x.shape[0]
    rows = np.repeat(x, k, axis=0)
    vectors = v.reshape(n * k, *v.shape[2:])

    def reduce(result: RequestResult) -> Reduced:
        y = result.y.reshape(n, k, *result.y.shape[1:])[:, 0]
        return Reduced(y, result.dy_dx.reshape(n, k, *result.dy_dx.shape[1:]), result.timing)

    what = f"{kind.value} of {n} row(s) x {k} tangents = {n * k} rows"
    return Work(kind, rows, vectors, k, reduce, what, "fewer tangents")


# -- limits ----------------------------------------------------------------------------------


def check_limits(work: Work, spec: ModelSpec, limits: Limits, n: int) -> None:
    """Refuse (ExpansionTooLarge) an expansion that can never be admitted, saying what fits."""
    rows = n * work.per_row
    if rows > limits.max_rows:
        raise ExpansionTooLarge(
            f"{work.what}, over the {limits.max_rows} rows one request may queue "
            f"(--max-queue-rows); {_what_fits(limits.max_rows // work.per_row, work)}"
        )
    row_bytes = spec.result_row_bytes(work.kind)
    size = rows * row_bytes
    if size > limits.max_result_bytes:
        fit = limits.max_result_bytes // (work.per_row * row_bytes)
        raise ExpansionTooLarge(
            f"{work.what}, whose {work.kind.value} results would take {size / MIB:.1f} MiB, "
            f"over the {limits.max_result_bytes / MIB:.0f} MiB limit (--max-result-mb); "
            f"{_what_fits(fit, work)}"
        )


def _what_fits(rows: int, work: Work) -> str:
    if rows >= 1:
        return f"send at most {rows} row(s) per request at this setting, or {work.fewer}"
    return f"not even one row fits at this setting: ask for {work.fewer}"
