"""`gradserve loadtest` against a live server: its JSON adds up, nothing fails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gradserve.wire.kinds import Derivative


@pytest.fixture(scope="module")
def both_ports(bundled_engine):
    """The bundled model on gRPC and on HTTP (the REST protocol)."""
    from dataclasses import replace

    from conftest import TEST_CONFIG, RunningServer, free_port

    with RunningServer(replace(TEST_CONFIG, http_port=free_port()), bundled_engine) as running:
        yield running


@pytest.mark.parametrize(
    ("mode", "protocol"),
    [("unary", ["native"]), ("stream", ["native"]), ("unary", ["rest", "--http-data", "binary"]),
     ("unary", ["rest", "--http-data", "json"])],
)  # fmt: skip
def test_loadtest_json_counts_add_up(both_ports, tmp_path, mode, protocol):
    out = tmp_path / "results.json"
    csv = tmp_path / "results.csv"
    port = both_ports.server.http_port if protocol[0] == "rest" else both_ports.server.port
    run = subprocess.run(
        [sys.executable, "-m", "gradserve.server.cli", "loadtest", "--target", f"127.0.0.1:{port}",
         "--protocol", *protocol, "--mode", mode, "--concurrency", "1,4", "--rows", "3",
         "--duration", "0.6", "--requests", "400", "--warmup", "0.1", "--json", str(out),
         "--csv", str(csv)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    steps = json.loads(out.read_text())
    assert [s["concurrency"] for s in steps] == [1, 4]
    for step in steps:
        assert step["mode"] == mode and step["errors"] == {}
        assert 0 < step["requests"] <= 400
        assert step["requests_per_s"] == pytest.approx(step["requests"] / step["seconds"])
        assert step["rows_per_s"] == pytest.approx(3 * step["requests_per_s"])
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert step["batch_rows"]["mean"] >= 3
        hops = step["breakdown_us"]
        assert hops["compute"] > 0 and hops["server"] > 0
        # Medians of parts need not add up exactly, but no part exceeds the server's total,
        # and the server's total fits in the client's latency.
        assert max(hops[h] for h in ("decode", "queue", "handoff", "compute")) <= hops["server"]
        assert hops["server"] <= lat["p99"] * 1e3
    assert len(csv.read_text().splitlines()) == 3
    assert "req/s" in run.stdout and "p99" in run.stdout
    assert "where the time went" in run.stdout and "handoff" in run.stdout


def test_loadtest_over_rest_runs_every_derivative_kind(both_ports, tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "gradserve.server.cli", "loadtest", "--protocol", "rest",
         "--target", f"127.0.0.1:{both_ports.server.http_port}", "--derivative", "all",
         "--concurrency", "2", "--requests", "20", "--warmup", "0", "--json", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    steps = json.loads(out.read_text())
    assert [s["derivative"] for s in steps] == [kind.value for kind in Derivative]
    assert all(s["errors"] == {} and s["requests"] == 20 for s in steps)


def test_loadtest_exits_non_zero_when_requests_fail(bundled_engine, tmp_path):
    from dataclasses import replace

    from conftest import TEST_CONFIG, GatedEngine, RunningServer

    gated = GatedEngine(bundled_engine)
    gated.gate.clear()
    with RunningServer(replace(TEST_CONFIG, max_queue_rows=4), gated) as running:
        run = subprocess.run(
            [sys.executable, "-m", "gradserve.client.loadtest", "--target", running.target,
             "--concurrency", "8", "--duration", "0.5", "--warmup", "0", "--timeout", "2",
             "--json", str(tmp_path / "r.json")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        gated.gate.set()
    assert run.returncode == 1
    errors = json.loads((tmp_path / "r.json").read_text())[0]["errors"]
    assert errors.get("RESOURCE_EXHAUSTED", 0) > 0
    assert "failed" in run.stderr


def cnn_model(path) -> None:
    """8x8x1 images -> 2 outputs (tanh): a non-flat input for every derivative kind."""
    import keras

    keras.utils.set_random_seed(5)
    keras.Sequential(
        [
            keras.Input(shape=(8, 8, 1)),
            keras.layers.Conv2D(2, 3, activation="tanh"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, activation="tanh"),
        ]
    ).save(path)


@pytest.fixture(scope="module")
def image_server(tmp_path_factory, bundled_engine):
    """Two models served: `images` (8x8x1, engine calls recorded) and the bundled one, so
    that requests must name their model."""
    from dataclasses import replace

    from conftest import TEST_CONFIG, GatedEngine, RunningServer

    from gradserve.server.engine.compiled import TensorFlowEngine

    path = tmp_path_factory.mktemp("loadtest-models") / "images.keras"
    cnn_model(path)
    engine = TensorFlowEngine(path, xla=False, max_batch_size=64, deterministic=True)
    engine.warm_up()
    recorded = GatedEngine(engine)
    with RunningServer(replace(TEST_CONFIG, max_batch_size=64), [recorded, bundled_engine]) as s:
        yield s, recorded


def loadtest(target: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gradserve.server.cli", "loadtest", "--target", target,
         "--model", "images", "--duration", "0.4", "--requests", "60", "--warmup", "0",
         "--no-progress", *args],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_loadtest_every_derivative_kind_on_an_image_model(image_server, tmp_path, mode):
    server, _ = image_server
    out = tmp_path / "kinds.json"
    run = loadtest(server.target, "--mode", mode, "--derivative", "all", "--concurrency", "2",
                   "--rows", "3", "--json", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr + run.stdout
    steps = json.loads(out.read_text())
    kinds = ["gradient", "jacobian", "none", "vjp", "jvp", "hessian", "hvp",
             "integrated_gradients", "smooth_grad"]  # fmt: skip
    assert [s["derivative"] for s in steps] == kinds
    for step in steps:
        assert step["errors"] == {}, step
        assert step["model"] == "images" and step["requests"] > 0
        assert step["requests_per_s"] > 0


def test_loadtest_sends_the_rows_of_an_x_file(image_server, tmp_path):
    server, recorded = image_server
    x = np.random.default_rng(9).uniform(-1, 1, size=(6, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    recorded.calls.clear()
    run = loadtest(server.target, "--x-file", str(tmp_path / "x.npy"), "--rows", "2",
                   "--derivative", "jvp", "--concurrency", "1",
                   "--json", str(tmp_path / "r.json"))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert json.loads((tmp_path / "r.json").read_text())[0]["errors"] == {}
    sent = np.concatenate([rows for _, rows in recorded.calls])
    assert len(sent) >= 6
    file_rows = {row.tobytes() for row in x}
    assert all(row.tobytes() in file_rows for row in sent)
    assert {row.tobytes() for row in sent} == file_rows  # every row of the file went out


def test_loadtest_refuses_an_x_file_of_the_wrong_shape(image_server, tmp_path):
    server, _ = image_server
    np.save(tmp_path / "flat.npy", np.zeros((4, 64), np.float32))
    run = loadtest(server.target, "--x-file", str(tmp_path / "flat.npy"))
    assert run.returncode == 2
    assert "[N, 8, 8, 1]" in run.stderr
