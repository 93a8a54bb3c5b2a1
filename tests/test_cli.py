"""The `gradserve` command as users run it: a real process, signals, flags and env."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import exited, free_port, start_gradserve, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradserve.server import config as cfg
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc


@pytest.mark.parametrize("frontends", ["1", "2"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_accepted_requests_then_exits_zero(sig, frontends):
    port = free_port()
    process = start_gradserve(port, "--frontends", frontends, GRADSERVE_MAX_DELAY_US="300000")
    target = f"127.0.0.1:{port}"
    try:
        wait_serving(target, process)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            x = np.full((3, 1), 0.6, "<f4")
            request = pb.EvaluateRequest(x=pb.Tensor(shape=[3, 1], data=x.tobytes()))
            futures = [stub.Evaluate.future(request, timeout=30) for _ in range(20)]
            time.sleep(0.1)  # accepted and held in the queue by the 0.3 s batching delay
            process.send_signal(sig)
            responses = [f.result(timeout=30) for f in futures]
        assert all(r.dy_dx.shape == [3, 1] for r in responses)
        assert process.wait(timeout=60) == 0
        assert "draining" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


def test_flags_override_environment_and_defaults(monkeypatch):
    import argparse

    monkeypatch.setenv("GRADSERVE_MAX_BATCH_SIZE", "128")
    monkeypatch.setenv("GRADSERVE_XLA", "off")
    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    from_env = cfg.from_namespace(parser.parse_args([]))
    assert (from_env.max_batch_size, from_env.xla, from_env.port) == (128, False, 50051)
    from_flag = cfg.from_namespace(parser.parse_args(["--max-batch-size", "32", "--xla", "on"]))
    assert (from_flag.max_batch_size, from_flag.xla) == (32, True)
    assert from_flag.host == "127.0.0.1"
    with pytest.raises(ValueError, match="max-batch-size"):
        cfg.from_namespace(parser.parse_args(["--max-batch-size", "0"]))


def test_serve_help_lists_every_flag_with_its_default():
    run = subprocess.run(
        [sys.executable, "-m", "gradserve.server.cli", "serve", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0
    for flag in ("--model", "--port", "--device", "--max-batch-size", "--max-delay-us", "--xla"):
        assert flag in run.stdout
    assert "default: 127.0.0.1" in run.stdout


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_sigterm_under_load_loses_nothing_and_reports_not_serving_first(frontends):
    """Every request either succeeds or is refused with UNAVAILABLE; none is lost or hangs."""
    port = free_port()
    process = start_gradserve(
        port, "--drain-seconds", "20", "--frontends", frontends, GRADSERVE_MAX_DELAY_US="2000"
    )
    target = f"127.0.0.1:{port}"
    outcomes: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()
    try:
        wait_serving(target, process)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.GradientServiceStub(channel)
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(), timeout=60
            )

            def watch_health() -> None:
                with contextlib.suppress(grpc.RpcError):
                    statuses.extend(r.status for r in watch)

            watcher = threading.Thread(target=watch_health)
            watcher.start()
            x = np.full((2, 1), 0.6, "<f4")
            request = pb.EvaluateRequest(x=pb.Tensor(shape=[2, 1], data=x.tobytes()))

            def caller() -> None:
                while not stop.is_set():
                    try:
                        stub.Evaluate(request, timeout=30)
                        outcomes.append("OK")
                    except grpc.RpcError as error:
                        outcomes.append(error.code().name)

            def streamer() -> None:
                requests = (request for _ in range(100_000) if not stop.is_set())
                try:
                    for response in stub.EvaluateStream(requests, timeout=30):
                        has_error = response.HasField("error")
                        outcomes.append(f"stream:{response.error.code}" if has_error else "OK")
                except grpc.RpcError as error:
                    outcomes.append(f"stream-end:{error.code().name}")

            threads = [threading.Thread(target=caller) for _ in range(8)]
            threads.append(threading.Thread(target=streamer))
            for t in threads:
                t.start()
            time.sleep(1.0)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=60) == 0
            stop.set()
            for t in threads:
                t.join(timeout=40)
                assert not t.is_alive(), "a caller hung"
            watch.cancel()
            watcher.join(timeout=10)
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert outcomes.count("OK") > 50
    unavailable = str(grpc.StatusCode.UNAVAILABLE.value[0])
    allowed = {"OK", "UNAVAILABLE", f"stream:{unavailable}", "stream-end:UNAVAILABLE"}
    # A call that reaches the server in the instant gRPC closes its last connections is
    # cancelled by the transport rather than refused by gradserve; it was never accepted,
    # as the server's own account shows (nothing was unfinished when the transport closed).
    allowed.add("CANCELLED")
    assert set(outcomes) <= allowed, set(outcomes) - allowed
    assert outcomes.count("CANCELLED") < 0.01 * len(outcomes)
    log = process.stderr.read()
    assert "drain: every accepted request answered" in log and "unfinished" not in log
    serving, not_serving = (health_pb2.HealthCheckResponse.SERVING,
                            health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
    assert statuses[:1] == [serving] and not_serving in statuses


def test_serve_keras_h5_and_savedmodel_from_the_command_line(tmp_path):
    import keras

    from gradserve.client import GradientClient

    model = keras.Sequential([keras.Input(shape=(3,)), keras.layers.Dense(2, activation="tanh")])
    model.save(tmp_path / "small.h5")
    model.export(tmp_path / "exported", verbose=False)
    port = free_port()
    models = f"quadratic_tanh,{tmp_path / 'small.h5'},{tmp_path / 'exported'}"
    process = start_gradserve(port, "--model", models)
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        with GradientClient(f"127.0.0.1:{port}", timeout=10) as client:
            names = {m.name: m for m in client.list_models()}
            assert set(names) == {"quadratic_tanh", "small", "exported"}
            x = np.random.default_rng(0).normal(size=(4, 3))
            h5 = client.evaluate(x, "jacobian", model="small")
            saved = client.evaluate(x, "jacobian", model="exported")
            np.testing.assert_allclose(h5.dy_dx, saved.dy_dx, rtol=1e-5, atol=1e-7)
            assert h5.dy_dx.shape == (4, 2, 3)
            hessian = client.evaluate([0.5], "hessian", model="quadratic_tanh").dy_dx
            assert abs(hessian[0, 0, 0] - 8) < 1.5
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)


@pytest.mark.parametrize("frontends", ["1", "2"])
@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_a_taken_port_stops_the_server_in_one_line_with_status_two(flag, frontends):
    """Another program listens on the port: the server says which port and flag, in one
    line, exits 2 without a traceback, and (several processes) restarts nothing."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        ports = {"--port": free_port(), "--http-port": free_port(), "--metrics-port": free_port()}
        ports[flag] = taken
        process = subprocess.Popen(
            [sys.executable, "-m", "gradserve.server.cli", "serve", "--frontends", frontends,
             *(arg for pair in ports.items() for arg in (pair[0], str(pair[1])))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        errors = exited(process, timeout=120)
    assert process.returncode == 2, errors[-2000:]
    assert "Traceback" not in errors and "replacing" not in errors, errors[-2000:]
    (line,) = [line for line in errors.splitlines() if line.startswith("gradserve serve:")]
    assert f"127.0.0.1:{taken} ({flag})" in line and f"choose another port with {flag}" in line
