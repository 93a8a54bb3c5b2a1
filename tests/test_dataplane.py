"""The data plane every protocol shares (server/serving): one caller over every protocol, a
request's own timeout, and the repository calls answered alike over the native gRPC
protocol, the standard gRPC protocol and REST. Real servers, real clients."""

from __future__ import annotations

import concurrent.futures
import shutil
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import TEST_CONFIG, GatedEngine, RunningServer, free_port, wait_until
from tritonclient.utils import InferenceServerException

from gradserve.client import GradientClient, GradserveError
from gradserve.server.config import BUNDLED_MODEL
from gradserve.server.protocols.rest import _STATUS as HTTP_STATUS
from gradserve.wire.callers import CALLER_HEADER


@pytest.fixture
def gated(bundled_engine):
    engine = GatedEngine(bundled_engine)
    config = replace(TEST_CONFIG, http_port=free_port())
    with RunningServer(config, engine) as running:
        yield running, engine
        engine.gate.set()


def _rest_infer(running: RunningServer, value: float, **options) -> httpx.Response:
    """One 1-row gradient over REST; `headers` and `parameters` as given."""
    body = {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [value]}],
            "parameters": options.get("parameters", {})}  # fmt: skip
    url = f"http://127.0.0.1:{running.server.http_port}/v2/models/quadratic/infer"
    return httpx.post(url, json=body, headers=options.get("headers", {}), timeout=60)


def _block_the_engine(running: RunningServer, engine: GatedEngine):
    """A request in the engine, held at its gate: what comes next waits in the queue."""
    engine.gate.clear()
    client = GradientClient(running.target, timeout=60)
    blocker = concurrent.futures.ThreadPoolExecutor(1).submit(client.evaluate, 0.1)
    wait_until(lambda: engine.entered == 1)
    return blocker


def test_one_client_over_rest_and_grpc_is_one_caller(gated):
    """The same name in the caller header, over REST and over gRPC (the SDK's client_id),
    queues as one caller of fair batching, whatever the connection or protocol."""
    running, engine = gated
    blocker = _block_the_engine(running, engine)
    with GradientClient(running.target, timeout=60, client_id="alice") as alice, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:  # fmt: skip
        over_grpc = pool.submit(alice.evaluate, 0.3)
        over_rest = pool.submit(_rest_infer, running, 0.7, headers={CALLER_HEADER: "alice"})
        wait_until(lambda: running.on_loop(lambda: running.batcher.queued_rows) == 2)
        assert running.on_loop(running.batcher.waiting_callers) == {"client:alice"}
        engine.gate.set()
        assert over_grpc.result(timeout=60).y.shape == (1, 1)
        assert over_rest.result(timeout=60).status_code == 200
    assert blocker.result(timeout=60).y.shape == (1, 1)


@pytest.mark.parametrize("protocol", ["rest", "standard grpc"])
def test_a_request_past_its_own_timeout_is_never_computed(gated, protocol):
    """Triton's `timeout` parameter (microseconds): a request still queued when it passes is
    answered DEADLINE_EXCEEDED (HTTP 504) and its rows never reach the engine."""
    running, engine = gated
    blocker = _block_the_engine(running, engine)
    value = 0.4375  # exact in float32: found among the engine's rows if it were computed
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        if protocol == "rest":
            late = pool.submit(_rest_infer, running, value, parameters={"timeout": 100_000})
        else:
            tensor = triton.InferInput("x", [1, 1], "FP32")
            tensor.set_data_from_numpy(np.array([[value]], np.float32))
            client = triton.InferenceServerClient(running.target)
            late = pool.submit(client.infer, "quadratic", [tensor], timeout=100_000)
        wait_until(lambda: running.on_loop(lambda: running.batcher.queued_rows) == 1)
        time.sleep(0.2)  # past the request's 0.1 s
        engine.gate.set()
        if protocol == "rest":
            answer = late.result(timeout=60)
            assert answer.status_code == 504, answer.text
            assert "deadline" in answer.json()["error"].lower()
        else:
            with pytest.raises(InferenceServerException) as refused:
                late.result(timeout=60)
            assert "DEADLINE_EXCEEDED" in str(refused.value.status())
    blocker.result(timeout=60)
    computed = np.concatenate([x.ravel() for _, x in engine.calls])
    assert value not in computed and 0.1 in computed.astype(np.float64).round(6)


class _Native:
    def __init__(self, running: RunningServer) -> None:
        self.client = GradientClient(running.target, timeout=60)

    def index(self):
        return [(v.model, v.version, v.state, v.reason) for v in self.client.repository_index()]

    def control(self, operation: str, model: str):
        try:
            getattr(self.client, f"{operation}_model")(model)
        except GradserveError as error:
            return error.code.name, error.message
        return "OK", ""


class _Standard:
    def __init__(self, running: RunningServer) -> None:
        self.client = triton.InferenceServerClient(running.target)

    def index(self):
        index = self.client.get_model_repository_index(as_json=True)["models"]
        return [(m["name"], m["version"], m["state"], m.get("reason", "")) for m in index]

    def control(self, operation: str, model: str):
        try:
            getattr(self.client, f"{operation}_model")(model)
        except InferenceServerException as error:
            return error.status().removeprefix("StatusCode."), error.message()
        return "OK", ""


class _Rest:
    """REST's answers, its HTTP status mapped back to the gRPC codes it stands for."""

    def __init__(self, running: RunningServer) -> None:
        self.url = f"http://127.0.0.1:{running.server.http_port}/v2/repository"

    def index(self):
        index = httpx.post(f"{self.url}/index", timeout=60).json()
        return [(m["name"], m["version"], m["state"], m["reason"]) for m in index]

    def control(self, operation: str, model: str):
        answer = httpx.post(f"{self.url}/models/{model}/{operation}", timeout=60)
        if answer.status_code == 200:
            return "OK", ""
        codes = [c for c, status in HTTP_STATUS.items() if status == answer.status_code]
        return "|".join(sorted(c.name for c in codes)), answer.json()["error"]


def _transcript(protocol, running: RunningServer) -> list:
    """The same repository calls, in order, and what each answered."""
    steps = [("index", protocol.index()), ("load", protocol.control("load", "quad")),
             ("index", protocol.index()), ("load unknown", protocol.control("load", "nope")),
             ("unload", protocol.control("unload", "quad"))]  # fmt: skip
    wait_until(lambda: not running.server.models.versions("quad"))
    steps += [("unload again", protocol.control("unload", "quad")), ("index", protocol.index())]
    return steps


def test_repository_calls_answer_alike_over_every_protocol(tmp_path):
    """Index, load, unload, and their refusals: one transcript over the native protocol,
    the standard gRPC protocol and REST (REST's HTTP status standing for its gRPC code)."""
    (tmp_path / "quad" / "1").mkdir(parents=True)
    shutil.copy(BUNDLED_MODEL, tmp_path / "quad" / "1" / "model.keras")
    transcripts = {}
    for name, protocol in (("native", _Native), ("standard", _Standard), ("rest", _Rest)):
        config = replace(TEST_CONFIG, model="", model_repository=str(tmp_path), xla=False,
                         model_control="explicit", http_port=free_port())  # fmt: skip
        with RunningServer(config) as running:  # a server each: the same state to begin with
            transcripts[name] = _transcript(protocol(running), running)
    native = transcripts["native"]
    assert native[1] == ("load", ("OK", "")) and native[2][1][0][2] == "READY"
    assert native[3][1][0] == "NOT_FOUND" and native[5][1][0] != "OK"
    for name in ("standard", "rest"):
        for (step, ours), (_, theirs) in zip(transcripts[name], native, strict=True):
            if name == "rest" and isinstance(ours, tuple) and ours[0] != "OK":
                assert theirs[0] in ours[0].split("|"), (step, ours, theirs)
                assert ours[1] == theirs[1], (step, ours, theirs)
            else:
                assert ours == theirs, (name, step, ours, theirs)


def test_a_timeout_that_is_not_a_count_of_microseconds_is_refused_saying_so(gated):
    running, _ = gated
    for value in (-5, 0.5, "soon"):
        answer = _rest_infer(running, 0.3, parameters={"timeout": value})
        assert answer.status_code == 400, (value, answer.text)
        assert 'parameter "timeout"' in answer.json()["error"]
        assert "microseconds" in answer.json()["error"]
    assert _rest_infer(running, 0.3, parameters={"timeout": 0}).status_code == 200
