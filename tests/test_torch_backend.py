"""The torch backend (`--backend torch`): Keras model files computed by Keras on PyTorch, and
native PyTorch programs (`torch.export`, `.pt2`).

Keras takes its backend once per process, and this one runs Keras on TensorFlow, so every
torch engine here is a real `gradserve serve --backend torch` in a child process, called with
the SDK, `tritonclient` and httpx. Keras models' answers, every kind, are compared with the
TensorFlow engine's in this process and, for the Dense stacks, with the float64 reference
(REFERENCE_RTOL). The `.pt2` programs (an MLP and a small conv net, exported here with a
dynamic batch) are compared with float64 derivatives of the same module computed here with
`torch.autograd.functional`, one row at a time.
"""

from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import (
    ServerProcess,
    assert_close,
    assert_every_kind_as_tensorflow,
    assert_same_answer,
    keras_repository,
    one_process_and_two_frontends,
    rows_and_vectors,
    standard_and_rest_jacobians,
    unbatched,
)

from gradserve.client import GradientClient
from gradserve.server.config import BUNDLED_DIR, BUNDLED_MODEL
from gradserve.server.core.contract import ENGINE_KINDS, Outputs
from gradserve.server.core.selfcheck import VECTOR_LEVELS, supported_levels
from gradserve.server.engine import torch_engine
from gradserve.server.engine.compiled import TensorFlowEngine
from gradserve.server.engine.errors import ModelError
from gradserve.wire.kinds import Derivative

MAX_BATCH = 16
DENSE_STACKS = ("quadratic", "mimo")  # float64_answer recomputes these from their weights
KERAS_MODELS = ("quadratic", "digits", "mimo")


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(4, 16)
        self.out = torch.nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


class ConvNet(torch.nn.Module):
    """[n, 1, 6, 6] -> [n, 2]: a convolution, softplus, and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.head = torch.nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.softplus(self.conv(x)).flatten(1))


def export(module: torch.nn.Module, row_shape: tuple[int, ...], path: Path, dynamic=True):
    torch.manual_seed(0)
    example = torch.randn(4, *row_shape)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=shapes), path)


@pytest.fixture(scope="module")
def programs() -> dict[str, torch.nn.Module]:
    torch.manual_seed(1)
    return {"mlp": MLP().eval(), "conv": ConvNet().eval()}


@pytest.fixture(scope="module")
def repository(tmp_path_factory, mimo_model_path, programs) -> Path:
    """quadratic, digits and mimo as .keras, mlp and conv as .pt2; version 1 each."""
    root = keras_repository(tmp_path_factory.mktemp("torch-repository"), {
        "quadratic": BUNDLED_MODEL, "digits": BUNDLED_DIR / "digits.keras",
        "mimo": mimo_model_path})  # fmt: skip
    for name, shape in (("mlp", (4,)), ("conv", (1, 6, 6))):
        (root / name / "1").mkdir(parents=True)
        export(programs[name], shape, root / name / "1" / "model.pt2")
    return root


def _serve(repository: Path, *args: str, **env: str) -> ServerProcess:
    """Not deterministic unless `args` say so: on some CPUs a convolution's gradient differs
    between positions of a tile, and the self-check then refuses the conv models
    (docs: Backends)."""
    return ServerProcess("--backend", "torch", "--model-repository", str(repository),
                         "--max-batch-size", str(MAX_BATCH), "--deterministic", "off",
                         *args, **env)  # fmt: skip


@pytest.fixture(scope="module")
def torch_server(repository):
    served = _serve(repository)
    try:
        yield served
    finally:
        assert served.stop() == 0


@pytest.fixture(scope="module")
def tensorflow_engines(repository) -> dict[str, TensorFlowEngine]:
    return {name: TensorFlowEngine(repository / name / "1" / "model.keras", xla=False, name=name)
            for name in KERAS_MODELS}  # fmt: skip


def float64_program_answer(module: torch.nn.Module, kind: Derivative, x, v=None) -> Outputs:
    """y and `kind`'s dy_dx of a PyTorch module in float64, one row at a time, with
    torch.autograd.functional (not torch.func, which the engine uses)."""
    double = copy.deepcopy(module).double()
    ys, derivatives = [], []
    for i, row in enumerate(torch.from_numpy(x.astype(np.float64))):
        vector = None if v is None else torch.from_numpy(v[i].astype(np.float64))

        def f(r):
            return double(r[None])[0]

        y = f(row).detach()
        jacobian = torch.autograd.functional.jacobian(f, row)  # [*Y, *X]
        flat = jacobian.reshape(y.numel(), row.numel())
        if kind is Derivative.GRADIENT:
            derivative = flat.sum(0).reshape(row.shape)
        elif kind is Derivative.JACOBIAN:
            derivative = jacobian
        elif kind is Derivative.VJP:
            derivative = (vector.reshape(-1) @ flat).reshape(row.shape)
        elif kind is Derivative.JVP:
            derivative = (flat @ vector.reshape(-1)).reshape(y.shape)
        elif kind in (Derivative.HESSIAN, Derivative.HVP):
            hessian = torch.autograd.functional.hessian(lambda r: f(r).sum(), row)
            square = hessian.reshape(row.numel(), row.numel())
            derivative = (
                hessian
                if kind is Derivative.HESSIAN
                else (square @ vector.reshape(-1)).reshape(row.shape)
            )
        else:
            derivative = None
        ys.append(y.numpy())
        derivatives.append(None if derivative is None else derivative.numpy())
    dy_dx = None if derivatives[0] is None else np.stack(derivatives)
    return Outputs(np.stack(ys), dy_dx)


@pytest.mark.parametrize("model", KERAS_MODELS)
def test_every_kind_of_keras_on_torch_equals_tensorflow_and_the_float64_reference(
    torch_server, tensorflow_engines, model
):
    assert_every_kind_as_tensorflow(torch_server.target, tensorflow_engines[model], model,
                                    float64=model in DENSE_STACKS)  # fmt: skip


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_every_kind_of_a_pt2_program_equals_its_float64_derivatives(torch_server, programs, model):
    module = programs[model]
    with GradientClient(torch_server.target, timeout=60) as client:
        info = client.model_info(model)
        input_shape, output_shape = tuple(info.input_shape), tuple(info.output_shape)
        assert input_shape == {"mlp": (4,), "conv": (1, 6, 6)}[model]
        for seed, kind in enumerate(ENGINE_KINDS):
            x, v = rows_and_vectors(input_shape, output_shape, kind, 3, 10 + seed)
            served = client.evaluate(x, kind.value, v=v, model=model)
            expected = float64_program_answer(module, kind, x, v)
            assert_close(served.y.reshape(expected.y.shape), expected.y)
            if expected.dy_dx is not None:
                assert_close(served.dy_dx.reshape(expected.dy_dx.shape), expected.dy_dx)


def test_the_trained_model_on_torch_gives_the_seeds_derivatives(torch_server, tensorflow_engines):
    """The trained weights, not a fresh initialisation: d/dx = -2.353 at 0.2 (the seed's
    check), near 8(x - 0.5) at 0.6, and TensorFlow's numbers."""
    x = np.array([[0.2], [0.6]], np.float32)
    with GradientClient(torch_server.target, timeout=60) as client:
        got = client.evaluate(x, model="quadratic")
    assert round(float(got.dy_dx.ravel()[0]), 3) == -2.353
    np.testing.assert_allclose(got.dy_dx.ravel(), [8 * (0.2 - 0.5), 8 * (0.6 - 0.5)], atol=0.3)
    assert_close(got.dy_dx, tensorflow_engines["quadratic"].run(Derivative.GRADIENT, x).dy_dx)


def test_explanations_and_k_tangents_on_torch_equal_tensorflows(torch_server, tensorflow_engines):
    """Integrated gradients and k tangents per row, which the core builds from the engine's
    kinds, on both backends."""
    engine = tensorflow_engines["mimo"]
    x = np.random.default_rng(5).uniform(0, 1, (2, 3)).astype(np.float32)
    tangents = np.random.default_rng(6).normal(size=(2, 4, 3)).astype(np.float32)
    with GradientClient(torch_server.target, timeout=60) as client:
        got = client.integrated_gradients(x, steps=16, model="mimo")
        jvps = client.evaluate(x, "jvp", v=tangents, model="mimo")
    expected = unbatched(engine, Derivative.INTEGRATED_GRADIENTS, x, steps=16)
    assert_close(got.attributions, expected.attributions)
    assert_close(got.delta, expected.delta, scale=float(np.abs(expected.attributions).max()))
    assert_close(jvps.dy_dx, unbatched(engine, Derivative.JVP, x, tangents).dy_dx)


def test_the_standard_protocol_and_rest_answer_as_the_sdk_on_torch(torch_server):
    x = np.random.default_rng(8).normal(size=(4, 4)).astype(np.float32)
    sdk, standard, rest = standard_and_rest_jacobians(torch_server, "mlp", x)
    assert_close(standard, sdk)
    assert_close(rest, sdk)


@pytest.mark.parametrize("level", VECTOR_LEVELS, ids=lambda level: level.name)
def test_a_deterministic_torch_server_passed_its_self_check_and_answers_rows_alike(
    repository, level
):
    """Dense models keep the promise at every vector level this CPU has (PyTorch's, MKL's
    and oneDNN's kernels capped at it): the self-check passed (its metric is 1), and rows
    computed alone and in a batch are then the same to the bit."""
    if level not in supported_levels():
        pytest.skip(f"this CPU lacks {level.name}")
    dense = repository.parent / f"torch-dense-{level.cpu_flag}"
    for name in ("mimo", "mlp"):
        shutil.copytree(repository / name, dense / name)
    served = _serve(dense, "--deterministic", "on", **level.cap())
    try:
        metrics = httpx.get(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10).text
        x = np.random.default_rng(2).normal(size=(13, 4)).astype(np.float32)
        with GradientClient(served.target, timeout=60) as client:
            together = client.evaluate(x, "hessian", model="mlp")
            alone = [client.evaluate(x[i : i + 1], "hessian", model="mlp") for i in (0, 6, 12)]
    finally:
        assert served.stop() == 0
    for model in ("mimo", "mlp"):
        assert f'gradserve_deterministic_selfcheck{{model="{model}",version="1"}} 1.0' in metrics
    for i, one in zip((0, 6, 12), alone, strict=True):
        assert_same_answer(together.dy_dx[i : i + 1], one.dy_dx)


def test_frontends_with_a_torch_engine_process_answer_as_one_process(repository, torch_server):
    x = np.random.default_rng(3).uniform(0, 1, (5, 1, 6, 6)).astype(np.float32)
    serve = functools.partial(_serve, repository)
    got, expected = one_process_and_two_frontends(torch_server.target, serve, "conv", x, "cpu")
    assert_close(got.dy_dx, expected.dy_dx)
    assert_close(got.y, expected.y)


def test_a_program_without_a_dynamic_batch_is_refused_saying_how_to_export_it(tmp_path):
    path = tmp_path / "fixed.pt2"
    export(MLP().eval(), (4,), path, dynamic=False)
    with pytest.raises(ModelError, match=r"fixed shape \[4, 4\].*dynamic_shapes=.*Dim\('batch'\)"):
        torch_engine.TorchEngine(path)


def test_the_torch_engine_names_what_it_cannot_serve(tmp_path):
    with pytest.raises(ModelError, match="KERAS_BACKEND=torch"):  # this process runs Keras on TF
        torch_engine.TorchEngine(BUNDLED_MODEL)
    with pytest.raises(ModelError, match="--input and --output"):
        torch_engine.TorchEngine(BUNDLED_MODEL, input_name="x")
    with pytest.raises(ModelError, match="cuda"):
        torch_engine.resolve_device("tpu:0")
