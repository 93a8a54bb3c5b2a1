"""Running it like production: health while loading, reflection, metrics, logs, TLS, balancing."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import TEST_CONFIG, RunningServer, free_port, start_gradserve, wait_serving
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from gradserve.client import GradientClient, GradserveError, RetryPolicy, Tls
from gradserve.server.app import GradServer
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ["", "gradserve.v1.GradientService", "inference.GRPCInferenceService"]


def health_of(target: str, service: str = "") -> int:
    with grpc.insecure_channel(target) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        return check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_health_is_not_serving_while_the_model_loads(bundled_engine):
    """The port answers during loading: NOT_SERVING, model RPCs UNAVAILABLE, then SERVING."""
    released = threading.Event()

    def slow_load(_config):
        assert released.wait(30)
        return [bundled_engine]

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = GradServer(TEST_CONFIG, load=slow_load)
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        deadline = 30
        while server.port is None and deadline > 0:
            threading.Event().wait(0.05)
            deadline -= 0.05
        target = f"127.0.0.1:{server.port}"
        wait = threading.Event()
        for _ in range(100):
            try:
                if health_of(target) == NOT_SERVING:
                    break
            except grpc.RpcError:
                wait.wait(0.05)
        assert [health_of(target, s) for s in SERVICES] == [NOT_SERVING] * 3
        with GradientClient(target, timeout=5, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(GradserveError) as info:
                client.evaluate(0.5)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
            assert "still loading" in info.value.message
            released.set()
            starting.result(timeout=30)
            assert [health_of(target, s) for s in SERVICES] == [SERVING] * 3
            assert client.evaluate(0.6).y.shape == (1, 1)
    finally:
        released.set()
        asyncio.run_coroutine_threadsafe(server.stop(grace=5), loop).result(timeout=30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)


def test_reflection_lists_and_describes_both_services(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="inference.GRPCInferenceService"
            ),
            reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="gradserve.v1.GradientService"
            ),
        ]
        listed, inference, native = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"gradserve.v1.GradientService", "inference.GRPCInferenceService",
            "grpc.health.v1.Health"} <= names  # fmt: skip
    from google.protobuf import descriptor_pb2

    for response, service in ((inference, "GRPCInferenceService"), (native, "GradientService")):
        files = response.file_descriptor_response.file_descriptor_proto
        parsed = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
        assert any(service in [s.name for s in f.service] for f in parsed)


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_metrics_count_what_happened(bundled_engine):
    config = replace(TEST_CONFIG, metrics_port=free_port())
    with RunningServer(config, bundled_engine) as running:
        with GradientClient(running.target, timeout=10) as client:
            for i in range(20):
                client.evaluate(np.full(3, i / 20))
            for _ in range(4):
                with pytest.raises(GradserveError):
                    client.evaluate([[1.0, 2.0]])
            results = list(client.stream([0.1, [np.nan], 0.3], errors="return"))
            assert isinstance(results[1], GradserveError)
        m = scrape(running.server.metrics_port)
        batches = running.batcher.batches_run
    assert m['gradserve_requests_total{code="OK",rpc="Evaluate"}'] == 20
    assert m['gradserve_requests_total{code="INVALID_ARGUMENT",rpc="Evaluate"}'] == 4
    assert m['gradserve_requests_total{code="OK",rpc="EvaluateStream"}'] == 2
    assert m['gradserve_requests_total{code="INVALID_ARGUMENT",rpc="EvaluateStream"}'] == 1
    assert m['gradserve_rows_computed_total{derivative="gradient"}'] == 20 * 3 + 2
    assert m['gradserve_engine_calls_total{derivative="gradient"}'] == batches
    assert m["gradserve_batch_rows_count"] == batches
    assert m["gradserve_batch_rows_sum"] == 62
    assert m["gradserve_queue_wait_seconds_count"] == 22
    assert m['gradserve_request_duration_seconds_count{rpc="Evaluate"}'] == 24
    assert m['gradserve_request_duration_seconds_count{rpc="EvaluateStream"}'] == 3
    assert m["gradserve_queue_rows"] == 0 and m["gradserve_streams_in_flight"] == 0
    for hop in ("decode", "queue", "handoff", "compute", "encode"):  # once per answered request
        assert m[f'gradserve_request_hop_seconds_count{{hop="{hop}"}}'] == 22


def test_json_logs_one_line_per_event_and_none_per_request(tmp_path):
    port = free_port()
    process = start_gradserve(port, "--log-format", "json", "--max-batch-size", "64")
    try:
        wait_serving(f"127.0.0.1:{port}", process)
        with GradientClient(f"127.0.0.1:{port}", timeout=10) as client:
            for _ in range(50):
                client.evaluate(0.3)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    entries = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    events = [e.get("event") for e in entries if e["logger"].startswith("gradserve")]
    for event in ("start", "listen", "model_load", "warm_up", "serving", "drain", "stop"):
        assert event in events, events
    start = next(e for e in entries if e.get("event") == "start")
    assert start["config.max_batch_size"] == "64" and start["config.xla"] == "False"
    assert len(events) < 15, "no per-request log lines at INFO"


def make_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def issue(name, issuer_name, issuer_key, key, ca=False, san=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    paths = {}

    def write(stem, cert, key):
        paths[f"{stem}_cert"] = directory / f"{stem}.pem"
        paths[f"{stem}_key"] = directory / f"{stem}.key"
        paths[f"{stem}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{stem}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", issue("test ca", "test ca", ca_key, ca_key, ca=True), ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    write("server", issue("localhost", "test ca", ca_key, server_key, san=san), server_key)
    client_key = ec.generate_private_key(ec.SECP256R1())
    write("client", issue("client", "test ca", ca_key, client_key), client_key)
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


def test_tls_succeeds_and_plaintext_fails_clearly(bundled_engine, pki):
    config = replace(TEST_CONFIG, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]))
    with RunningServer(config, bundled_engine) as running:
        tls = Tls(ca=str(pki["ca_cert"]))
        with GradientClient(running.target, timeout=10, tls=tls) as client:
            assert abs(client.evaluate(0.6).dy_dx[0, 0] - 0.8) < 0.3
        plain = GradientClient(running.target, timeout=3, retry=RetryPolicy(attempts=1))
        with plain, pytest.raises(GradserveError) as info:
            plain.evaluate(0.6)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate(bundled_engine, pki, tmp_path):
    config = replace(
        TEST_CONFIG,
        tls_cert=str(pki["server_cert"]),
        tls_key=str(pki["server_key"]),
        tls_client_ca=str(pki["ca_cert"]),
    )
    with RunningServer(config, bundled_engine) as running:
        anonymous = Tls(ca=str(pki["ca_cert"]))
        with GradientClient(running.target, timeout=3, tls=anonymous,
                            retry=RetryPolicy(attempts=1)) as client:  # fmt: skip
            with pytest.raises(GradserveError) as info:
                client.evaluate(0.6)
            assert info.value.code == grpc.StatusCode.UNAVAILABLE
        mutual = Tls(ca=str(pki["ca_cert"]), cert=str(pki["client_cert"]),
                     key=str(pki["client_key"]))  # fmt: skip
        with GradientClient(running.target, timeout=10, tls=mutual) as client:
            assert client.evaluate([0.2, 0.6]).dy_dx.shape == (2, 1)
        out = tmp_path / "lt.json"
        run = subprocess.run(
            [sys.executable, "-m", "gradserve.client.loadtest", "--target", running.target,
             "--concurrency", "2", "--duration", "0.3", "--warmup", "0", "--json", str(out),
             "--tls-ca", str(pki["ca_cert"]), "--tls-cert", str(pki["client_cert"]),
             "--tls-key", str(pki["client_key"])],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert json.loads(out.read_text())[0]["requests"] > 0


def test_the_http_port_has_the_grpc_ports_tls_and_client_certificates(
    bundled_engine, pki, tmp_path
):
    config = replace(TEST_CONFIG, tls_cert=str(pki["server_cert"]), tls_key=str(pki["server_key"]),
                     tls_client_ca=str(pki["ca_cert"]), http_port=free_port())  # fmt: skip
    with RunningServer(config, bundled_engine) as running:
        url = f"https://127.0.0.1:{running.server.http_port}/v2/health/ready"
        client_cert = (str(pki["client_cert"]), str(pki["client_key"]))
        with httpx.Client(verify=ssl_context(pki["ca_cert"], client_cert)) as mutual:
            assert mutual.get(url).json() == {"ready": True}
        anonymous = httpx.Client(verify=ssl_context(pki["ca_cert"]))
        with anonymous, pytest.raises(httpx.HTTPError):
            anonymous.get(url)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url.replace("https", "http"), timeout=3)
        out = tmp_path / "lt.json"
        run = subprocess.run(
            [sys.executable, "-m", "gradserve.client.loadtest", "--protocol", "rest",
             "--target", f"127.0.0.1:{running.server.http_port}", "--concurrency", "2",
             "--requests", "20", "--warmup", "0", "--json", str(out),
             "--tls-ca", str(pki["ca_cert"]), "--tls-cert", str(pki["client_cert"]),
             "--tls-key", str(pki["client_key"])],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        step = json.loads(out.read_text())[0]
        assert (step["requests"], step["errors"]) == (20, {})


def ssl_context(ca: Path, cert: tuple[str, str] | None = None):
    import ssl

    context = ssl.create_default_context(cafile=str(ca))
    if cert:
        context.load_cert_chain(*cert)
    return context


def test_several_targets_are_balanced_and_survive_one_going_away(bundled_engine):
    first = RunningServer(TEST_CONFIG, bundled_engine)
    second = RunningServer(TEST_CONFIG, bundled_engine)
    try:
        with GradientClient([first.target, second.target], timeout=20) as client:
            for _ in range(60):
                client.evaluate(0.4)
            served = [first.batcher.batches_run, second.batcher.batches_run]
            assert min(served) >= 10, served
            first.stop()
            for _ in range(30):
                assert client.evaluate(0.6).y.shape == (1, 1)
        assert second.batcher.batches_run >= served[1] + 30
    finally:
        second.stop()
        if first.server.ready:
            first.stop()


def test_sdk_rejects_mixed_or_named_target_lists():
    with pytest.raises(ValueError, match="IP:port"):
        GradientClient(["localhost:1", "localhost:2"])
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        GradientClient(["127.0.0.1:1", "[::1]:2"])


def test_native_stub_reaches_the_inference_port_too(server):
    """Both protocols share one port (a plain stub call, to make the point explicit)."""
    with grpc.insecure_channel(server.target) as channel:
        info = pb_grpc.GradientServiceStub(channel).GetModelInfo(pb.ModelInfoRequest(), timeout=5)
    assert info.name == "quadratic"


def _states(channel: grpc.Channel) -> list[grpc.ChannelConnectivity]:
    seen: list[grpc.ChannelConnectivity] = []
    channel.subscribe(seen.append, try_to_connect=False)
    return seen


def test_max_connection_age_sends_clients_to_reconnect_without_failing_calls(bundled_engine):
    """With --max-connection-age 0.4 the server ends a connection (GOAWAY) after about 0.4 s:
    the channel leaves READY and reconnects, a call in flight across that moment (held 1.5 s
    by the gate) still gets its answer, and later calls work on the new connection."""
    from conftest import GatedEngine

    gated = GatedEngine(bundled_engine)
    config = replace(TEST_CONFIG, max_connection_age=0.4)
    with RunningServer(config, gated) as running, grpc.insecure_channel(running.target) as ch:
        stub = pb_grpc.GradientServiceStub(ch)
        request = pb.EvaluateRequest(x=pb.Tensor(shape=[1, 1], data=np.float32(0.6).tobytes()))
        stub.Evaluate(request, timeout=10)
        seen = _states(ch)
        gated.gate.clear()
        held = stub.Evaluate.future(request, timeout=20)
        threading.Timer(1.5, gated.gate.set).start()
        answer = held.result(timeout=20)
        assert np.frombuffer(answer.dy_dx.data, "<f4")[0] == pytest.approx(0.8, abs=0.3)
        deadline = time.monotonic() + 10
        while grpc.ChannelConnectivity.IDLE not in seen:
            assert time.monotonic() < deadline, f"no reconnect after the age: {seen}"
            time.sleep(0.05)
        stub.Evaluate(request, timeout=10)


def test_without_max_connection_age_the_connection_stays(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        request = pb.EvaluateRequest(x=pb.Tensor(shape=[1, 1], data=np.float32(0.6).tobytes()))
        stub.Evaluate(request, timeout=10)
        seen = _states(channel)
        time.sleep(1.2)
        stub.Evaluate(request, timeout=10)
    assert grpc.ChannelConnectivity.IDLE not in seen, seen


def test_connection_flags_become_grpc_options():
    from gradserve.server import config as cfg

    parser = argparse.ArgumentParser()
    cfg.add_arguments(parser)
    args = parser.parse_args(
        ["--max-connection-age", "300", "--max-connection-age-grace", "2.5", "--bdp-probe", "on"]
    )
    assert cfg.from_namespace(args).connection_options() == [
        ("grpc.http2.bdp_probe", 1),
        ("grpc.max_connection_age_ms", 300_000),
        ("grpc.max_connection_age_grace_ms", 2500),
    ]
    assert cfg.ServerConfig().connection_options() == [("grpc.http2.bdp_probe", 0)]
    with pytest.raises(ValueError, match="max-connection-age"):
        cfg.from_namespace(parser.parse_args(["--max-connection-age", "-1"]))
