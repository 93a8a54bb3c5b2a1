"""Model versions end to end: a repository on disk, real TensorFlow models, a real server and
real clients (the SDK, tritonclient). Versions differ in their weights: version w of `lin`
is y = w * x, so its gradient is w in every bit and an answer shows which version computed
it; a mixture of versions in one answer would show as rows (or attributions) of two."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from prometheus_client import generate_latest
from tritonclient.utils import InferenceServerException

from gradserve.client import GradientClient, GradserveError
from gradserve.server.core.repository import Repository
from gradserve.server.engine.startup import load_version
from tests.conftest import (
    TEST_CONFIG,
    GatedEngine,
    RunningServer,
    ServerProcess,
    free_port,
    wait_until,
)

WEIGHTS = {1: 1.0, 2: 3.0, 3: 5.0}  # version -> w; exact in float32, as is w * x for these x
X = np.array([[0.25], [0.5], [-1.0], [2.0]], np.float32)
CALLERS = 8


def _save(folder: Path, w: float) -> None:
    """A Keras file of y = w * x (one Dense unit, no bias) in `folder`."""
    import keras

    model = keras.Sequential(
        [keras.Input(shape=(1,)), keras.layers.Dense(1, use_bias=False)], name="lin"
    )
    model.layers[0].set_weights([np.array([[w]], np.float32)])
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / "model.keras")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[int, Path]:
    """Each version's folder, built once; tests copy them into their own repository."""
    root = tmp_path_factory.mktemp("versions")
    for version, w in WEIGHTS.items():
        _save(root / str(version), w)
    return {version: root / str(version) for version in WEIGHTS}


def _drop(built: dict[int, Path], repository: Path, version: int, name: str = "lin") -> None:
    """Put a version in the repository as a deployment should: written elsewhere, then
    renamed into place in one step (a poll never sees half a version)."""
    staging = repository.parent / f"staging-{name}-{version}"
    staging.mkdir()
    os.link(built[version] / "model.keras", staging / "model.keras")
    (repository / name).mkdir(parents=True, exist_ok=True)
    os.rename(staging, repository / name / str(version))


def _config(repository: Path, control: str, **changes) -> object:
    return replace(TEST_CONFIG, model="", model_repository=str(repository), xla=False,
                   model_control=control, poll_seconds=0.1, **changes)  # fmt: skip


def _states(client: GradientClient) -> dict[str, str]:
    return {v.version: v.state for v in client.repository_index() if v.model == "lin"}


def _version_of(answer) -> int:
    """Which version computed an answer: every row's gradient is that version's w."""
    gradients = set(answer.dy_dx.ravel().tolist())
    assert len(gradients) == 1, f"rows of one answer from several versions: {gradients}"
    (w,) = gradients
    assert answer.y.ravel().tolist() == (w * X).ravel().tolist()
    return {weight: version for version, weight in WEIGHTS.items()}[w]


class _Callers:
    """CALLERS threads sending gradients of X continuously, each with its own SDK client;
    every answer's version and latency, and every failure, recorded."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._stop = threading.Event()
        self.answers: list[tuple[float, float, int]] = []  # started, seconds, version
        self.failures: list[GradserveError] = []
        self._threads = [threading.Thread(target=self._call, daemon=True) for _ in range(CALLERS)]
        for thread in self._threads:
            thread.start()

    def _call(self) -> None:
        with GradientClient(self._target, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    answer = client.evaluate(X, "gradient", model="lin")
                except GradserveError as error:
                    self.failures.append(error)
                    continue
                self.answers.append((started, time.monotonic() - started, _version_of(answer)))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def p99_ms(self, since: float, until: float) -> float:
        latencies = [s for started, s, _ in self.answers if since <= started < until]
        return float(np.percentile(latencies, 99)) * 1e3 if latencies else float("nan")


def _swap_under_load(target: str, swap) -> tuple[_Callers, dict[str, float]]:
    """Callers before, during and after `swap()` (which returns once version 2 is READY and
    version 1 released); the moments, for the assertions and the figures."""
    callers = _Callers(target)
    with GradientClient(target, timeout=60) as client:
        wait_until(lambda: len(callers.answers) > 50, 60)
        began = time.monotonic()
        swap(client)
        wait_until(lambda: _states(client).get("2") == "READY", 120)
        ready = time.monotonic()
        wait_until(lambda: _states(client).get("1") == "UNAVAILABLE", 60)
        released = time.monotonic()
        wait_until(lambda: sum(1 for a in callers.answers if a[0] > released) > 50, 60)
    callers.stop()
    moments = {"began": began, "ready": ready, "released": released}
    first = callers.answers[0][0]
    print(f"swap: {len(callers.answers)} answers, {len(callers.failures)} failed; p99 before "
          f"{callers.p99_ms(first, began):.1f} ms, during {callers.p99_ms(began, released):.1f} "
          f"ms; swap {released - began:.2f} s")  # fmt: skip
    return callers, moments


def _assert_clean_swap(callers: _Callers, moments: dict[str, float]) -> None:
    assert callers.failures == []
    versions = [version for _, _, version in callers.answers]
    assert set(versions) == {1, 2}
    # From version 1's release on (every frontend has let it go), only version 2 answers.
    assert {v for started, _, v in callers.answers if started > moments["released"]} == {2}
    assert {v for started, _, v in callers.answers if started < moments["began"]} == {1}


def test_a_version_dropped_into_a_polled_repository_swaps_under_load(tmp_path, built):
    """8 callers sending gradients while version 2 is dropped in: no call fails, each answer
    is exactly one version's, and once version 2 serves every new call gets it; version 1 is
    released once its last request is answered (UNAVAILABLE in the index), and the swap is
    in the metrics."""
    repository = tmp_path / "repository"
    _drop(built, repository, 1)
    with RunningServer(_config(repository, "poll")) as running:
        callers, moments = _swap_under_load(running.target, lambda c: _drop(built, repository, 2))
        metrics = generate_latest(running.server.metrics.registry).decode()
    _assert_clean_swap(callers, moments)
    # One process: from the moment version 2 is READY every new call gets it.
    assert {v for started, _, v in callers.answers if started > moments["ready"]} == {2}
    assert 'gradserve_model_versions_served{model="lin"} 1.0' in metrics
    assert 'gradserve_model_version_loads_total{model="lin",outcome="ok"} 2.0' in metrics
    assert 'gradserve_model_swap_seconds_count{model="lin"} 1.0' in metrics


def _gated_owner(config, gated: dict[int, GatedEngine]) -> Repository:
    """The configured repository, whose version 1 computes behind a gate the test opens."""

    def load(name: str, version: int, path: Path):
        engine = load_version(config, None, name, version, path)
        if version == 1:
            gated[1] = GatedEngine(engine)
            return gated[1]
        return engine

    return Repository(config.model_sources, load, control=config.model_control)


@contextlib.contextmanager
def _gated_server(tmp_path: Path, built: dict[int, Path]) -> Iterator[tuple]:
    """Version 1 of `lin`, loaded on request (explicit control), its gate closed once it is
    loaded: (the server, an SDK client, version 1's GatedEngine, the repository folder)."""
    repository = tmp_path / "repository"
    _drop(built, repository, 1)
    config = _config(repository, "explicit")
    gated: dict[int, GatedEngine] = {}
    with (
        RunningServer(config, owner=_gated_owner(config, gated)) as running,
        GradientClient(running.target, timeout=60) as client,
    ):
        client.load_model("lin")
        gated[1].gate.clear()
        try:
            yield running, client, gated[1], repository
        finally:
            gated[1].gate.set()


def test_an_explanation_straddling_a_swap_is_computed_on_one_version(tmp_path, built):
    """Integrated gradients whose 4 x 513 path rows span several batches, admitted on version
    1; version 2 is loaded while they wait: a call admitted then goes to version 2, the
    explanation is answered wholly by version 1 (attributions w1 * x, completeness holds),
    and only then is version 1 released. (The gate holds the one engine thread, so the new
    call computes once it opens.)"""
    with (
        _gated_server(tmp_path, built) as (running, client, gated, repository),
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        explained = pool.submit(client.integrated_gradients, X, steps=512, model="lin")
        wait_until(lambda: gated.entered > 0)
        _drop(built, repository, 2)
        client.load_model("lin")
        assert _states(client) == {"1": "UNLOADING", "2": "READY"}
        after = pool.submit(client.evaluate, X, model="lin")
        wait_until(lambda: running.server.batchers[-1].pending == 1)
        gated.gate.set()
        answer = explained.result(timeout=60)
        assert _version_of(after.result(timeout=60)) == 2
        assert gated.rows_computed == len(X) * 513
        np.testing.assert_allclose(answer.attributions, WEIGHTS[1] * X, rtol=1e-6)
        np.testing.assert_allclose(answer.delta, 0, atol=1e-5)
        wait_until(lambda: _states(client)["1"] == "UNAVAILABLE")


def test_unloading_a_model_answers_its_queued_requests_then_refuses_new_ones(tmp_path, built):
    with (
        _gated_server(tmp_path, built) as (running, client, gated, _repository),
        concurrent.futures.ThreadPoolExecutor(6) as pool,
    ):
        queued = [pool.submit(client.evaluate, X, model="lin") for _ in range(6)]
        wait_until(lambda: gated.entered > 0 and running.server.batchers[0].pending == 6)
        client.unload_model("lin")
        with pytest.raises(GradserveError) as refused:
            client.evaluate(X, model="lin")
        assert refused.value.code == grpc.StatusCode.NOT_FOUND
        gated.gate.set()
        assert [_version_of(f.result(timeout=60)) for f in queued] == [1] * 6
        wait_until(lambda: _states(client)["1"] == "UNAVAILABLE")
        (status,) = client.repository_index()
        assert status.reason == "unloaded"


def test_explicit_load_and_unload_through_tritonclient_and_a_corrupt_version(tmp_path, built):
    """tritonclient loads, indexes, infers on a named version and unloads; a corrupt version
    3 fails its load with the reason, is reported (index, ModelReady, metric, log), and
    version 2 keeps serving."""
    repository = tmp_path / "repository"
    _drop(built, repository, 2)
    with RunningServer(_config(repository, "explicit")) as running:
        triton_client = triton.InferenceServerClient(running.target)
        index = triton_client.get_model_repository_index(as_json=True)
        assert index["models"] == [{"name": "lin", "version": "2", "state": "UNAVAILABLE",
                                    "reason": "not loaded"}]  # fmt: skip
        assert not triton_client.is_model_ready("lin")
        triton_client.load_model("lin")
        assert triton_client.is_model_ready("lin") and triton_client.is_model_ready("lin", "2")
        x = triton.InferInput("x", [len(X), 1], "FP32")
        x.set_data_from_numpy(X)
        result = triton_client.infer("lin", [x], model_version="2")
        np.testing.assert_array_equal(result.as_numpy("dy_dx"), np.full_like(X, WEIGHTS[2]))
        broken = repository / "lin" / "3"
        broken.mkdir()
        (broken / "model.keras").write_bytes(b"not a keras file")
        with pytest.raises(InferenceServerException, match="version 3 of 'lin' failed to load"):
            triton_client.load_model("lin")
        assert triton_client.is_model_ready("lin", "2") and not triton_client.is_model_ready(
            "lin", "3"
        )
        states = {m["version"]: m for m in triton_client.get_model_repository_index(
            as_json=True)["models"]}  # fmt: skip
        assert states["2"]["state"] == "READY" and states["3"]["state"] == "UNAVAILABLE"
        assert "failed to load" in states["3"]["reason"]
        metrics = generate_latest(running.server.metrics.registry).decode()
        assert 'gradserve_model_version_loads_total{model="lin",outcome="failed"} 1.0' in metrics
        with GradientClient(running.target, timeout=30) as client:
            assert _version_of(client.evaluate(X, model="lin")) == 2
            with pytest.raises(GradserveError, match="version 3 of 'lin' failed") as failed:
                client.load_model("lin")
            assert failed.value.code == grpc.StatusCode.FAILED_PRECONDITION
        triton_client.unload_model("lin")
        wait_until(lambda: not triton_client.is_model_ready("lin"))
        with pytest.raises(InferenceServerException, match="not loaded"):
            triton_client.unload_model("lin")
        triton_client.close()


def test_latest_two_serves_both_and_specific_pins_one(tmp_path, built):
    repository = tmp_path / "repository"
    _drop(built, repository, 1)
    _drop(built, repository, 2)
    (repository / "lin" / "model.toml").write_text('version_policy = "latest 2"\n')
    with (
        RunningServer(_config(repository, "poll")) as running,
        GradientClient(running.target, timeout=30) as client,
    ):
        assert _version_of(client.evaluate(X, model="lin")) == 2  # the default: highest
        assert _version_of(client.evaluate(X, model="lin", version="1")) == 1
        assert [m.version for m in client.list_models()] == ["1", "2"]
        triton_client = triton.InferenceServerClient(running.target)
        assert triton_client.get_model_metadata("lin", as_json=True)["versions"] == ["1", "2"]
        triton_client.close()
        (repository / "lin" / "model.toml").write_text('version_policy = "specific 1"\n')
        wait_until(lambda: _states(client) == {"1": "READY", "2": "UNAVAILABLE"}, 60)
        assert _version_of(client.evaluate(X, model="lin")) == 1
        with pytest.raises(GradserveError, match="version '2' of model 'lin' is not served"):
            client.evaluate(X, model="lin", version="2")


def test_the_same_through_two_frontends(tmp_path, built):
    """--frontends 2: the engine process owns the repository; the frontends learn each version
    as it serves. Explicit loads through the SDK, then the swap under 8 callers."""
    repository = tmp_path / "repository"
    _drop(built, repository, 1)
    flags = ("--model", "", "--model-repository", str(repository), "--model-control", "explicit")
    server = ServerProcess("--frontends", "2", *flags, GRADSERVE_XLA="off")
    try:
        with GradientClient(server.target, timeout=120) as client:
            client.load_model("lin")
            wait_until(lambda: _all_frontends_serve(server.target, 1), 30)

        def swap(client: GradientClient) -> None:
            _drop(built, repository, 2)
            client.load_model("lin")

        callers, moments = _swap_under_load(server.target, swap)
        _assert_clean_swap(callers, moments)
    finally:
        assert server.stop() == 0


def _all_frontends_serve(target: str, version: int) -> bool:
    """Fresh connections (each may reach either frontend) all find the version served."""
    for _ in range(6):
        with GradientClient(target, timeout=30) as client:
            if _version_of(client.evaluate(X, model="lin")) != version:
                return False
    return True


def test_the_rest_repository_endpoints(tmp_path, built):
    """Triton's repository extension over HTTP: index, load, ready per version, unload; a
    body with parameters is refused, and a server not in explicit mode refuses the load."""
    import httpx

    repository = tmp_path / "repository"
    _drop(built, repository, 1)
    port = free_port()
    with RunningServer(_config(repository, "explicit", http_port=port)):
        url = f"http://127.0.0.1:{port}/v2"
        index = httpx.post(f"{url}/repository/index", timeout=30).json()
        assert index == [{"name": "lin", "version": "1", "state": "UNAVAILABLE",
                          "reason": "not loaded"}]  # fmt: skip
        assert httpx.get(f"{url}/models/lin/ready", timeout=30).status_code == 503
        refused = httpx.post(f"{url}/repository/models/lin/load",
                             json={"parameters": {"config": "{}"}}, timeout=30)  # fmt: skip
        assert refused.status_code == 400 and "parameters" in refused.json()["error"]
        assert httpx.post(f"{url}/repository/models/lin/load", timeout=60).status_code == 200
        assert httpx.get(f"{url}/models/lin/versions/1/ready", timeout=30).status_code == 200
        assert httpx.get(f"{url}/models/lin/versions/7/ready", timeout=30).status_code == 404
        ready = httpx.post(f"{url}/repository/index", json={"ready": True}, timeout=30).json()
        assert [(m["version"], m["state"]) for m in ready] == [("1", "READY")]
        assert httpx.post(f"{url}/repository/models/lin/unload", timeout=30).status_code == 200
        wait_until(lambda: httpx.get(f"{url}/models/lin/ready", timeout=30).status_code == 503)
    port = free_port()
    with RunningServer(_config(repository, "none", http_port=port)):
        url = f"http://127.0.0.1:{port}/v2"
        refused = httpx.post(f"{url}/repository/models/lin/load", timeout=30)
        assert refused.status_code == 400 and "--model-control explicit" in refused.json()["error"]
