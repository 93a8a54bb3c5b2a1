"""The jax backend (`--backend jax`): Keras model files computed by Keras on JAX.

Keras takes its backend once per process, and this one runs Keras on TensorFlow, so every JAX
engine here is a real `gradserve serve --backend jax` in a child process, called with the SDK,
`tritonclient` and httpx. Each of its answers, every kind, is compared with the TensorFlow
engine's in this process (REFERENCE_RTOL), for a ReLU MLP (the bundled model), a conv model
(digits) and a tanh MLP with several inputs and outputs. The servers are deterministic, so
answers of one server are compared bit for bit only after its self-check passed.
"""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import (
    ServerProcess,
    assert_close,
    assert_every_kind_as_tensorflow,
    assert_same_answer,
    keras_repository,
    one_process_and_two_frontends,
    standard_and_rest_jacobians,
    unbatched,
)

from gradserve.client import GradientClient
from gradserve.server.config import BUNDLED_DIR, BUNDLED_MODEL
from gradserve.server.engine import jax_engine
from gradserve.server.engine.compiled import TensorFlowEngine
from gradserve.server.engine.errors import ModelError
from gradserve.wire.kinds import Derivative

MAX_BATCH = 16
DENSE_STACKS = ("quadratic", "mimo")  # float64_answer recomputes these from their weights


@pytest.fixture(scope="module")
def repository(tmp_path_factory, mimo_model_path) -> Path:
    """quadratic, digits and mimo, version 1 each."""
    return keras_repository(tmp_path_factory.mktemp("jax-repository"), {
        "quadratic": BUNDLED_MODEL, "digits": BUNDLED_DIR / "digits.keras",
        "mimo": mimo_model_path})  # fmt: skip


def _serve(repository: Path, *args: str) -> ServerProcess:
    return ServerProcess("--backend", "jax", "--model-repository", str(repository),
                         "--max-batch-size", str(MAX_BATCH), *args)  # fmt: skip


@pytest.fixture(scope="module")
def jax_server(repository):
    served = _serve(repository)
    try:
        yield served
    finally:
        assert served.stop() == 0


@pytest.fixture(scope="module")
def tensorflow_engines(repository) -> dict[str, TensorFlowEngine]:
    return {name: TensorFlowEngine(repository / name / "1" / "model.keras", xla=False, name=name)
            for name in ("quadratic", "digits", "mimo")}  # fmt: skip


@pytest.mark.parametrize("model", ["quadratic", "digits", "mimo"])
def test_every_kind_on_jax_equals_tensorflow_and_the_float64_reference(
    jax_server, tensorflow_engines, model
):
    """Against the TensorFlow engine, and for the Dense stacks also against the float64
    reference computed from the weights."""
    assert_every_kind_as_tensorflow(jax_server.target, tensorflow_engines[model], model,
                                    float64=model in DENSE_STACKS)  # fmt: skip


def test_the_trained_model_on_jax_gives_the_seeds_derivatives(jax_server, tensorflow_engines):
    """The trained weights, not a fresh initialisation: d/dx at 0.2 and 0.6 near 8(x - 0.5),
    and TensorFlow's numbers."""
    x = np.array([[0.2], [0.6]], np.float32)
    with GradientClient(jax_server.target, timeout=60) as client:
        got = client.evaluate(x, model="quadratic")
    np.testing.assert_allclose(got.dy_dx.ravel(), [8 * (0.2 - 0.5), 8 * (0.6 - 0.5)], atol=0.3)
    assert_close(got.dy_dx, tensorflow_engines["quadratic"].run(Derivative.GRADIENT, x).dy_dx)


def test_explanations_on_jax_equal_tensorflows(jax_server, tensorflow_engines):
    """Integrated gradients, which the core builds from the engine's gradients, on both
    backends: the same attributions and completeness gap within REFERENCE_RTOL."""
    x = np.random.default_rng(5).uniform(0, 1, (2, 3)).astype(np.float32)
    with GradientClient(jax_server.target, timeout=60) as client:
        got = client.integrated_gradients(x, steps=16, model="mimo")
    expected = unbatched(tensorflow_engines["mimo"], Derivative.INTEGRATED_GRADIENTS, x, steps=16)
    assert_close(got.attributions, expected.attributions)
    assert_close(got.delta, expected.delta, scale=float(np.abs(expected.attributions).max()))


def test_the_standard_protocol_and_rest_answer_as_the_sdk_on_jax(jax_server):
    x = np.random.default_rng(8).normal(size=(4, 3)).astype(np.float32)
    sdk, standard, rest = standard_and_rest_jacobians(jax_server, "mimo", x)
    assert_same_answer(standard, sdk)
    assert_same_answer(rest, sdk)


def test_a_deterministic_jax_server_passed_its_self_check_and_answers_rows_alike(jax_server):
    metrics = httpx.get(f"http://127.0.0.1:{jax_server.metrics_port}/metrics", timeout=10).text
    for model in ("quadratic", "digits", "mimo"):
        assert f'gradserve_deterministic_selfcheck{{model="{model}",version="1"}} 1.0' in metrics
    x = np.random.default_rng(2).normal(size=(13, 3)).astype(np.float32)
    with GradientClient(jax_server.target, timeout=60) as client:
        together = client.evaluate(x, "hessian", model="mimo")
        for i in (0, 6, 12):
            alone = client.evaluate(x[i : i + 1], "hessian", model="mimo")
            assert_same_answer(together.dy_dx[i : i + 1], alone.dy_dx)


def test_frontends_with_a_jax_engine_process_answer_as_one_process(repository, jax_server):
    x = np.random.default_rng(3).uniform(0, 1, (5, 8, 8, 1)).astype(np.float32)
    serve = functools.partial(_serve, repository)
    got, expected = one_process_and_two_frontends(jax_server.target, serve, "digits", x, "cpu:0")
    assert_same_answer(got.dy_dx, expected.dy_dx)
    assert_same_answer(got.y, expected.y)


def test_the_jax_engine_names_what_it_cannot_serve(tmp_path):
    with pytest.raises(ModelError, match="KERAS_BACKEND=jax"):  # this process runs Keras on TF
        jax_engine.JaxEngine(BUNDLED_MODEL)
    saved = tmp_path / "saved"
    saved.mkdir()
    with pytest.raises(ModelError, match="serve it with --backend tensorflow"):
        jax_engine._check_format(saved, None, None)
    with pytest.raises(ModelError, match="the jax backend serves Keras files"):
        jax_engine._check_format(BUNDLED_MODEL, "x", None)


JAX_LAYER_MODEL = """
import os, sys
os.environ["KERAS_BACKEND"] = "jax"
import jax.numpy as jnp, keras

@keras.saving.register_keras_serializable(package="tests")
def call_fn(params, inputs):
    return jnp.tanh(inputs @ params["w"])

@keras.saving.register_keras_serializable(package="tests")
def init_fn(rng, inputs):
    return {"w": jnp.ones((inputs.shape[-1], 2))}

x = keras.Input((3,), name="x")
layer = keras.layers.JaxLayer(call_fn, init_fn=init_fn, name="jax_tanh")
keras.Model(x, layer(x)).save(sys.argv[1])
"""


def test_a_layer_only_jax_has_is_refused_on_tensorflow_naming_it(tmp_path):
    path = tmp_path / "jax_only.keras"
    subprocess.run([sys.executable, "-c", JAX_LAYER_MODEL, str(path)], check=True, timeout=120,
                   capture_output=True)  # fmt: skip
    expected = "layer 'jax_tanh' is a JaxLayer, which only the jax backend has; serve this model "
    with pytest.raises(ModelError, match=expected + "with --backend jax"):
        TensorFlowEngine(path)


def test_a_lambda_written_for_tensorflow_fails_to_load_on_jax_naming_it(tmp_path):
    """The Lambda calls tf.math, which Keras on JAX cannot trace: the version fails to load, and
    the repository index says which layer and what to do; the server serves on."""
    import keras
    import tensorflow as tf

    x = keras.Input((3,), name="x")
    hidden = keras.layers.Lambda(lambda t: tf.math.softplus(t), name="tf_softplus")(x)
    model = keras.Model(x, keras.layers.Dense(1)(hidden))
    (tmp_path / "lambda" / "1").mkdir(parents=True)
    model.save(tmp_path / "lambda" / "1" / "model.keras")
    served = _serve(tmp_path, "--unsafe-deserialization", "on")
    try:
        url = f"http://127.0.0.1:{served.http_port}/v2/repository/index"
        index = httpx.post(url, json={}, timeout=30).json()
    finally:
        assert served.stop() == 0
    (entry,) = [entry for entry in index if entry["name"] == "lambda"]
    assert entry["state"] == "UNAVAILABLE", entry
    assert "cannot load" in entry["reason"] and "on the jax backend" in entry["reason"]
    assert "Lambda layer(s) 'tf_softplus'" in entry["reason"]
    assert "serve the model with that --backend (tensorflow for tf.* calls)" in entry["reason"]
