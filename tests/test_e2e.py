"""End to end through the SDK: a real server on a loopback port, real TensorFlow, real clients."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import numpy as np
import pytest
from conftest import assert_same_answer

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError
from gradserve.wire.kinds import Derivative


@pytest.fixture(params=["one process", "2 frontends"])
def server(request, server, frontends_server):
    """Every test here runs against the single-process server and against the multi-process
    one (2 frontend processes sharing the port, one engine process)."""
    return server if request.param == "one process" else frontends_server


def test_bundled_model_serves_the_trained_derivative(server):
    with GradientClient(server.target, timeout=10) as client:
        result = client.evaluate([0.2, 0.6])
    assert result.y.shape == (2, 1) and result.dy_dx.shape == (2, 1)
    grad = result.dy_dx[:, 0]
    assert abs(grad[0] - grad[1]) > 1.0, "a freshly initialised ReLU net gives equal values"
    np.testing.assert_allclose(grad, [8 * (0.2 - 0.5), 8 * (0.6 - 0.5)], atol=0.3)


def test_gradient_matches_analytic_and_finite_differences(server):
    x = np.linspace(0.05, 0.95, 37)
    h = 1e-3
    with GradientClient(server.target, timeout=10) as client:
        served = client.evaluate(x).dy_dx[:, 0]
        y_plus = client.evaluate(x + h, "none").y[:, 0].astype(np.float64)
        y_minus = client.evaluate(x - h, "none").y[:, 0].astype(np.float64)
    # A ReLU fit's derivative is a staircase around the true line 8(x - 0.5).
    error = np.abs(served - 8 * (x - 0.5))
    assert error.mean() < 0.2 and error.max() < 0.5, error
    central = (y_plus - y_minus) / (2 * h)
    # The ReLU net is piecewise linear: away from its few kinks the difference is exact.
    close = np.abs(central - served) < 1e-2
    assert close.mean() >= 0.9, list(zip(x, served, central, strict=True))
    assert len(set(np.round(served, 3))) > 5, "the gradient must vary with x"


def test_jacobian_and_gradient_of_a_multi_output_model(mimo_server, mimo_engine):
    x = np.random.default_rng(4).normal(size=(9, 3))
    with GradientClient(mimo_server.target, timeout=10) as client:
        jac = client.evaluate(x, "jacobian")
        grad = client.evaluate(x, "gradient")
        info = client.model_info()
    assert (info.input_width, info.output_width) == (3, 2)
    assert jac.y.shape == (9, 2) and jac.dy_dx.shape == (9, 2, 3)
    expected = mimo_engine.run(Derivative.JACOBIAN, x.astype(np.float32))
    assert_same_answer(jac.dy_dx, expected.dy_dx)
    np.testing.assert_allclose(grad.dy_dx, jac.dy_dx.sum(axis=1), rtol=1e-5, atol=1e-6)


def test_input_forms_scalar_vector_matrix_and_float64(server):
    with GradientClient(server.target, timeout=10) as client:
        scalar = client.evaluate(0.2)
        vector = client.evaluate(np.array([0.2, 0.6], np.float32))
        matrix = client.evaluate(np.array([[0.2], [0.6]], np.float64))
        none = client.evaluate([0.2], derivative="none")
    assert scalar.y.shape == (1, 1)
    assert_same_answer(vector.y, matrix.y)
    assert_same_answer(scalar.dy_dx[0], vector.dy_dx[0])
    assert none.dy_dx is None
    assert scalar.timing.compute_us > 0 and scalar.timing.batch_rows >= 1


def _hop_sum(t) -> int:
    return t.decode_us + t.queue_us + t.handoff_us + t.compute_us + t.encode_us


def test_latency_breakdown_adds_up_within_the_callers_latency(server):
    """Each answer's hops are parts of the server's own arrival-to-answer time, which is
    itself part of what the caller waited."""
    with GradientClient(server.target, timeout=10) as client:
        for x in (0.3, np.linspace(0, 1, 300)):
            started = time.perf_counter()
            t = client.evaluate(x).timing
            waited_us = (time.perf_counter() - started) * 1e6
            assert t.compute_us > 0 and t.total_us > 0
            assert abs(_hop_sum(t) - t.total_us) <= 6  # each hop rounded to 1 us
            assert t.total_us < waited_us
        for result in client.stream([0.1, 0.2, 0.3]):
            assert result.timing.compute_us > 0
            assert _hop_sum(result.timing) <= result.timing.total_us + 6


def test_batched_equals_unbatched_under_concurrent_callers(server, bundled_engine):
    rng = np.random.default_rng(5)
    inputs = [rng.uniform(-1, 2, size=(int(rng.integers(1, 40)), 1)) for _ in range(240)]
    kinds = [("gradient", "jacobian", "none")[i % 3] for i in range(len(inputs))]
    with (
        GradientClient(server.target, timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(48) as pool,
    ):
        results = list(pool.map(client.evaluate, inputs, kinds))
    batch_sizes = {r.timing.batch_rows for r in results}
    assert max(batch_sizes) > 40, "concurrent callers should share batches"
    for x, kind, result in zip(inputs, kinds, results, strict=True):
        alone = bundled_engine.run(Derivative(kind), x.astype(np.float32))
        assert_same_answer(result.y, alone.y)
        if alone.dy_dx is None:
            assert result.dy_dx is None
        else:
            assert_same_answer(result.dy_dx, alone.dy_dx)


def test_stream_returns_results_in_order_and_errors_per_message(server, bundled_engine):
    rng = np.random.default_rng(6)
    xs: list[object] = [rng.uniform(0, 1, size=(int(rng.integers(1, 5)), 1)) for _ in range(300)]
    xs[150] = np.array([[np.nan]])
    with GradientClient(server.target, timeout=30) as client:
        results = list(client.stream(xs, errors="return"))
    assert len(results) == 300
    assert isinstance(results[150], GradserveError)
    assert results[150].code.name == "INVALID_ARGUMENT" and "non-finite" in results[150].message
    for i, (x, result) in enumerate(zip(xs, results, strict=True)):
        if i == 150:
            continue
        assert result.id == str(i)
        alone = bundled_engine.run(Derivative.GRADIENT, x.astype(np.float32))
        assert_same_answer(result.dy_dx, alone.dy_dx)


def test_stream_raises_by_default_at_the_bad_message(server):
    with GradientClient(server.target, timeout=10) as client:
        seen = []
        with pytest.raises(GradserveError) as info:
            for result in client.stream([0.1, 0.2, [[1.0, 2.0]], 0.3]):
                seen.append(result)
    assert len(seen) == 2 and info.value.code.name == "INVALID_ARGUMENT"


async def test_async_client_same_surface(server, bundled_engine):
    async with AsyncGradientClient(server.target, timeout=10) as client:
        info = await client.model_info()
        single = await client.evaluate(0.6)
        many = await asyncio.gather(*(client.evaluate(x) for x in np.linspace(0, 1, 50)))

        async def gen():
            for x in (0.2, [np.inf], 0.6):
                yield x

        streamed = [r async for r in client.stream(gen(), errors="return")]
    assert info.name == "quadratic" and info.input_width == 1
    assert set(info.derivatives) == {"gradient", "jacobian", "none", "vjp", "jvp", "hessian", "hvp",
                                     "integrated_gradients", "smooth_grad"}  # fmt: skip
    assert abs(single.dy_dx[0, 0] - 0.8) < 0.3
    grid = np.linspace(0, 1, 50, dtype=np.float32).reshape(-1, 1)
    alone = bundled_engine.run(Derivative.GRADIENT, grid).dy_dx[:, 0]
    assert_same_answer([r.dy_dx[0, 0] for r in many], alone)
    assert [type(r).__name__ for r in streamed] == ["Result", "GradserveError", "Result"]


def test_server_errors_surface_as_gradserve_errors(server):
    with GradientClient(server.target, timeout=10) as client:
        with pytest.raises(GradserveError) as info:
            client.evaluate([[0.1, 0.2]])
        assert info.value.code.name == "INVALID_ARGUMENT"
        assert "expects 1 value(s) per row" in info.value.message
        with pytest.raises(GradserveError) as info:
            client.evaluate(0.1, model="resnet")
        assert info.value.code.name == "NOT_FOUND"
        with pytest.raises(ValueError, match="derivative must be one of"):
            client.evaluate(0.1, derivative="laplacian")
