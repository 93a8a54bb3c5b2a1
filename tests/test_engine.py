"""The engine alone, no gRPC: trained weights served, derivatives against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from conftest import assert_close, float64_answer, spec_of

from gradserve.server.config import BUNDLED_MODEL
from gradserve.server.core.contract import ENGINE_KINDS
from gradserve.server.engine.batching import batch_ladder
from gradserve.server.engine.compiled import ModelError, TensorFlowEngine, resolve_device
from gradserve.wire.kinds import Derivative


def test_served_outputs_equal_model_predict_on_the_loaded_file(bundled_engine):
    import keras

    loaded = keras.saving.load_model(BUNDLED_MODEL, compile=False)
    x = np.linspace(-0.5, 1.5, 301, dtype=np.float32).reshape(-1, 1)
    expected = loaded.predict(x, verbose=0)
    for kind in (k for k in ENGINE_KINDS if not k.needs_vector):
        served = bundled_engine.run(kind, x[:256]).y
        # Equal up to float32 rounding of sums of O(1) terms (XLA fuses them in another order).
        np.testing.assert_allclose(served, expected[:256], rtol=1e-6, atol=1e-6)
    # Weights are the trained ones, not a fresh initialisation.
    for served, trained in zip(bundled_engine.model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(served.numpy(), trained.numpy())


def test_bundled_gradient_tracks_the_analytic_derivative(bundled_engine):
    x = np.array([[0.2], [0.6]], np.float32)
    grad = bundled_engine.run(Derivative.GRADIENT, x).dy_dx[:, 0]
    assert abs(grad[0] - grad[1]) > 1.0
    np.testing.assert_allclose(grad, 8 * (x[:, 0] - 0.5), atol=0.3)


@pytest.mark.parametrize("xla", [False, True])
def test_every_kind_equals_the_float64_reference(mimo_model_path, xla):
    engine = TensorFlowEngine(mimo_model_path, xla=xla, max_batch_size=16)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(11, 3)).astype(np.float32)
    for kind in ENGINE_KINDS:
        shape = spec_of(engine).vector_shape(kind)
        v = None if shape is None else rng.normal(size=(11, *shape)).astype(np.float32)
        served, expected = engine.run(kind, x, v), float64_answer(engine.model, kind, x, v)
        assert served.y.shape == (11, 2)
        assert_close(served.y, expected.y)
        if kind is Derivative.NONE:
            assert served.dy_dx is None
        else:
            assert served.dy_dx.shape == expected.dy_dx.shape
            assert_close(served.dy_dx, expected.dy_dx)


def test_jacobian_matches_tape_jacobian_in_float32(mimo_engine):
    x = np.random.default_rng(2).normal(size=(5, 3)).astype(np.float32)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = mimo_engine.model(xt)
    full = tape.jacobian(y, xt).numpy()
    expected = np.stack([full[i, :, i, :] for i in range(5)])
    np.testing.assert_allclose(mimo_engine.run(Derivative.JACOBIAN, x).dy_dx, expected, rtol=1e-5)


def test_xla_padding_does_not_change_results(mimo_model_path, mimo_engine):
    xla = TensorFlowEngine(mimo_model_path, xla=True, max_batch_size=16)
    x = np.random.default_rng(3).normal(size=(13, 3)).astype(np.float32)  # padded to 16
    for kind in (Derivative.GRADIENT, Derivative.JACOBIAN):
        a, b = xla.run(kind, x), mimo_engine.run(kind, x)
        assert a.y.shape == b.y.shape == (13, 2)
        np.testing.assert_allclose(a.dy_dx, b.dy_dx, rtol=1e-5, atol=1e-7)


def test_more_rows_than_the_max_batch_run_in_pieces(mimo_model_path):
    engine = TensorFlowEngine(mimo_model_path, xla=True, max_batch_size=16)
    x = np.random.default_rng(9).normal(size=(40, 3)).astype(np.float32)
    whole = engine.run(Derivative.JACOBIAN, x)
    pieces = [engine.run(Derivative.JACOBIAN, x[i : i + 16]) for i in (0, 16, 32)]
    np.testing.assert_array_equal(whole.dy_dx, np.concatenate([p.dy_dx for p in pieces]))
    assert whole.y.shape == (40, 2)


def test_batch_ladder_covers_every_size_up_to_the_max():
    assert batch_ladder(1) == [1]
    assert batch_ladder(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    assert batch_ladder(256)[-1] == 256


def test_device_resolution():
    assert resolve_device("cpu") == "/device:CPU:0"
    assert resolve_device("auto").endswith(":0")
    with pytest.raises(ModelError, match="GPU"):
        resolve_device("gpu:7")
    with pytest.raises(ModelError, match="auto, cpu or gpu:N"):
        resolve_device("tpu")


def test_unservable_models_are_refused(tmp_path):
    import keras

    with pytest.raises(ModelError, match="does not exist"):
        TensorFlowEngine(tmp_path / "missing.keras")
    bad = tmp_path / "garbage.keras"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(ModelError, match="cannot load"):
        TensorFlowEngine(bad)
    a, b = keras.Input(shape=(2,)), keras.Input(shape=(2,))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    two.save(tmp_path / "two.keras")
    with pytest.raises(ModelError, match="one input and one output"):
        TensorFlowEngine(tmp_path / "two.keras")
    with pytest.raises(ModelError, match=r"expected a \.keras or \.h5 file"):
        TensorFlowEngine(bad.rename(tmp_path / "model.onnx"))
