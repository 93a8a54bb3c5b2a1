"""Every derivative kind on models of other shapes, against float64 GradientTape references,
central finite differences, and unbatched runs; model formats; several models at once."""

from __future__ import annotations

import concurrent.futures
from dataclasses import replace

import grpc
import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import TEST_CONFIG, RunningServer, assert_same_answer

from gradserve.client import GradientClient, GradserveError
from gradserve.server.core.contract import ENGINE_KINDS
from gradserve.server.engine.compiled import ModelError, TensorFlowEngine
from gradserve.wire.kinds import Derivative

KINDS = [k for k in ENGINE_KINDS if k is not Derivative.NONE]


def mlp(dtype: str = "float32") -> keras.Model:
    """12 inputs -> 3 outputs, smooth."""
    return keras.Sequential(
        [
            keras.Input(shape=(12,), dtype=dtype),
            keras.layers.Dense(16, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, activation="softplus", dtype=dtype),
        ]
    )


def cnn(dtype: str = "float32") -> keras.Model:
    """8x8x1 images -> 2 outputs."""
    return keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1), dtype=dtype),
            keras.layers.Conv2D(3, 3, activation="tanh", dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
            keras.layers.Dense(2, activation="tanh", dtype=dtype),
        ]
    )


BUILDERS = {"mlp": mlp, "cnn": cnn}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Each test model saved as .keras, with a float64 twin holding the same weights."""
    folder = tmp_path_factory.mktemp("derivative-models")
    out = {}
    for name, build in BUILDERS.items():
        keras.utils.set_random_seed(3)
        model = build()
        path = folder / f"{name}.keras"
        model.save(path)
        twin = build("float64")
        twin.set_weights([w.astype(np.float64) for w in model.get_weights()])
        out[name] = (path, twin)
    keras.utils.set_random_seed(4)
    model64 = mlp("float64")
    path64 = folder / "mlp64.keras"
    model64.save(path64)
    out["mlp64"] = (path64, model64)
    return out


def reference(model: keras.Model, kind: Derivative, x: np.ndarray, v: np.ndarray | None):
    """The float64 answer, from tf.GradientTape / ForwardAccumulator on the float64 twin."""
    x = tf.constant(x, tf.float64)
    v = None if v is None else tf.constant(v, tf.float64)
    with tf.GradientTape(persistent=True) as outer:
        outer.watch(x)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            y = model(x)
        gradient = tape.gradient(y, x)
    if kind is Derivative.GRADIENT:
        return gradient.numpy()
    if kind is Derivative.JACOBIAN:
        return tape.batch_jacobian(y, x).numpy()
    if kind is Derivative.VJP:
        return tape.gradient(y, x, output_gradients=v).numpy()
    hessian = outer.batch_jacobian(gradient, x).numpy()
    if kind is Derivative.HESSIAN:
        return hessian
    flat = x.shape[1:].num_elements()
    if kind is Derivative.HVP:
        n = x.shape[0]
        return np.einsum("ij,ijk->ik", v.numpy().reshape(n, flat),
                         hessian.reshape(n, flat, flat)).reshape(x.shape)  # fmt: skip
    jacobian = tape.batch_jacobian(y, x).numpy()
    n, out = y.shape[0], y.shape[1:].num_elements()
    return np.einsum("ijk,ik->ij", jacobian.reshape(n, out, flat),
                     v.numpy().reshape(n, flat)).reshape(y.shape)  # fmt: skip


def vector_for(engine: TensorFlowEngine, kind: Derivative, n: int, rng) -> np.ndarray | None:
    if not kind.needs_vector:
        return None
    shape = engine.output_shape if kind is Derivative.VJP else engine.input_shape
    return rng.normal(size=(n, *shape)).astype(engine.numpy_dtype)


@pytest.mark.parametrize("name", ["mlp", "cnn", "mlp64"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_every_kind_matches_the_float64_tape(models, name, kind):
    path, twin = models[name]
    engine = TensorFlowEngine(path, xla=False, max_batch_size=32)
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, *engine.input_shape)).astype(engine.numpy_dtype)
    v = vector_for(engine, kind, 5, rng)
    served = engine.run(kind, x, v).dy_dx
    expected = reference(
        twin, kind, x.astype(np.float64), None if v is None else v.astype(np.float64)
    )
    assert served.shape == expected.shape
    assert served.dtype == engine.numpy_dtype
    scale = np.abs(expected).max()
    tolerance = 1e-10 if name == "mlp64" else 1e-4
    np.testing.assert_allclose(served, expected, rtol=tolerance, atol=tolerance * scale)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_jvp_and_hvp_match_central_finite_differences(models, name):
    path, twin = models[name]
    engine = TensorFlowEngine(path, xla=False, max_batch_size=32)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, *engine.input_shape))
    u = rng.normal(size=x.shape)
    h = 1e-5

    def f(z):
        return twin(tf.constant(z)).numpy()

    def grad(z):
        z = tf.constant(z)
        with tf.GradientTape() as tape:
            tape.watch(z)
            y = twin(z)
        return tape.gradient(y, z).numpy()

    jvp = engine.run(Derivative.JVP, x.astype(np.float32), u.astype(np.float32)).dy_dx
    hvp = engine.run(Derivative.HVP, x.astype(np.float32), u.astype(np.float32)).dy_dx
    fd_jvp = (f(x + h * u) - f(x - h * u)) / (2 * h)
    fd_hvp = (grad(x + h * u) - grad(x - h * u)) / (2 * h)
    np.testing.assert_allclose(jvp, fd_jvp, rtol=1e-3, atol=1e-4 * np.abs(fd_jvp).max())
    np.testing.assert_allclose(hvp, fd_hvp, rtol=1e-3, atol=1e-3 * np.abs(fd_hvp).max())


def test_all_kinds_batched_equal_unbatched_through_the_server(models):
    engine = TensorFlowEngine(models["cnn"][0], xla=False, max_batch_size=64, deterministic=True)
    engine.warm_up()
    rng = np.random.default_rng(7)
    jobs = []
    for i in range(120):
        kind = KINDS[i % len(KINDS)]
        n = int(rng.integers(1, 5))
        x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
        jobs.append((kind, x, vector_for(engine, kind, n, rng)))
    with (
        RunningServer(replace(TEST_CONFIG, max_batch_size=64), engine) as running,
        GradientClient(running.target, timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(24) as pool,
    ):
        results = list(pool.map(lambda j: client.evaluate(j[1], j[0].value, v=j[2]), jobs))
    assert max(r.timing.batch_rows for r in results) > 4
    for (kind, x, v), result in zip(jobs, results, strict=True):
        alone = engine.run(kind, x, v)
        assert_same_answer(result.dy_dx, alone.dy_dx)


def test_saved_model_and_h5_serve_the_same_function(models, tmp_path):
    keras_path, _ = models["mlp"]
    model = keras.saving.load_model(keras_path)
    model.export(tmp_path / "saved", verbose=False)
    model.save(tmp_path / "legacy.h5")
    x = np.random.default_rng(8).normal(size=(6, 12)).astype(np.float32)
    native = TensorFlowEngine(keras_path, xla=False, max_batch_size=16)
    others = [TensorFlowEngine(tmp_path / name, xla=False, max_batch_size=16)
              for name in ("saved", "legacy.h5")]  # fmt: skip
    for other in others:
        assert other.input_shape == (12,) and other.output_shape == (3,)
        for kind in (Derivative.NONE, Derivative.JACOBIAN, Derivative.HVP):
            v = x if kind.needs_vector else None
            a, b = native.run(kind, x, v), other.run(kind, x, v)
            np.testing.assert_allclose(a.y, b.y, rtol=1e-6, atol=1e-7)
            if a.dy_dx is not None:
                np.testing.assert_allclose(a.dy_dx, b.dy_dx, rtol=1e-5, atol=1e-7)


def test_saved_model_with_several_inputs_needs_a_choice(tmp_path):
    class Two(tf.Module):
        def __init__(self):
            self.w = tf.Variable([[2.0]])

        @tf.function(input_signature=[tf.TensorSpec([None, 1]), tf.TensorSpec([None, 1])])
        def serve(self, a, b):
            return {"out": tf.matmul(a, self.w) * b}

    module = Two()
    tf.saved_model.save(module, str(tmp_path / "two"), signatures={"serving_default": module.serve})
    with pytest.raises(ModelError, match=r"inputs \['a', 'b'\]: choose one with --input"):
        TensorFlowEngine(tmp_path / "two", xla=False)
    with pytest.raises(ModelError, match="cannot be called with only that input"):
        TensorFlowEngine(tmp_path / "two", xla=False, input_name="a")


def test_several_models_in_one_server(models, bundled_engine):
    mlp_engine = TensorFlowEngine(models["mlp"][0], xla=False, max_batch_size=32, name="surrogate")
    with (
        RunningServer(TEST_CONFIG, [bundled_engine, mlp_engine]) as running,
        GradientClient(running.target, timeout=10) as client,
    ):
        listed = {m.name: m for m in client.list_models()}
        assert listed["surrogate"].input_shape == (12,) and listed["surrogate"].output_shape == (3,)
        assert listed["quadratic"].input_shape == (1,)
        quad = client.evaluate([0.2, 0.6], model="quadratic")
        surrogate = client.evaluate(np.zeros((2, 12)), "jacobian", model="surrogate")
        assert quad.dy_dx.shape == (2, 1) and surrogate.dy_dx.shape == (2, 3, 12)
        with pytest.raises(GradserveError) as info:
            client.evaluate(0.5)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "several models are served" in info.value.message
        assert client.model_info("surrogate").input_width == 12


def test_oversized_hessian_is_refused_with_advice(models):
    engine = TensorFlowEngine(models["cnn"][0], xla=False, max_batch_size=64)
    config = replace(TEST_CONFIG, max_result_mb=1)
    with (
        RunningServer(config, engine) as running,
        GradientClient(running.target, timeout=10) as client,
    ):
        x = np.zeros((100, 8, 8, 1), np.float32)
        with pytest.raises(GradserveError) as info:
            client.evaluate(x, "hessian")
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "over the 1 MiB limit" in info.value.message and "hvp" in info.value.message
        assert client.evaluate(x, "hvp", v=np.ones_like(x)).dy_dx.shape == (100, 8, 8, 1)
        with pytest.raises(GradserveError, match=r"v must have shape \[n, 8, 8, 1\]"):
            client.evaluate(x, "jvp", v=np.ones((100, 3)))


def test_bundled_tanh_model_has_a_meaningful_second_derivative(bundled_engine):
    """d2y/dx2 = 8 for the true function; the relu model's second derivative is 0."""
    from gradserve.server.config import BUNDLED_DIR

    tanh = TensorFlowEngine(BUNDLED_DIR / "quadratic_tanh.keras", xla=False, max_batch_size=16)
    x = np.array([[0.3], [0.5], [0.7]], np.float32)
    hessian = tanh.run(Derivative.HESSIAN, x).dy_dx.ravel()
    np.testing.assert_allclose(hessian, 8.0, atol=1.5)
    np.testing.assert_allclose(tanh.run(Derivative.GRADIENT, x).dy_dx.ravel(),
                               8 * (x.ravel() - 0.5), atol=0.3)  # fmt: skip
    relu = bundled_engine.run(Derivative.HESSIAN, x).dy_dx.ravel()
    np.testing.assert_array_equal(relu, 0.0)
