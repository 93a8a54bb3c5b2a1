"""Shared fixtures: the bundled engine, small test models, and real servers on free ports."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.server.app import GradServer
from gradserve.server.config import BUNDLED_MODEL, ServerConfig
from gradserve.server.core import explain
from gradserve.server.core.batcher import RequestResult
from gradserve.server.core.contract import ModelSpec, Outputs
from gradserve.server.core.explain import Limits
from gradserve.server.core.timing import SchedulerTiming
from gradserve.wire.kinds import Derivative

TEST_CONFIG = ServerConfig(
    port=0, max_batch_size=256, drain_seconds=5.0, metrics_port=0, http_port=0, deterministic=True
)

# Every engine and server in the tests is deterministic (--deterministic on): a row's answer,
# alone, next to other callers' rows, at any batch size, split or padded, is the same in every
# bit, so answers of one computation are compared with assert_same_answer, bit for bit. That
# promise is checked before it is relied on: a deterministic engine answers no kind before
# that kind's self-check passed on this machine (every position of a tile computes the same
# row alike; core/selfcheck.py), and raises SelfCheckFailed instead. Two
# different computations of the same quantity (another kind, another file format, another
# dtype, a float64 tape) are compared with assert_close, with one tolerance: REFERENCE_RTOL of
# the largest magnitude compared (float32 rounding of sums of products in another order; seen
# 4.5e-8 on values near 0.1, 3.9e-7 relative).
REFERENCE_RTOL = 1e-5


def assert_same_answer(actual, expected) -> None:
    """`actual` is the same answer as `expected`, to the bit: what the server promises for one
    row computed in any batch."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{actual.dtype} against {expected.dtype}"
    np.testing.assert_array_equal(actual, expected, strict=True)


def assert_close(actual, expected, scale: float | None = None) -> None:
    """`actual`, computed another way, equals `expected` within REFERENCE_RTOL of the largest
    magnitude compared, or of `scale` for a quantity that is a small difference of larger
    ones (integrated gradients' delta: of its attributions)."""
    expected = np.asarray(expected)
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=REFERENCE_RTOL, atol=REFERENCE_RTOL * scale)


def wait_until(predicate, timeout: float = 15.0) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_gradserve(
    port: int, *args: str, script: Path | None = None, **env: str
) -> subprocess.Popen:
    """`gradserve serve` in a child process (XLA and metrics off, deterministic, unless `env`
    says otherwise);
    `script`: a script that takes serve's flags instead (bench/stand_in.py)."""
    environment = {**os.environ, "GRADSERVE_XLA": "off", "GRADSERVE_METRICS_PORT": "0",
                   "GRADSERVE_HTTP_PORT": "0", "GRADSERVE_FRONTENDS": "1",
                   "GRADSERVE_DETERMINISTIC": "on", **env}  # fmt: skip
    command = [str(script)] if script else ["-m", "gradserve.server.cli", "serve"]
    return subprocess.Popen(
        [sys.executable, *command, "--port", str(port), *args],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def exited(process: subprocess.Popen, timeout: float) -> str:
    """Wait for a server expected to stop by itself; its stderr (killed if it does not)."""
    try:
        return process.communicate(timeout=timeout)[1]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)


def wait_serving(target: str, process: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until the server reports SERVING on several fresh connections in a row: with
    --frontends, each connection may reach another frontend, and each gets ready on its own.
    A server that never does is stopped, and the failure shows what the health checks got
    and the end of its log."""
    end = time.monotonic() + timeout
    in_a_row = 0
    seen: collections.Counter[str] = collections.Counter()
    while in_a_row < FRESH_CONNECTIONS_SERVING:
        if time.monotonic() >= end:
            process.terminate()
            try:
                log = process.communicate(timeout=30)[1]
            except subprocess.TimeoutExpired:
                process.kill()
                log = process.communicate(timeout=10)[1]
            answers = f"health checks answered {dict(seen)}"
            raise AssertionError(f"not ready in {timeout:g} s; {answers}; log:\n{log[-4000:]}")
        assert process.poll() is None, process.stderr.read()
        status = _health(target)
        seen[status] += 1
        in_a_row = in_a_row + 1 if status == "SERVING" else 0
        if in_a_row < FRESH_CONNECTIONS_SERVING:
            time.sleep(0.2 if in_a_row == 0 else 0.02)


FRESH_CONNECTIONS_SERVING = 4


def _health(target: str) -> str:
    """One health check on a connection of its own: the status's name, or the RPC's error."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(target, options=options) as channel:
        try:
            status = (
                health_pb2_grpc.HealthStub(channel)
                .Check(health_pb2.HealthCheckRequest(), timeout=1)
                .status
            )
        except grpc.RpcError as error:
            return error.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def load_script(relative_path: str, name: str):
    """Import a script of this repository that is not part of a package (bench/, deploy/)."""
    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class RunningServer:
    """A GradServer on its own event-loop thread, so tests can use the blocking SDK too.

    It starts at once and waits until it serves. With `load` (config -> engines) instead of
    `engine`, the models come from it; `ready=False` returns as soon as the server listens
    (health and liveness answer), while its models may still be loading; `start=False`
    leaves the start to `start()`. Give the config a port to know the target before then.
    """

    def __init__(
        self,
        config: ServerConfig,
        engine: object = None,
        *,
        load: Callable[[ServerConfig], list] | None = None,
        owner: object = None,
        ready: bool = True,
        start: bool = True,
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.server = GradServer(config, engine, load=load, owner=owner)
        self._started: concurrent.futures.Future | None = None
        self._ready = ready
        self.target = f"127.0.0.1:{config.port}"
        if start:
            self.start()

    def start(self) -> None:
        self._started = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop)
        if self._ready:
            self._started.result(timeout=60)
        else:  # listening: health answers from here on
            wait_until(lambda: self.server.port is not None or self._started.done(), 30)
        if self._started.done():
            self._started.result()  # a start that failed says why here
        self.target = f"127.0.0.1:{self.server.port}"

    def _call(self, coro, timeout: float):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    @property
    def batcher(self):
        return self.server.batchers[0]

    def on_loop(self, fn: Callable[[], object], timeout: float = 10):
        """fn() run on the server's event loop (where its state changes), and its result."""

        async def call():
            return fn()

        return self._call(call(), timeout)

    def stop(self) -> None:
        """Wait for the start to end (a held model load must have been released), drain and
        stop."""
        try:
            if self._started is not None:
                self._started.result(timeout=60)
                self._call(self.server.stop(grace=5), timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def spec_of(engine: object, max_batch_size: int = 64) -> ModelSpec:
    """The served spec of an engine or a fake with an engine's shapes."""
    return ModelSpec(engine.name, "1", tuple(engine.input_shape), tuple(engine.output_shape),
                     "cpu", max_batch_size, 1 << 20, np.dtype(engine.numpy_dtype).name)  # fmt: skip


UNLIMITED = Limits(max_rows=1 << 20, max_result_bytes=1 << 30)


def unbatched(
    engine: object, kind: Derivative, x: np.ndarray, v=None, *, limits=UNLIMITED, **options
):
    """One request answered alone, in process: its rows as expanded for its kind and options
    (targets, explanations, k tangents), in one engine call; the reference that served and
    batched answers are compared with."""
    work = explain.expand(spec_of(engine), limits, kind, x, v, explain.Options(**options))
    y, dy_dx = engine.run(work.kind, work.x, work.v)
    now = time.perf_counter()
    result = RequestResult(y, dy_dx, SchedulerTiming(0, 0, 0, len(work.x), now, now))
    return result if work.reduce is None else work.reduce(result)


def float64_answer(model, kind: Derivative, x: np.ndarray, v=None) -> Outputs:
    """y and `kind`'s dy_dx for rows x of a Keras stack of Dense layers, computed again from
    its weights in float64 with TensorFlow's tape: the independent reference of every kind,
    whichever backend served it."""
    y, gradients, jacobians, hessians = _float64_derivatives(model, x)
    if kind is Derivative.NONE:
        return Outputs(y, None)
    rows = [
        _row_answer(kind, gradients[i], jacobians[i], hessians[i], None if v is None else v[i])
        for i in range(x.shape[0])
    ]
    return Outputs(y, np.stack(rows))


_FLOAT64_DERIVATIVES: dict[tuple, tuple] = {}


def _float64_derivatives(model, x: np.ndarray) -> tuple[np.ndarray, ...]:
    """y [n, m], gradients [n, d], Jacobians [n, m, d] and Hessians [n, d, d] of every row, in
    float64, kept per (model, rows): every kind of a test asks for the same rows."""
    key = (id(model), x.shape, x.dtype.str, x.tobytes())
    if key in _FLOAT64_DERIVATIVES:
        return _FLOAT64_DERIVATIVES[key][1]
    import tensorflow as tf

    stack = [(tf.constant(np.asarray(layer.kernel), tf.float64),
              tf.constant(np.asarray(layer.bias), tf.float64), layer.activation.__name__)
             for layer in model.layers if layer.weights]  # fmt: skip

    def forward(h):
        for kernel, bias, activation in stack:
            h = tf.matmul(h, kernel) + bias
            if activation != "linear":
                h = getattr(tf.nn, activation)(h)
        return h

    rows = tf.constant(x, tf.float64)  # rows are independent: per-row Jacobians are exact
    with tf.GradientTape() as outer:
        outer.watch(rows)
        with tf.GradientTape(persistent=True) as inner:
            inner.watch(rows)
            y = forward(rows)
            total = tf.reduce_sum(y)
        gradients = inner.gradient(total, rows)
    jacobians = inner.batch_jacobian(y, rows)
    hessians = outer.batch_jacobian(gradients, rows)
    found = tuple(t.numpy() for t in (y, gradients, jacobians, hessians))
    _FLOAT64_DERIVATIVES[key] = (model, found)  # the model kept, so that its id stays its own
    return found


def _row_answer(kind: Derivative, gradient, jacobian, hessian, v) -> np.ndarray | None:
    """One row's dy_dx for `kind` from its gradient [d], Jacobian [m, d] and Hessian [d, d]."""
    if kind is Derivative.VJP:
        return v @ jacobian
    if kind is Derivative.JVP:
        return jacobian @ v
    if kind is Derivative.HVP:
        return hessian @ v
    return {Derivative.NONE: None, Derivative.GRADIENT: gradient, Derivative.JACOBIAN: jacobian,
            Derivative.HESSIAN: hessian}[kind]  # fmt: skip


ENGINE_FACE = (
    "name",
    "input_shape",
    "output_shape",
    "device",
    "numpy_dtype",
    "ladder",
    "in_flight",
    "takes_hints",
    "batch_cap",
)  # what the Engine protocol reads besides run


def wears_the_face_of(wrapper: object, engine: object) -> None:
    """Give a test's wrapper of an engine that engine's shapes, device and abilities."""
    for attr in ENGINE_FACE:
        setattr(wrapper, attr, getattr(engine, attr))


class GatedEngine:
    """Wraps a real engine: blocks each call until the gate opens, records rows computed."""

    def __init__(self, engine: object) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.gate.set()
        self.calls: list[tuple[Derivative, np.ndarray]] = []
        self.entered = 0  # engine calls started (possibly still waiting at the gate)
        wears_the_face_of(self, engine)

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        self.entered += 1
        if not self.gate.wait(timeout=30):
            raise TimeoutError("test gate never opened")
        self.calls.append((kind, x.copy()))
        return self._engine.run(kind, x, v)

    @property
    def rows_computed(self) -> int:
        return sum(x.shape[0] for _, x in self.calls)


@pytest.fixture(scope="session")
def bundled_engine():
    from gradserve.server.engine.compiled import TensorFlowEngine

    engine = TensorFlowEngine(
        BUNDLED_MODEL, xla=True, max_batch_size=TEST_CONFIG.max_batch_size, deterministic=True
    )
    engine.warm_up()
    return engine


@pytest.fixture(scope="session")
def server(bundled_engine) -> Iterator[RunningServer]:
    with RunningServer(TEST_CONFIG, bundled_engine) as running:
        yield running


@pytest.fixture
def gated_server(bundled_engine) -> Iterator[tuple[RunningServer, GatedEngine]]:
    """A server whose engine waits for `gate`; small queue so it fills quickly."""
    gated = GatedEngine(bundled_engine)
    config = replace(TEST_CONFIG, max_queue_rows=64)
    with RunningServer(config, gated) as running:
        yield running, gated
        gated.gate.set()


@pytest.fixture(scope="session")
def mimo_model_path(tmp_path_factory) -> Path:
    """A smooth 3-input, 2-output model (tanh), saved as .keras."""
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input(shape=(3,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(2),
        ]
    )
    path = tmp_path_factory.mktemp("models") / "mimo.keras"
    model.save(path)
    return path


@pytest.fixture(scope="session")
def mimo_engine(mimo_model_path):
    from gradserve.server.engine.compiled import TensorFlowEngine

    engine = TensorFlowEngine(mimo_model_path, xla=False, max_batch_size=64, deterministic=True)
    engine.warm_up()
    return engine


@pytest.fixture(scope="session")
def mimo_server(mimo_engine) -> Iterator[RunningServer]:
    with RunningServer(replace(TEST_CONFIG, max_batch_size=64), mimo_engine) as running:
        yield running


class ServerProcess:
    """`gradserve serve` in a child process (the multi-process server needs its own)."""

    def __init__(self, *args: str, script: Path | None = None, **env: str) -> None:
        self.port, self.metrics_port, self.http_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        ports = ("--metrics-port", str(self.metrics_port), "--http-port", str(self.http_port))
        self.process = start_gradserve(self.port, *ports, *args, script=script, **env)
        wait_serving(self.target, self.process, timeout=240)

    def stop(self) -> int:
        """SIGTERM (drain); the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise


FRONTENDS_ARGS = ("--frontends", "2", "--max-batch-size", str(TEST_CONFIG.max_batch_size))


@pytest.fixture(scope="session")
def frontends_server() -> Iterator[ServerProcess]:
    """The bundled model behind 2 frontend processes and one engine process (XLA on, as in
    the in-process `server`)."""
    running = ServerProcess(*FRONTENDS_ARGS, GRADSERVE_XLA="on")
    try:
        yield running
    finally:
        assert running.stop() == 0


# ---- the backends' servers, compared alike -----------------------------------------------


def keras_repository(root: Path, models: dict[str, Path]) -> Path:
    """A model repository under `root`: version 1 of each named Keras file."""
    import shutil

    for name, source in models.items():
        (root / name / "1").mkdir(parents=True)
        shutil.copy(source, root / name / "1" / "model.keras")
    return root


def rows_and_vectors(input_shape, output_shape, kind: Derivative, n: int, seed: int):
    """n random rows in [0, 1] (image pixels too) and kind's vector, float32."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, *input_shape)).astype(np.float32)
    shape = {Derivative.VJP: output_shape, Derivative.JVP: input_shape,
             Derivative.HVP: input_shape}.get(kind)  # fmt: skip
    v = None if shape is None else rng.normal(size=(n, *shape)).astype(np.float32)
    return x, v


def assert_every_kind_as_tensorflow(target: str, engine, model: str, float64: bool) -> None:
    """Every engine kind served for `model` at `target` equals the TensorFlow `engine`'s
    answer and, with `float64` (a Dense stack), the float64 reference, within
    REFERENCE_RTOL."""
    from gradserve.client import GradientClient
    from gradserve.server.core.contract import ENGINE_KINDS

    with GradientClient(target, timeout=60) as client:
        for seed, kind in enumerate(ENGINE_KINDS):
            x, v = rows_and_vectors(engine.input_shape, engine.output_shape, kind, 3, seed)
            served = client.evaluate(x, kind.value, v=v, model=model)
            references = [engine.run(kind, x, v)]
            if float64:
                references.append(float64_answer(engine.model, kind, x, v))
            for expected in references:
                assert_close(served.y.reshape(expected.y.shape), expected.y)
                if expected.dy_dx is not None:
                    assert_close(served.dy_dx.reshape(expected.dy_dx.shape), expected.dy_dx)


def standard_and_rest_jacobians(server, model: str, x: np.ndarray):
    """The SDK's Jacobian of rows x, and the same request's over the standard protocol's
    gRPC (tritonclient) and over REST (httpx), as arrays of the SDK's shape."""
    import httpx
    import tritonclient.grpc as triton

    from gradserve.client import GradientClient

    with GradientClient(server.target, timeout=60) as client:
        sdk = client.evaluate(x, "jacobian", model=model)
    tensor = triton.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    with triton.InferenceServerClient(server.target) as standard:
        answer = standard.infer(model, [tensor], parameters={"derivative": "jacobian"})
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.ravel().tolist()}],
            "parameters": {"derivative": "jacobian"}}  # fmt: skip
    url = f"http://127.0.0.1:{server.http_port}/v2/models/{model}/infer"
    rest = httpx.post(url, json=body, timeout=30)
    assert rest.status_code == 200, rest.text
    outputs = {o["name"]: o for o in rest.json()["outputs"]}
    rest_dy_dx = np.asarray(outputs["dy_dx"]["data"], np.float32).reshape(sdk.dy_dx.shape)
    return sdk.dy_dx, answer.as_numpy("dy_dx").reshape(sdk.dy_dx.shape), rest_dy_dx


def one_process_and_two_frontends(target: str, serve, model: str, x: np.ndarray, device: str):
    """`model`'s answers for rows x from the one-process server at `target`, and from the
    server `serve("--frontends", "2")` starts (stopped here: exit status 0), once that server
    said it computes on `device`: (two frontends' answer, one process's answer)."""
    from gradserve.client import GradientClient

    with GradientClient(target, timeout=60) as client:
        expected = client.evaluate(x, model=model)
    served = serve("--frontends", "2")
    try:
        with GradientClient(served.target, timeout=60) as client:
            got = client.evaluate(x, model=model)
            assert client.model_info(model).device == device
    finally:
        assert served.stop() == 0
    return got, expected
