"""The REST port's bounds with real HTTP clients (http.client for what a careless or hostile
client sends, httpx for the well-behaved caller next to it): body size, a stalled body, chunked
bodies, the connection limit, idle connections, routing errors, and the drain."""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import socket
from dataclasses import replace

import httpx
import numpy as np
import pytest
from conftest import (
    TEST_CONFIG,
    GatedEngine,
    RunningServer,
    assert_same_answer,
    free_port,
    unbatched,
    wait_until,
)

from gradserve.wire.kinds import Derivative

IDLE_S = 2.0  # --http-idle-seconds of the bounded server: far above a gap between sends
MAX_CONNECTIONS = 3
WAIT_S = 15  # every client's timeout: far above any answer here


@pytest.fixture(scope="module")
def bounded(bundled_engine):
    config = replace(TEST_CONFIG, http_port=free_port(), max_message_mb=1,
                     http_idle_seconds=IDLE_S, http_max_connections=MAX_CONNECTIONS)  # fmt: skip
    with RunningServer(config, bundled_engine) as running:
        yield running


def connect(running: RunningServer) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", running.server.http_port, timeout=WAIT_S)


def read(connection: http.client.HTTPConnection) -> tuple[int, dict, dict]:
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read())


def body(rows: np.ndarray) -> bytes:
    tensor = {"name": "x", "datatype": "FP32", "shape": list(rows.shape), "data": rows.tolist()}
    return json.dumps({"inputs": [tensor]}).encode()


def well_behaved_infer(running: RunningServer, engine, x: float) -> None:
    """Another caller's request, answered, and right, whatever the careless one does."""
    url = f"http://127.0.0.1:{running.server.http_port}/v2/models/quadratic/infer"
    rows = np.array([[x]], "<f4")
    answer = httpx.post(url, content=body(rows), timeout=WAIT_S)
    assert answer.status_code == 200, answer.text
    (dy_dx,) = [o for o in answer.json()["outputs"] if o["name"] == "dy_dx"]
    expected = unbatched(engine, Derivative.GRADIENT, rows).dy_dx
    assert_same_answer(np.array(dy_dx["data"], "<f4").reshape(expected.shape), expected)


def test_a_declared_size_over_the_limit_is_refused_before_the_body_is_read(bounded, bundled_engine):
    connection = connect(bounded)
    connection.putrequest("POST", "/v2/models/quadratic/infer")
    connection.putheader("Content-Length", str(10**10))
    connection.endheaders()
    status, _, answer = read(connection)
    assert status == 413
    assert answer["error"] == (
        f"the request body is {10**10} bytes; the most this server takes is "
        f"{1 << 20} bytes (--max-message-mb)"
    )
    well_behaved_infer(bounded, bundled_engine, 0.7)


def test_a_body_that_does_not_fit_the_memory_budget_is_refused_before_it_is_read(
    bounded, bundled_engine
):
    memory = bounded.server.memory

    async def hold(nbytes: int) -> None:  # on the server's loop, as its requests' are
        memory.hold(nbytes) if nbytes > 0 else memory.release(-nbytes)

    full = memory.limit - memory.held
    bounded._call(hold(full), WAIT_S)
    try:
        connection = connect(bounded)
        connection.putrequest("POST", "/v2/models/quadratic/infer")
        connection.putheader("Content-Length", "1000")
        connection.endheaders()  # no body sent: the answer must not wait for it
        status, headers, answer = read(connection)
    finally:
        bounded._call(hold(-full), WAIT_S)
    assert (status, headers["Retry-After"]) == (429, "1")
    assert answer["error"].startswith("queue full: ")
    assert answer["error"].endswith("this request needs 2.0 KiB; retry later")  # body + answer
    well_behaved_infer(bounded, bundled_engine, 0.6)


def test_a_chunked_body_is_read_whole_and_one_over_the_limit_is_refused(bounded, bundled_engine):
    rows = np.array([[0.25], [0.75]], "<f4")
    payload = body(rows)
    pieces = [payload[i : i + 7] for i in range(0, len(payload), 7)]
    connection = connect(bounded)
    json_type = {"Content-Type": "application/json"}
    connection.request("POST", "/v2/models/quadratic/infer", body=iter(pieces),
                       encode_chunked=True, headers=json_type)  # fmt: skip
    status, _, answer = read(connection)
    assert status == 200
    expected = unbatched(bundled_engine, Derivative.GRADIENT, rows).dy_dx
    assert_same_answer(np.array(answer["outputs"][1]["data"], "<f4").reshape(2, 1), expected)

    too_large = [b" " * (256 << 10)] * 6  # 1.5 MiB, no Content-Length
    connection.request("POST", "/v2/models/quadratic/infer", body=iter(too_large),
                       encode_chunked=True)  # fmt: skip
    status, _, answer = read(connection)
    assert status == 413
    assert answer["error"].startswith("the request body is at least ")
    well_behaved_infer(bounded, bundled_engine, 0.2)


def test_a_stalled_body_gets_408_while_other_callers_are_answered(bounded, bundled_engine):
    connection = connect(bounded)
    connection.putrequest("POST", "/v2/models/quadratic/infer")
    connection.putheader("Content-Length", "100")
    connection.endheaders(b'{"inputs": [')  # 12 of the 100 bytes, then nothing
    well_behaved_infer(
        bounded, bundled_engine, 0.9
    )  # answered while the stalled body holds its connection
    status, _, answer = read(connection)
    assert status == 408
    assert answer["error"] == (
        f"the request body stalled: nothing arrived for {IDLE_S:g} s after 12 bytes "
        "(--http-idle-seconds)"
    )


def test_an_idle_connection_is_closed(bounded):
    with socket.create_connection(("127.0.0.1", bounded.server.http_port), WAIT_S) as idle:
        assert idle.recv(1) == b""  # closed by the server, never answered


def test_connections_beyond_the_limit_get_503_and_a_freed_slot_serves_again(bundled_engine):
    config = replace(TEST_CONFIG, http_port=free_port(), http_max_connections=MAX_CONNECTIONS,
                     http_idle_seconds=10 * WAIT_S)  # held connections stay open  # fmt: skip
    with RunningServer(config, bundled_engine) as running:
        held = [connect(running) for _ in range(MAX_CONNECTIONS)]
        for connection in held:
            connection.request("GET", "/v2/health/live")
            assert read(connection)[0] == 200  # kept alive: holds its slot
        extra = connect(running)
        extra.request("GET", "/v2/health/live")
        status, headers, answer = read(extra)
        assert (status, headers["Retry-After"]) == (503, "1")
        assert answer["error"] == "too many open HTTP connections; retry after 1 s"
        held.pop().close()
        wait_until(lambda: running.server.http_connections < MAX_CONNECTIONS, WAIT_S)
        well_behaved_infer(running, bundled_engine, 0.4)
        for connection in held:
            connection.close()


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/v2/nothing/here", 404), ("DELETE", "/v2/models/quadratic/infer", 405)],
)
def test_routing_errors_answer_json(bounded, method, path, status):
    connection = connect(bounded)
    connection.request(method, path)
    got, headers, answer = read(connection)
    assert (got, headers["Content-Type"]) == (status, "application/json")
    assert answer["error"] in ("Not Found", "Method Not Allowed")
    if status == 405:
        assert headers["Allow"] == "POST"


def test_drain_answers_accepted_http_requests_and_refuses_new_ones(bundled_engine):
    gated = GatedEngine(bundled_engine)
    gated.gate.clear()
    config = replace(TEST_CONFIG, http_port=free_port())
    running = RunningServer(config, gated)
    url = f"http://127.0.0.1:{running.server.http_port}"
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            accepted = pool.submit(well_behaved_infer, running, bundled_engine, 0.8)
            wait_until(lambda: gated.entered >= 1, WAIT_S)
            draining = asyncio.run_coroutine_threadsafe(
                running.server.stop(grace=WAIT_S), running._loop
            )
            wait_until(lambda: not running.server.ready, WAIT_S)
            refused = httpx.post(f"{url}/v2/models/quadratic/infer", timeout=WAIT_S,
                                 content=body(np.array([[0.3]], "<f4")))  # fmt: skip
            assert (refused.status_code, refused.headers["Retry-After"]) == (503, "1")
            assert refused.json() == {
                "error": "the server is shutting down and accepts no new requests"
            }
            assert httpx.get(f"{url}/v2/health/ready", timeout=WAIT_S).status_code == 503
            gated.gate.set()
            accepted.result(timeout=WAIT_S)
            draining.result(timeout=WAIT_S)
    finally:
        gated.gate.set()
        running._loop.call_soon_threadsafe(running._loop.stop)
        running._thread.join(timeout=10)
