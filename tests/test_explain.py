"""Explanations, targets and k tangents (gradserve.server.core.explain), below the protocols.

Against an analytic fake engine (exact answers), and against the real engine through the real
batcher, compared with float64 tf.GradientTape references on a float64 twin of each model
(same quadrature rule, same steps) and with single-tangent calls.
"""

from __future__ import annotations

import asyncio
import math
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import UNLIMITED, assert_same_answer, spec_of, unbatched
from scipy.integrate import simpson

from gradserve.server.config import BUNDLED_DIR
from gradserve.server.core import explain
from gradserve.server.core.batcher import Batcher
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.contract import ENGINE_KINDS, Outputs, Priority
from gradserve.server.core.errors import QueueFull, RequestTooLarge
from gradserve.server.core.explain import (
    ExpansionTooLarge,
    InvalidRequest,
    Limits,
    Options,
    Reduced,
)
from gradserve.server.engine.compiled import TensorFlowEngine
from gradserve.wire.kinds import Derivative

IG, SG = Derivative.INTEGRATED_GRADIENTS, Derivative.SMOOTH_GRAD
WAIT_S = 60.0
answer = unbatched


def work(engine, kind, x, v=None, limits=UNLIMITED, **options) -> explain.Work:
    return explain.expand(spec_of(engine), limits, kind, x, v, Options(**options))


async def ask(submit, engine, kind, x, v=None, **options):
    """One request through `submit` (a batcher's)."""
    future = explain.submit(work(engine, kind, x, v, **options), submit)
    return await asyncio.wait_for(future, WAIT_S)


# --------------------------------------------------------------------------- models


def mlp(dtype: str = "float32") -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(4,), dtype=dtype),
            keras.layers.Dense(8, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, activation="tanh", dtype=dtype),
        ]
    )


def cnn(dtype: str = "float32") -> keras.Model:
    return keras.Sequential(
        [
            keras.Input(shape=(6, 6, 1), dtype=dtype),
            keras.layers.Conv2D(2, 3, activation="tanh", dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
            keras.layers.Dense(3, activation="softplus", dtype=dtype),
        ]
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (engine, float64 twin with the same weights)."""
    folder = tmp_path_factory.mktemp("explain-models")
    out = {}
    for name, build in (("mlp", mlp), ("cnn", cnn)):
        keras.utils.set_random_seed(11)
        model = build()
        model.save(folder / f"{name}.keras")
        twin = build("float64")
        twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
        out[name] = (
            TensorFlowEngine(
                folder / f"{name}.keras", xla=False, max_batch_size=64, deterministic=True
            ),
            twin,
        )
    return out


def tape_gradient(twin, rows: np.ndarray, target: int | None):
    """float64 (F, dF/dx) at rows, F the sum of outputs or output `target`."""
    x = tf.constant(rows, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reshape(twin(x), (rows.shape[0], -1))
        f = tf.reduce_sum(y, axis=1) if target is None else y[:, target]
    return f.numpy(), tape.gradient(f, x).numpy()


def reference_ig(twin, x, baseline, steps, target=None):
    """Integrated gradients in float64 with scipy's Simpson rule on steps + 1 points (the
    same rule as the server's for an even number of steps)."""
    assert steps % 2 == 0
    x, b = x.astype(np.float64), np.broadcast_to(baseline, x.shape).astype(np.float64)
    alphas = np.linspace(0.0, 1.0, steps + 1).reshape(1, -1, *([1] * (x.ndim - 1)))
    path = b[:, None] + alphas * (x - b)[:, None]
    f, g = tape_gradient(twin, path.reshape(-1, *x.shape[1:]), target)
    g = g.reshape(path.shape)
    attributions = (x - b) * simpson(g, dx=1.0 / steps, axis=1)
    f = f.reshape(x.shape[0], steps + 1)
    return attributions, attributions.reshape(len(x), -1).sum(1) - (f[:, -1] - f[:, 0])


def assert_relative(actual, expected, rtol):
    scale = np.abs(expected).max()
    error = np.abs(actual.astype(np.float64) - expected).max() / scale
    assert error <= rtol, f"max relative error {error:.2e} > {rtol:.0e}"
    return error


# --------------------------------------------------------------------------- analytic fake


class Quadratic:
    """F(x) = sum over outputs j of (j + 1) * sum(x^2): gradient linear in x, so the rule
    is exact and delta is zero up to rounding."""

    name, input_shape, output_shape, numpy_dtype = "fake", (3,), (2,), np.float64

    def run(self, kind, x, v=None):
        s = (x**2).sum(axis=1)
        y = np.stack([s, 2 * s], axis=1)
        if kind is Derivative.NONE:
            return Outputs(y, None)
        if kind is Derivative.GRADIENT:
            return Outputs(y, 3 * 2 * x)
        assert kind is Derivative.VJP
        return Outputs(y, 2 * x * (v[:, :1] + 2 * v[:, 1:]))


def test_path_rows():
    x = np.array([[1.0, 2.0], [3.0, -1.0]], np.float32)
    b = np.array([[0.5, 0.25]], np.float32)
    rows = work(Quartic(), IG, x, baseline=b, steps=4).x.reshape(2, 5, 2)
    np.testing.assert_array_equal(rows[:, 0], np.broadcast_to(b, x.shape))
    np.testing.assert_array_equal(rows[:, -1], x)
    np.testing.assert_allclose(rows[0, 2], [0.75, 1.125])


@pytest.mark.parametrize("steps", range(1, 10))
def test_quadrature_weights_integrate_cubics_exactly(steps):
    weights = explain.quadrature_weights(steps)
    alphas = np.linspace(0.0, 1.0, steps + 1)
    assert len(weights) == steps + 1 and (weights > 0).all()
    for degree in range(2 if steps == 1 else 4):
        assert math.isclose(weights @ alphas**degree, 1 / (degree + 1), rel_tol=1e-12)
    if steps == 4:
        np.testing.assert_allclose(weights, np.array([1, 4, 2, 4, 1]) / 12)
    if steps > 1:  # a quartic is not exact: the rule is Simpson's, not a higher one
        assert not math.isclose(weights @ alphas**4, 0.2, rel_tol=1e-12)


class Quartic:
    """F(x) = sum(x^4): along a straight path the gradient is a cubic in alpha, which the
    rule integrates exactly for any steps >= 2: attributions x_i^4 - b_i^4, delta 0."""

    name, input_shape, output_shape, numpy_dtype = "quartic", (2,), (1,), np.float64

    def run(self, kind, x, v=None):
        y = (x**4).sum(axis=1, keepdims=True)
        return Outputs(y, None if kind is Derivative.NONE else 4 * x**3)


@pytest.mark.parametrize("steps", [2, 3, 5, 8])
def test_integrated_gradients_of_a_quartic_are_exact(steps):
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    b = np.array([[0.5, 1.0], [-1.0, 0.0]])
    out = answer(Quartic(), IG, x, steps=steps, baseline=b)
    np.testing.assert_allclose(out.attributions, x**4 - b**4, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.delta, 0.0, atol=1e-10)


def test_integrated_gradients_of_a_quadratic_are_exact():
    fake = Quadratic()
    x = np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    b = np.array([[0.5, -1.0, 0.0]])
    out = answer(fake, IG, x, steps=3, baseline=b)
    # F = 3 sum(x^2): the attribution of x_i is exactly 3 (x_i^2 - b_i^2).
    np.testing.assert_allclose(out.attributions, 3 * (x**2 - b**2), rtol=1e-12)
    np.testing.assert_allclose(out.delta, 0.0, atol=1e-12)
    np.testing.assert_array_equal(out.y, fake.run(Derivative.NONE, x).y)
    target = answer(fake, IG, x, steps=3, baseline=b, target=1)
    np.testing.assert_allclose(target.attributions, 2 * (x**2 - b**2), rtol=1e-12)


def test_gradient_target_is_a_one_hot_vjp():
    fake = Quadratic()
    x = np.array([[1.0, 2.0, -1.0]])
    out = answer(fake, Derivative.GRADIENT, x, target=1)
    np.testing.assert_allclose(out.dy_dx, 4 * x)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        (IG, {"steps": 0}, "steps >= 1"),
        (SG, {"samples": 0}, "samples >= 1"),
        (SG, {"noise": -1.0}, "finite number >= 0"),
        (SG, {"noise": float("nan")}, "finite number >= 0"),
        (IG, {"target": 2}, r"target 2 is out of range.*use 0\.\.1"),
        (Derivative.JACOBIAN, {"target": 0}, "target is for gradient"),
        (IG, {"baseline": np.zeros((2, 3))}, r"baseline has shape \[2, 3\]"),
    ],
)
def test_invalid_options_are_refused(kind, options, message):
    fake = Quadratic()
    x = np.ones((3, 3))
    with pytest.raises(InvalidRequest, match=message):
        answer(fake, kind, x, **options)


def test_expansions_that_cannot_fit_say_what_would():
    fake = Quadratic()
    x = np.ones((10, 3))
    rows = Limits(max_rows=1000, max_result_bytes=1 << 30)
    with pytest.raises(ExpansionTooLarge, match=r"20 row\(s\) x 65 path points = 1300 rows"):
        work(fake, IG, np.ones((20, 3)), limits=rows)
    with pytest.raises(ExpansionTooLarge, match=r"send at most 15 row\(s\)"):
        work(fake, IG, np.ones((20, 3)), limits=rows)
    with pytest.raises(ExpansionTooLarge, match=r"not even one row fits.*fewer samples"):
        work(fake, SG, x, limits=rows, samples=2000)
    # 10 x 33 rows of 3 float64 gradients = 7920 bytes
    size = Limits(max_rows=1 << 20, max_result_bytes=4000)
    with pytest.raises(ExpansionTooLarge, match=r"--max-result-mb.*at most 5 row\(s\)"):
        work(fake, SG, x, limits=size)
    v = np.ones((10, 400, 3))
    with pytest.raises(ExpansionTooLarge, match=r"x 400 tangents = 4000 rows.*fewer tangents"):
        work(fake, Derivative.JVP, x, v, limits=rows)


async def test_a_full_queue_names_the_expansion():
    engine = Quadratic()
    async with Batcher(engine.run, max_batch_size=8, max_queue_rows=100) as batcher:
        first = await ask(batcher.submit, engine, IG, np.ones((1, 3)), steps=9)
        assert first.attributions.shape == (1, 3)
        blocker = batcher.submit(np.ones((90, 3)), Derivative.GRADIENT)
        with pytest.raises(QueueFull, match=r"adds 20.*x 10 path points = 20 rows"):
            await ask(batcher.submit, engine, IG, np.ones((2, 3)), steps=9)
        await blocker


# --------------------------------------------------------------------------- real engine


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("target", [None, 2])
def test_integrated_gradients_equal_the_float64_reference(models, name, target):
    engine, twin = models[name]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, *engine.input_shape)).astype(np.float32)
    baseline = rng.normal(size=(1, *engine.input_shape)).astype(np.float32)
    out = answer(engine, IG, x, steps=16, baseline=baseline, target=target)
    expected, delta = reference_ig(twin, x, baseline, 16, target)
    assert out.attributions.shape == x.shape and out.attributions.dtype == np.float32
    assert_relative(out.attributions, expected, 1e-5)
    np.testing.assert_allclose(out.delta, delta, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(out.y, engine.run(Derivative.NONE, x).y, rtol=1e-6)


def test_bundled_tanh_model_completes_within_a_thousandth_at_64_steps():
    engine = TensorFlowEngine(
        BUNDLED_DIR / "quadratic_tanh.keras", xla=False, max_batch_size=1024, deterministic=True
    )
    x = np.array([[0.95], [0.9], [0.1], [0.75], [0.3]], np.float32)
    out = answer(engine, IG, x, steps=64)
    f = engine.run(Derivative.NONE, np.concatenate([x, np.zeros((1, 1), np.float32)])).y[:, 0]
    gap = np.abs(f[:-1].astype(np.float64) - f[-1])
    ratio = np.abs(out.delta) / gap
    assert (ratio <= 1e-3).all(), f"|delta| / |F(x) - F(0)| = {ratio}"


def test_smooth_grad_noise_zero_is_the_gradient_and_seeds_reproduce(models):
    engine, _ = models["cnn"]
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 1)).astype(np.float32)
    plain = engine.run(Derivative.GRADIENT, x).dy_dx
    still = answer(engine, SG, x, noise=0.0, samples=4).attributions
    assert_same_answer(still, plain)  # 10 rows against 2
    a = answer(engine, SG, x, samples=8, noise=0.2, seed=5)
    b = answer(engine, SG, x, samples=8, noise=0.2, seed=5)
    c = answer(engine, SG, x, samples=8, noise=0.2, seed=6)
    np.testing.assert_array_equal(a.attributions, b.attributions)
    assert np.abs(a.attributions - c.attributions).max() > 1e-4
    assert np.abs(a.attributions - plain).max() > 1e-4
    np.testing.assert_allclose(a.y, engine.run(Derivative.NONE, x).y, rtol=1e-6)


def test_smooth_grad_equals_the_mean_gradient_over_the_seeded_noise(models):
    engine, twin = models["mlp"]
    x = np.random.default_rng(3).normal(size=(3, 4)).astype(np.float32)
    for absolute, noise in ((False, 0.3), (True, 0.05)):
        out = answer(engine, SG, x, samples=6, noise=noise, seed=9, noise_absolute=absolute,
                     target=1)  # fmt: skip
        eps = np.random.default_rng(9).standard_normal((3, 6, 4))
        spread = np.ptp(x, axis=1) if not absolute else np.ones(3)
        noisy = (x[:, None] + (noise * spread)[:, None, None] * eps).astype(np.float32)
        _, g = tape_gradient(twin, noisy.reshape(-1, 4).astype(np.float64), 1)
        assert_relative(out.attributions, g.reshape(3, 6, 4).mean(axis=1), 1e-5)


@pytest.mark.parametrize("kind", [Derivative.VJP, Derivative.JVP, Derivative.HVP])
def test_k_tangents_equal_k_single_tangent_calls(models, kind):
    engine, _ = models["cnn"]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 6, 6, 1)).astype(np.float32)
    shape = engine.output_shape if kind is Derivative.VJP else engine.input_shape
    v = rng.normal(size=(3, 4, *shape)).astype(np.float32)
    out = answer(engine, kind, x, v)
    assert out.dy_dx.shape[:2] == (3, 4) and out.y.shape == (3, *engine.output_shape)
    for j in range(4):
        single = engine.run(kind, x, np.ascontiguousarray(v[:, j]))
        assert_same_answer(out.dy_dx[:, j], single.dy_dx)  # 12 rows against 3
    assert_same_answer(out.y, engine.run(kind, x, v[:, 0]).y)
    with pytest.raises(InvalidRequest, match=r"or \[n, k, "):
        answer(engine, kind, x, np.ones((3, 4, 5), np.float32))


def test_target_equals_a_vjp_with_a_one_hot_vector(models):
    engine, _ = models["mlp"]
    x = np.random.default_rng(5).normal(size=(4, 4)).astype(np.float32)
    for t in range(3):
        hot = np.zeros((4, 3), np.float32)
        hot[:, t] = 1
        got = answer(engine, Derivative.GRADIENT, x, target=t).dy_dx
        np.testing.assert_array_equal(got, engine.run(Derivative.VJP, x, hot).dy_dx)
        jacobian = engine.run(Derivative.JACOBIAN, x).dy_dx[:, t]
        np.testing.assert_allclose(got, jacobian, rtol=1e-6, atol=1e-7)


async def test_mixed_load_through_the_batcher_answers_every_caller_exactly(models):
    """Explanations split past the batch size and merged with other callers' gradient rows
    give what each request gets alone."""
    engine, _ = models["cnn"]
    rng = np.random.default_rng(6)
    jobs = []
    for i in range(24):
        x = rng.normal(size=(int(rng.integers(1, 4)), 6, 6, 1)).astype(np.float32)
        kind = (IG, SG, Derivative.GRADIENT, Derivative.GRADIENT)[i % 4]
        options = {IG: {"steps": 20}, SG: {"samples": 10, "seed": i}}.get(kind, {})
        jobs.append((kind, x, options))

    async with Batcher(engine.run, max_batch_size=32) as batcher:
        answers = await asyncio.gather(
            *(ask(batcher.submit, engine, kind, x, **o) for kind, x, o in jobs)
        )
    path_rows = sum(x.shape[0] * 21 for kind, x, _ in jobs if kind is IG)
    assert batcher.batches_run < path_rows / 16  # rows were merged, not one call per request
    for (kind, x, options), got in zip(jobs, answers, strict=True):
        alone = answer(engine, kind, x, **options)
        if isinstance(got, Reduced):
            assert_same_answer(got.attributions, alone.attributions)
        else:
            assert_same_answer(got.dy_dx, engine.run(kind, x).dy_dx)
        if kind is IG:
            assert_same_answer(got.delta, alone.delta)


async def test_a_cancelled_explanation_never_computes_its_rows():
    gate = threading.Event()
    computed = []

    def gated(kind, x, v=None):
        if not gate.wait(timeout=WAIT_S):
            raise TimeoutError("gate never opened")
        computed.append(len(x))
        return Quadratic().run(kind, x, v)

    async with Batcher(gated, max_batch_size=8) as batcher:
        blocker = batcher.submit(np.ones((1, 3)), Derivative.GRADIENT)
        while batcher.queued_rows:  # the blocker is dispatched and held at the gate
            await asyncio.sleep(0.01)
        future = explain.submit(work(Quadratic(), IG, np.ones((2, 3)), steps=9), batcher.submit)
        await asyncio.sleep(0)
        assert batcher.queued_rows == 20
        future.cancel()
        await asyncio.sleep(0.05)
        assert batcher.queued_rows == 0
        gate.set()
        await asyncio.wait_for(blocker, WAIT_S)
    assert computed == [1]  # only the blocker's row reached the engine


async def test_expanded_rows_are_queued_as_the_callers_at_its_priority_and_their_bytes_counted():
    """An explanation's expanded rows are submitted with the caller key and the priority of
    the request, and the batcher counts the expanded rows, vectors and results against the
    memory budget (and frees them when answered)."""
    gate = threading.Event()

    def gated(kind, x, v=None):
        if not gate.wait(timeout=WAIT_S):
            raise TimeoutError("gate never opened")
        return Quadratic().run(kind, x, v)

    fake = Quadratic()
    spec = spec_of(fake)
    memory = MemoryBudget(1 << 20)
    row_bytes = {kind: spec.answer_row_bytes(kind) for kind in ENGINE_KINDS}
    x = np.ones((2, 3))
    target_x = np.full((1, 3), 2.0)

    submitted = []
    async with Batcher(gated, max_batch_size=8, memory=memory,
                       result_row_bytes=row_bytes) as batcher:  # fmt: skip

        def submit(rows, kind, deadline=None, v=None, **admission):
            submitted.append((kind, len(rows), admission))
            return batcher.submit(rows, kind, deadline, v, **admission)

        blocker = batcher.submit(np.ones((1, 3)), Derivative.GRADIENT)
        while batcher.queued_rows:  # the blocker is dispatched and held at the gate
            await asyncio.sleep(0.01)
        held = memory.held
        ig = explain.submit(work(fake, IG, x, steps=4), submit, caller="alice",
                            priority=Priority.HIGH)  # fmt: skip
        # 2 rows x 5 path points = 10 GRADIENT rows, each x (3 floats) and its answer.
        expanded = 10 * 3 * 8 + 10 * row_bytes[Derivative.GRADIENT]
        assert memory.held - held == expanded
        held = memory.held
        target = explain.submit(work(fake, Derivative.GRADIENT, target_x, target=1), submit,
                                caller="bob")  # fmt: skip
        # a target is one VJP row: x, its one-hot cotangent (2 floats) and the answer.
        assert memory.held - held == 3 * 8 + 2 * 8 + row_bytes[Derivative.VJP]
        assert submitted == [
            (Derivative.GRADIENT, 10, {"caller": "alice", "priority": Priority.HIGH}),
            (Derivative.VJP, 1, {"caller": "bob"}),
        ]
        with pytest.raises(RequestTooLarge, match="integrated gradients of 2 row"):
            explain.submit(work(fake, IG, np.ones((2, 3)), steps=20_000), submit)
        gate.set()
        await asyncio.wait_for(blocker, WAIT_S)
        ig, target = await asyncio.wait_for(asyncio.gather(ig, target), WAIT_S)
    assert memory.held == 0
    np.testing.assert_allclose(ig.attributions, answer(fake, IG, x, steps=4).attributions)
    np.testing.assert_allclose(target.dy_dx, 2 * 2 * target_x)
