"""The statistics extension, read with tritonclient over gRPC and HTTP, against the requests
sent (all three protocols) and the server's own Prometheus counts."""

from __future__ import annotations

import urllib.request
from dataclasses import replace

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from conftest import (
    FRONTENDS_ARGS,
    TEST_CONFIG,
    RunningServer,
    ServerProcess,
    free_port,
    wears_the_face_of,
)
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from gradserve.client import GradientClient, GradserveError
from gradserve.server.core.contract import Outputs
from gradserve.wire.kinds import Derivative

MODEL = "quadratic"
POISON = 999.0  # a row the engine below refuses


class RefusingEngine:
    """The real engine, except that it fails on any batch holding a POISON row (the batch is
    bisected, so only that row's request fails)."""

    def __init__(self, engine: object) -> None:
        self._engine = engine
        wears_the_face_of(self, engine)

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        if (x == POISON).any():
            raise ValueError("poisoned row")
        return self._engine.run(kind, x, v)


@pytest.fixture
def fresh(bundled_engine):
    config = replace(TEST_CONFIG, http_port=free_port())
    with RunningServer(config, RefusingEngine(bundled_engine)) as running:
        yield running


def _infer_grpc(client: grpcclient.InferenceServerClient, x: np.ndarray) -> None:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client.infer(MODEL, [tensor])


def _infer_http(client: httpclient.InferenceServerClient, x: np.ndarray) -> None:
    tensor = httpclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client.infer(MODEL, [tensor])


def _send(target: str, http: str, rows: list[int]) -> None:
    """One request per entry of `rows`, round robin over native, gRPC and HTTP."""
    with (
        GradientClient(target) as native,
        grpcclient.InferenceServerClient(target) as grpc_client,
        httpclient.InferenceServerClient(http) as http_client,
    ):
        senders = [
            native.evaluate,
            lambda x: _infer_grpc(grpc_client, x),
            lambda x: _infer_http(http_client, x),
        ]
        for i, n in enumerate(rows):
            senders[i % 3](np.linspace(-1, 1, n, dtype=np.float32).reshape(n, 1))


def _sample(running: RunningServer, name: str, **labels: str) -> float:
    return running.server.metrics.registry.get_sample_value(name, labels) or 0.0


def test_statistics_count_every_request_of_every_protocol(fresh):
    http = f"127.0.0.1:{fresh.server.http_port}"
    rows = [1, 3, 5, 2, 4, 7, 1, 6, 2]
    _send(fresh.target, http, rows)
    with GradientClient(fresh.target) as native, pytest.raises(GradserveError):
        native.evaluate(np.array([[POISON]], np.float32))

    with grpcclient.InferenceServerClient(fresh.target) as client:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
        one = client.get_inference_statistics(MODEL, "1", as_json=True)["model_stats"]
        everything = client.get_inference_statistics(as_json=True)["model_stats"]
        with pytest.raises(InferenceServerException, match="not served"):
            client.get_inference_statistics("nonesuch")
    [entry] = stats
    assert one == stats and everything == stats
    assert (entry["name"], entry["version"]) == (MODEL, "1")
    infer = entry["inference_stats"]
    # JSON from the gRPC client spells uint64 as strings, as protobuf's JSON mapping says.
    assert int(infer["success"]["count"]) == len(rows)
    assert int(entry["inference_count"]) == sum(rows)
    assert int(infer["fail"]["count"]) == 1
    for name in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert int(infer[name]["count"]) == len(rows)
    parts = sum(int(infer[n]["ns"]) for n in ("queue", "compute_input", "compute_infer"))
    assert int(infer["compute_infer"]["ns"]) > 0 and parts <= int(infer["success"]["ns"])
    assert int(entry["last_inference"]) > 0

    # The same figures as the server's Prometheus counters, counted elsewhere.
    answered = sum(
        _sample(fresh, "gradserve_requests_total", rpc=rpc, code="OK")
        for rpc in ("Evaluate", "ModelInfer", "rest/infer")
    )
    assert answered == len(rows)
    executions = int(entry["execution_count"])
    engine_calls = sum(
        _sample(fresh, "gradserve_engine_calls_total", derivative=kind.value) for kind in Derivative
    )
    assert executions == engine_calls
    batches = entry["batch_stats"]
    assert sum(int(b["compute_infer"]["count"]) for b in batches) == executions
    computed = sum(int(b["batch_size"]) * int(b["compute_infer"]["count"]) for b in batches)
    assert computed == sum(
        _sample(fresh, "gradserve_rows_computed_total", derivative=kind.value)
        for kind in Derivative
    )

    # tritonclient's HTTP client reads the same numbers.
    with httpclient.InferenceServerClient(http) as client:
        [over_http] = client.get_inference_statistics(MODEL)["model_stats"]
        with pytest.raises(InferenceServerException, match="not served"):
            client.get_inference_statistics("nonesuch")
    assert over_http["inference_count"] == sum(rows)
    assert over_http["inference_stats"]["success"]["count"] == len(rows)
    assert over_http["execution_count"] == executions  # statistics calls compute nothing


def test_statistics_are_listed_and_exported(fresh):
    with grpcclient.InferenceServerClient(fresh.target) as client:
        assert "statistics" in client.get_server_metadata().extensions
    _send(fresh.target, f"127.0.0.1:{fresh.server.http_port}", [2, 2, 2])
    assert _sample(fresh, "gradserve_statistics_inferences_total", model=MODEL, version="1") == 6
    assert (
        _sample(
            fresh, "gradserve_statistics_requests_total", model=MODEL, version="1",
            statistic="success",
        )
        == 3
    )  # fmt: skip


@pytest.fixture
def frontends():
    running = ServerProcess(*FRONTENDS_ARGS)
    try:
        yield running
    finally:
        assert running.stop() == 0


def _answering_processes(frontends: ServerProcess) -> set[str]:
    """The processes whose statistics count an answered request (the gathered /metrics)."""
    url = f"http://127.0.0.1:{frontends.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    answered = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            name, value = sample.name, sample.value
            if (
                name == "gradserve_statistics_requests_total"
                and value > 0
                and (labels["statistic"] == "success")
            ):
                answered.add(labels["process"])
    return answered


def test_statistics_through_frontends_sum_every_process(frontends):
    """Each call may reach either frontend: every answer counts what both answered."""
    http = f"127.0.0.1:{frontends.http_port}"
    rows: list[int] = []
    for attempt in range(200):  # new connections each time, until both frontends answered
        chunk = [1 + attempt % 4, 2, 1]
        _send(frontends.target, http, chunk)
        rows += chunk
        if len(_answering_processes(frontends)) == 2:
            break
    assert len(_answering_processes(frontends)) == 2
    for _ in range(4):
        with grpcclient.InferenceServerClient(frontends.target) as client:
            [entry] = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
        assert int(entry["inference_count"]) == sum(rows)
        assert int(entry["inference_stats"]["success"]["count"]) == len(rows)
        with httpclient.InferenceServerClient(http) as client:
            [over_http] = client.get_inference_statistics(MODEL)["model_stats"]
        assert over_http["inference_count"] == sum(rows)
