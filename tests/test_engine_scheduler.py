"""The engine process as the one scheduler of a `--frontends 2` server.

Each test runs bench/stand_in.py: the real supervisor, frontends, exchange and engine-side
batchers, with a stand-in model in the engine process that takes a fixed time per call,
echoes its rows (y = x) and logs, call by call, the rows it computed. Every frontend keeps
many sub-batches in flight, so a backlog builds up in the engine process's queue, and the
log shows what the engine process decided: the order it computed rows in, and the rows it
never computed. Orders and sets are asserted, never durations.
"""

from __future__ import annotations

import concurrent.futures
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import ServerProcess
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import tensors
from gradserve.wire.callers import CALLER_HEADER

STAND_IN = Path(__file__).resolve().parents[1] / "bench" / "stand_in.py"
CALL_S = 0.1  # each engine call of the stand-in
BACKLOG = 24  # NORMAL rows queued before the request under test
WAIT_S = 60  # bound on every wait
ROW_S, CAP_ROWS, LARGE_ROWS = 0.005, 4, 120  # a stand-in's time per row; a batch; a request


@pytest.fixture
def scheduler(tmp_path):
    """A 2-frontend stand-in server whose engine computes one row per call; its call log."""
    log = tmp_path / "computed.log"
    server = ServerProcess(
        "--frontends", "2", "--max-batch-size", "1", "--in-flight", "32",
        "--drain-seconds", "10",
        script=STAND_IN, GRADSERVE_STAND_IN_SECONDS=str(CALL_S), GRADSERVE_STAND_IN_LOG=str(log),
    )  # fmt: skip
    try:
        yield server, log
    finally:
        server.stop()


def computed(log: Path) -> list[float]:
    """The rows' x values, in the order the engine process computed them."""
    return [float(v) for line in log.read_text().split("\n") if line for v in line.split()]


def engine_queue_rows(server: ServerProcess) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    rows = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gradserve_queue_rows") and 'process="engine"' in line
    ]
    return sum(rows)


def evaluate(channel: grpc.Channel, value: float, **kwargs) -> pb.EvaluateResponse:
    x = np.array([[value]], np.float32)
    request = pb.EvaluateRequest(x=tensors.to_tensor(x), **kwargs.pop("fields", {}))
    return pb_grpc.GradientServiceStub(channel).Evaluate(request, **kwargs)


def start_backlog(server: ServerProcess, pool: concurrent.futures.Executor):
    """BACKLOG NORMAL 1-row calls (x = 1..BACKLOG) on one connection; returns once the
    engine process's queue holds at least half of them (so they crossed, and wait there)."""
    channel = grpc.insecure_channel(server.target)
    calls = [
        pool.submit(evaluate, channel, float(i), timeout=WAIT_S) for i in range(1, BACKLOG + 1)
    ]
    for _ in range(int(WAIT_S / 0.02)):
        if engine_queue_rows(server) >= BACKLOG // 2:
            return channel, calls
        concurrent.futures.wait(calls, timeout=0.02)
    raise AssertionError("the backlog never queued in the engine process")


def computed_after(scheduler, value: float, send) -> list[float]:
    """Send one 1-row call of x = `value` (`send(channel, value)`, the backlog's channel)
    while the backlog waits in the engine process; the rows computed after it."""
    server, log = scheduler
    with concurrent.futures.ThreadPoolExecutor(BACKLOG + 1) as pool:
        channel, backlog = start_backlog(server, pool)
        answer = send(channel, value)
        assert tensors.from_tensor(answer.y).ravel().tolist() == [value]
        for call in backlog:
            call.result(timeout=WAIT_S)
        channel.close()
    order = computed(log)
    assert sorted(order) == [*range(1, BACKLOG + 1), value]
    return order[order.index(value) + 1 :]


def test_a_high_request_overtakes_normal_rows_queued_in_the_engine_process(scheduler):
    def high(channel: grpc.Channel, value: float) -> pb.EvaluateResponse:
        with grpc.insecure_channel(scheduler[0].target) as other:  # either frontend
            return evaluate(other, value, fields={"priority": pb.HIGH}, timeout=WAIT_S)

    after_high = computed_after(scheduler, 100.0, high)
    # at least the half of the backlog that was queued in the engine process when the HIGH
    # request was sent, minus the call then running and the one its frontend may have sent
    assert len(after_high) >= BACKLOG // 2 - 2, after_high


def test_a_light_caller_is_not_queued_behind_the_backlog_of_its_own_frontend(scheduler):
    """The engine process shares its batches between callers, not frontends: a 1-row call
    named `light` on the backlog's own connection (so its own frontend) is computed before
    the backlog queued ahead of it there, as if the two had reached different frontends."""

    def light(channel: grpc.Channel, value: float) -> pb.EvaluateResponse:
        return evaluate(channel, value, metadata=[(CALLER_HEADER, "light")], timeout=WAIT_S)

    after_light = computed_after(scheduler, 300.0, light)
    assert len(after_light) >= BACKLOG // 2 - 2, after_light


def test_a_frontend_sends_no_more_rows_at_once_than_the_engine_computes_in_a_batch(tmp_path):
    """The engine process caps its batches by their learned cost (--max-batch-ms) and reports
    the cap with each answer; a frontend cuts its sub-batches to it. So a 1-row call sent on
    the connection (so the frontend) of a large request already being computed, by another
    caller, its frontend
    keeping one sub-batch in flight (the default), is computed before most of the large
    request's rows, not after all of them as when the request crossed as one sub-batch."""
    log = tmp_path / "computed.log"
    server = ServerProcess(
        "--frontends", "2", "--max-batch-ms", str(1e3 * CAP_ROWS * ROW_S), "--drain-seconds",
        "10", script=STAND_IN, GRADSERVE_STAND_IN_ROW_SECONDS=str(ROW_S),
        GRADSERVE_STAND_IN_LOG=str(log),
    )  # fmt: skip
    large = np.arange(1, LARGE_ROWS + 1, dtype=np.float32)[:, None]
    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            teach = pb.EvaluateRequest(x=tensors.to_tensor(np.zeros((2 * CAP_ROWS, 1), np.float32)))
            stub.Evaluate(teach, timeout=WAIT_S)  # its answer carries the engine's cap
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                request = pb.EvaluateRequest(x=tensors.to_tensor(large))
                call = pool.submit(stub.Evaluate, request, timeout=WAIT_S)
                for _ in range(int(WAIT_S / 0.01)):  # until its first rows are computed
                    if 1.0 in computed(log) or call.done():
                        break
                    concurrent.futures.wait([call], timeout=0.01)
                evaluate(channel, -1.0, metadata=[(CALLER_HEADER, "light")], timeout=WAIT_S)
                assert tensors.from_tensor(call.result(timeout=WAIT_S).y).ravel().tolist() == (
                    large.ravel().tolist()
                )
    finally:
        server.stop()
    order = [value for value in computed(log) if value != 0.0]
    assert sorted(order) == [-1.0, *large.ravel().tolist()]
    assert len(order[order.index(-1.0) + 1 :]) >= LARGE_ROWS // 2, order


def test_a_request_past_its_deadline_is_never_computed_in_the_engine_process(scheduler):
    server, log = scheduler
    with concurrent.futures.ThreadPoolExecutor(BACKLOG + 1) as pool:
        channel, backlog = start_backlog(server, pool)
        # on the backlog's connection: its frontend has free slots, so it crosses at once
        # and waits behind the backlog in the engine process's queue
        with pytest.raises(grpc.RpcError) as late:
            evaluate(channel, 200.0, timeout=3 * CALL_S)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for call in backlog:
            call.result(timeout=WAIT_S)
        channel.close()
    assert 200.0 not in computed(log)
    assert sorted(computed(log)) == list(range(1, BACKLOG + 1))


def test_a_full_engine_queue_answers_resource_exhausted_and_the_server_stays_up(tmp_path):
    """Each frontend admits its share of --max-queue-rows and sends it on at once (32 in
    flight); the engine process holds the server's whole bound and refuses beyond it: those
    calls end RESOURCE_EXHAUSTED (not INTERNAL, not bisected), the others are answered."""
    server = ServerProcess(
        "--frontends", "2", "--max-batch-size", "1", "--in-flight", "32",
        "--max-queue-rows", "4", "--drain-seconds", "10",
        script=STAND_IN, GRADSERVE_STAND_IN_SECONDS=str(CALL_S),
    )  # fmt: skip
    try:
        channels = [grpc.insecure_channel(server.target) for _ in range(4)]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            calls = [
                pool.submit(evaluate, channels[i % 4], float(i), timeout=WAIT_S) for i in range(32)
            ]
            codes, messages = [], []
            for call in calls:
                try:
                    call.result(timeout=WAIT_S)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as error:
                    codes.append(error.code())
                    messages.append(error.details())
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert any("engine process" in m for m in messages), messages
        check = health_pb2_grpc.HealthStub(channels[0]).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
        for channel in channels:
            channel.close()
    finally:
        server.stop()
