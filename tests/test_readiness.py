"""The SDK and a server that is still starting: wait_until_ready and wait_for_ready.

A real GradServer whose model load is held by a gate answers NOT_SERVING and "still loading"
until the gate opens; the README's first example runs against a real `gradserve serve`
started just before it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import TEST_CONFIG, RunningServer, free_port
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.client import AsyncGradientClient, GradientClient, GradserveError, RetryPolicy
from gradserve.client.readiness import OVERALL, ReadinessWait

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

README = Path(__file__).resolve().parents[1] / "README.md"


class LoadingServer(RunningServer):
    """A RunningServer whose model load waits for `loaded` to be set; `start` returns once it
    listens. Stopping it releases the load first."""

    def __init__(self, engine: object, port: int | None = None) -> None:
        self.loaded = threading.Event()

        def load(_config) -> list:
            if not self.loaded.wait(timeout=60):
                raise TimeoutError("test never released the model load")
            return [engine]

        config = replace(TEST_CONFIG, port=port or free_port())
        super().__init__(config, load=load, ready=False, start=False)

    def stop(self) -> None:
        self.loaded.set()
        super().stop()


@pytest.fixture
def loading(bundled_engine) -> Iterator[LoadingServer]:
    running = LoadingServer(bundled_engine)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def release_after(event: threading.Event, seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, event.set)
    timer.start()
    return timer


def test_without_wait_for_ready_a_loading_server_fails_fast(loading):
    with GradientClient(loading.target, timeout=5, retry=RetryPolicy(attempts=2)) as client:
        started = time.monotonic()
        with pytest.raises(GradserveError) as caught:
            client.evaluate(0.2)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "loading" in caught.value.message
    assert time.monotonic() - started < 3


def test_a_wait_that_times_out_names_the_last_health_answer():
    """The rule itself, without a clock race: an answer seen, then the deadline passed."""
    wait = ReadinessWait(0.0)
    assert not wait.answered(health_pb2.HealthCheckResponse(status=NOT_SERVING))
    with pytest.raises(GradserveError) as caught:
        wait.next_pause()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "last health answer: NOT_SERVING" in caught.value.message


def test_wait_until_ready_times_out_naming_not_serving_then_returns(loading):
    with GradientClient(loading.target, timeout=10, retry=RetryPolicy(attempts=1)) as client:
        with pytest.raises(GradserveError, match="loading"):
            client.evaluate(0.2)
        # The server says NOT_SERVING while it loads (asked with a generous deadline: on a
        # loaded machine one Check has taken seconds, which a short wait cannot tell apart).
        with grpc.insecure_channel(loading.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(OVERALL, timeout=30).status == NOT_SERVING
        with pytest.raises(GradserveError) as caught:
            client.wait_until_ready(3.0)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "last health answer: " in caught.value.message
        timer = release_after(loading.loaded, 0.5)
        started = time.monotonic()
        client.wait_until_ready(20)
        waited = time.monotonic() - started
        timer.join()
        assert 0.4 < waited < 10
        assert client.evaluate(0.2).dy_dx.shape == (1, 1)


def test_wait_for_ready_call_waits_for_warm_up_despite_few_attempts(loading):
    # attempts=2 would give up at once on UNAVAILABLE; wait_for_ready keeps trying "loading".
    retry = RetryPolicy(attempts=2)
    with GradientClient(loading.target, timeout=20, retry=retry, wait_for_ready=True) as client:
        timer = release_after(loading.loaded, 1.0)
        started = time.monotonic()
        result = client.evaluate([0.2, 0.6])
        waited = time.monotonic() - started
        timer.join()
    assert waited > 0.9
    np.testing.assert_allclose(result.dy_dx[:, 0], [-2.4, 0.8], atol=0.3)


def test_wait_for_ready_call_still_bounded_by_its_timeout(loading):
    with GradientClient(loading.target, timeout=0.8, wait_for_ready=True) as client:
        started = time.monotonic()
        with pytest.raises(GradserveError) as caught:
            client.evaluate(0.2)
    assert caught.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert time.monotonic() - started < 3


def test_wait_for_ready_covers_a_server_not_listening_yet(bundled_engine):
    """The call starts before anything listens on the port; the server comes up 1 s later."""
    port = free_port()
    later = LoadingServer(bundled_engine, port)
    later.loaded.set()
    starter = threading.Timer(1.0, later.start)
    try:
        with GradientClient(later.target, timeout=30, wait_for_ready=True) as client:
            starter.start()
            results = list(client.stream([0.2, 0.6]))
        assert [r.id for r in results] == ["0", "1"]
        np.testing.assert_allclose([r.dy_dx[0, 0] for r in results], [-2.4, 0.8], atol=0.3)
    finally:
        starter.join()
        later.stop()


async def test_async_client_waits_the_same_way(loading):
    async with AsyncGradientClient(loading.target, timeout=20, wait_for_ready=True) as c:
        with pytest.raises(GradserveError) as caught:
            await c.wait_until_ready(0.3)
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        timer = release_after(loading.loaded, 0.5)
        started = time.monotonic()
        result = await c.evaluate(0.6)
        waited = time.monotonic() - started
        await c.wait_until_ready(1)
        streamed = [r async for r in c.stream([0.2])]
        timer.join()
    assert waited > 0.4
    assert float(result.dy_dx[0, 0]) == pytest.approx(0.8, abs=0.3)
    assert float(streamed[0].dy_dx[0, 0]) == pytest.approx(-2.4, abs=0.3)


def test_readme_first_example_runs_right_after_the_server_starts(tmp_path):
    """The first SDK example of the README, as written, against `gradserve serve` started
    the moment before (as `make serve` would, on a free port)."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = blocks[0]
    assert "wait_for_ready=True" in example
    port = free_port()
    script = tmp_path / "example.py"
    script.write_text(example.replace("127.0.0.1:50051", f"127.0.0.1:{port}"))
    env = {**os.environ, "GRADSERVE_METRICS_PORT": "0", "GRADSERVE_HTTP_PORT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "gradserve.server.cli", "serve", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        run = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, timeout=150
        )
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("x=")]
    assert len(lines) == 2, run.stdout
    for line in lines:
        x = float(re.search(r"x=([\d.]+)", line).group(1))
        gradient = float(re.search(r"dy/dx=([-+][\d.]+)", line).group(1))
        assert gradient == pytest.approx(8 * (x - 0.5), abs=0.3), line
    assert server.returncode == 0, server.stderr.read()
