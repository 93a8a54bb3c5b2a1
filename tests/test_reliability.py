"""Faults, cancellation storms, overload and retries against a real server and batcher."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import random
import subprocess
import sys
import threading
import time
from dataclasses import replace

import grpc
import numpy as np
import pytest
from conftest import TEST_CONFIG, GatedEngine, RunningServer, assert_same_answer, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError, RetryPolicy
from gradserve.server.core.batcher import Batcher, Observer
from gradserve.server.core.contract import Outputs
from gradserve.server.core.errors import EngineFailed
from gradserve.wire.kinds import Derivative

MARKER = -999.0


class FaultyEngine(GatedEngine):
    """Raises for any batch containing the marker value; optionally slows every call."""

    def __init__(self, engine: object, delay_s: float = 0.0) -> None:
        super().__init__(engine)
        self.delay_s = delay_s

    def run(self, kind: Derivative, x: np.ndarray, v: np.ndarray | None = None) -> Outputs:
        if self.delay_s:
            time.sleep(self.delay_s)
        if (x == MARKER).any():
            raise FloatingPointError("injected fault")
        return super().run(kind, x, v)


def test_engine_fault_fails_only_the_offending_request(bundled_engine):
    faulty = FaultyEngine(bundled_engine, delay_s=0.002)
    rng = np.random.default_rng(10)
    inputs = [rng.uniform(0, 1, size=(int(rng.integers(1, 6)), 1)) for _ in range(300)]
    bad = set(range(7, 300, 37))
    for i in bad:
        inputs[i][0, 0] = MARKER
    with (
        RunningServer(TEST_CONFIG, faulty) as running,
        GradientClient(running.target, timeout=30) as client,
        concurrent.futures.ThreadPoolExecutor(32) as pool,
    ):

        def call(x):
            try:
                return client.evaluate(x)
            except GradserveError as error:
                return error

        outcomes = list(pool.map(call, inputs))
        assert running.batcher.pending == 0 and running.batcher.queued_rows == 0
    assert max(o.timing.batch_rows for o in outcomes if not isinstance(o, GradserveError)) > 6
    for i, (x, outcome) in enumerate(zip(inputs, outcomes, strict=True)):
        if i in bad:
            assert isinstance(outcome, GradserveError) and outcome.code == grpc.StatusCode.INTERNAL
            assert "injected fault" in outcome.message
        else:
            expected = bundled_engine.run(Derivative.GRADIENT, x.astype(np.float32))
            assert_same_answer(outcome.dy_dx, expected.dy_dx)


class FaultyObserver(Observer):
    """Raises inside the worker loop (where a batch is formed) the first time it is told of
    a dispatched request: a stand-in for a bug in the loop itself."""

    def __init__(self) -> None:
        self.faults = 1
        self.restarts = 0

    def queued(self, seconds: float) -> None:
        if self.faults:
            self.faults -= 1
            raise RuntimeError("bug in batch forming")

    def restarted(self) -> None:
        self.restarts += 1


@pytest.mark.timeout(30)  # the fault once left a frontend's batcher waiting for good
@pytest.mark.parametrize("in_flight", [0, 1])
async def test_worker_loop_restarts_after_its_own_fault(in_flight):
    """A fault of the worker itself (here in forming a batch) fails that batch's request and
    no other, with a plain engine and with batches awaited in flight (a frontend's; its
    in-flight permit goes back, or no batch would be sent again)."""

    def compute(kind, x):
        return Outputs(x * 2, x * 3)

    async def awaited(kind, x):
        return compute(kind, x)

    observer = FaultyObserver()
    engine = awaited if in_flight else compute
    async with Batcher(engine, max_batch_size=8, observer=observer, in_flight=in_flight) as batcher:
        x = np.ones((2, 1), np.float32)
        first = batcher.submit(x, Derivative.GRADIENT)
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(x * i, Derivative.GRADIENT) for i in range(5))), 10
        )
        with contextlib.suppress(EngineFailed):
            await asyncio.wait_for(first, 10)
    assert observer.restarts == 1
    assert [float(r.y[0, 0]) for r in results] == [0, 2, 4, 6, 8]


def test_cancellation_storm_leaves_nothing_behind(bundled_engine):
    slow = FaultyEngine(bundled_engine, delay_s=0.003)
    config = replace(TEST_CONFIG, max_queue_rows=100_000)

    async def storm(target: str) -> tuple[int, int]:
        rng = random.Random(11)
        async with AsyncGradientClient(target, timeout=30) as client:
            sizes = [rng.randint(1, 8) for _ in range(2000)]
            tasks = [asyncio.create_task(client.evaluate(np.full((n, 1), 0.4))) for n in sizes]
            for task in tasks:
                if rng.random() < 0.7:
                    asyncio.get_running_loop().call_later(rng.uniform(0, 0.05), task.cancel)
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)
            answered = [
                n for n, d in zip(sizes, done, strict=True) if not isinstance(d, BaseException)
            ]
            cancelled = sum(1 for d in done if isinstance(d, asyncio.CancelledError))
            return len(answered), cancelled, sum(answered), sum(sizes)

    with RunningServer(config, slow) as running:
        answered, cancelled, answered_rows, sent_rows = asyncio.run(storm(running.target))
        wait_until(lambda: running.batcher.pending == 0 and running.batcher.queued_rows == 0)
        assert answered + cancelled == 2000 and cancelled > 0
        rows_answered = slow.rows_computed
        with GradientClient(running.target, timeout=10) as client:
            assert abs(client.evaluate(0.6).dy_dx[0, 0] - 0.8) < 0.3
    # Every answered row was computed; rows of requests cancelled while queued never were.
    assert answered_rows <= rows_answered < sent_rows


def test_stream_cancellation_storm_frees_everything(bundled_engine):
    slow = FaultyEngine(bundled_engine, delay_s=0.003)

    async def streams(target: str) -> None:
        async with AsyncGradientClient(target, timeout=30) as client:

            async def one(seed: int) -> None:
                async for _ in client.stream(np.full((200, 1, 1), 0.3)):
                    if random.Random(seed).random() < 0.05:
                        return

            tasks = [asyncio.create_task(one(s)) for s in range(20)]
            for task in tasks:
                asyncio.get_running_loop().call_later(random.uniform(0, 0.2), task.cancel)
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)

    with RunningServer(TEST_CONFIG, slow) as running:
        asyncio.run(streams(running.target))
        wait_until(lambda: running.batcher.pending == 0 and running.batcher.queued_rows == 0)
        with GradientClient(running.target, timeout=10) as client:
            assert client.evaluate([0.2, 0.6]).y.shape == (2, 1)


def test_overload_from_several_processes_stays_responsive(bundled_engine, tmp_path):
    # 128 callers with one request each against room for 32 queued + 16 computing rows:
    # refusals are certain however slow the machine is.
    slow = FaultyEngine(bundled_engine, delay_s=0.02)
    config = replace(TEST_CONFIG, max_queue_rows=32, max_batch_size=16)
    with RunningServer(config, slow) as running:
        loads = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gradserve.client.loadtest",
                    "--target",
                    running.target,
                    "--concurrency",
                    "64",
                    "--duration",
                    "3",
                    "--warmup",
                    "0",
                    "--timeout",
                    "20",
                    "--expect",
                    "RESOURCE_EXHAUSTED",
                    "--json",
                    str(tmp_path / f"{i}.json"),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]
        peak_queue, probes = 0, 0
        with grpc.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            with GradientClient(running.target, timeout=5, retry=RetryPolicy(attempts=1)) as c:
                while any(p.poll() is None for p in loads):
                    peak_queue = max(peak_queue, running.batcher.queued_rows)
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                    assert status == health_pb2.HealthCheckResponse.SERVING
                    assert c.model_info().name == "quadratic"
                    probes += 1
                    time.sleep(0.05)
        outputs = [p.communicate(timeout=60) for p in loads]
    assert [p.returncode for p in loads] == [0, 0], [o[-600:] for pair in outputs for o in pair]
    steps = [json.loads((tmp_path / f"{i}.json").read_text())[0] for i in range(2)]
    assert sum(s["errors"].get("RESOURCE_EXHAUSTED", 0) for s in steps) > 0
    assert all(set(s["errors"]) <= {"RESOURCE_EXHAUSTED"} for s in steps)
    assert sum(s["requests"] - sum(s["errors"].values()) for s in steps) > 0
    assert peak_queue <= 32 and probes > 5


def test_sdk_retries_queue_full_until_there_is_room(gated_server):
    running, gated = gated_server
    gated.gate.clear()
    with GradientClient(running.target, timeout=30) as filler:
        pool = concurrent.futures.ThreadPoolExecutor(8)
        first = pool.submit(filler.evaluate, 0.1)
        wait_until(lambda: gated.entered == 1)
        blockers = [pool.submit(filler.evaluate, np.full(16, 0.2)) for _ in range(4)]
        wait_until(lambda: running.batcher.queued_rows == 64)
        threading.Timer(0.5, gated.gate.set).start()
        patient = RetryPolicy(attempts=1000, max_backoff=0.1)
        with GradientClient(running.target, timeout=20, retry=patient) as client:
            result = client.evaluate(0.6)
        assert abs(result.dy_dx[0, 0] - 0.8) < 0.3
        assert first.result(timeout=30) and all(b.result(timeout=30) for b in blockers)
        pool.shutdown()


def test_sdk_gives_up_at_its_deadline_and_never_retries_invalid_input(gated_server):
    running, gated = gated_server
    gated.gate.clear()
    with GradientClient(running.target, timeout=30) as filler:
        pool = concurrent.futures.ThreadPoolExecutor(8)
        futures = [pool.submit(filler.evaluate, 0.1)]
        wait_until(lambda: gated.entered == 1)
        futures += [pool.submit(filler.evaluate, np.full(32, 0.2)) for _ in range(2)]
        wait_until(lambda: running.batcher.queued_rows == 64)
        with GradientClient(running.target, timeout=1.0) as client:
            started = time.monotonic()
            with pytest.raises(GradserveError) as info:
                client.evaluate(0.6)
            assert time.monotonic() - started < 10
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.attempts > 1
            with pytest.raises(GradserveError) as info:
                client.evaluate([[0.1, 0.2]])
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.attempts == 1
        gated.gate.set()
        assert all(f.result(timeout=30) for f in futures)
        pool.shutdown()
