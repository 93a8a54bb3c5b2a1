"""The multi-process server (`--frontends 2`): what runs where, merged batches, faults, drain.

Each test runs `gradserve serve --frontends 2` as a child process and looks at it from the
outside: its processes in /proc, its one /metrics endpoint, its callers' outcomes.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
import threading
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from conftest import FRONTENDS_ARGS, ServerProcess, assert_close, assert_same_answer
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from gradserve.client import GradientClient, GradserveError, RetryPolicy
from gradserve.server.core.contract import Priority
from gradserve.server.core.errors import Closed, EngineFailed, QueueFull, RequestTooLarge
from gradserve.server.multiproc import messages
from gradserve.server.multiproc.messages import (
    Control,
    ControlDone,
    EngineModel,
    Released,
    SubBatch,
    SubBatchAnswer,
)
from gradserve.server.multiproc.remote import COPY_OFF_LOOP
from gradserve.server.multiproc.shm import SHM_DIR, ArrayRef
from gradserve.server.multiproc.supervisor import RESTART_LIMIT, restart_delay
from gradserve.server.tracing import pack_contexts, unpack_contexts
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import tensors
from gradserve.wire.kinds import Derivative

FRONTEND_RSS_LIMIT_MB = 150


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def maps(pid: int) -> str:
    """The libraries a process has mapped ("" once it has exited)."""
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


def loads_tensorflow(pid: int) -> bool:
    return "tensorflow" in maps(pid)


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS:")).split()[1]) / 1024


def listens_on(pid: int, port: int) -> bool:
    """True if the process holds a socket listening on `port` (a standby frontend does not)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # gRPC listens on v4-mapped IPv6
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except OSError:
        return False
    return any(link[len("socket:[") : -1] in inodes for link in links if link.startswith("socket:"))


def roles(server: ServerProcess) -> tuple[int, list[int]]:
    """(engine pid, frontend pids) among the supervisor's children (the standby aside)."""
    pids = children(server.process.pid)
    engines = [p for p in pids if loads_tensorflow(p)]
    frontends = [p for p in pids if p not in engines and listens_on(p, server.port)]
    assert len(engines) == 1, (pids, engines)
    return engines[0], frontends


def scrape(server: ServerProcess) -> dict[str, float]:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        name: float(value)
        for line in text.splitlines()
        if line and not line.startswith("#")
        for name, value in [line.rsplit(" ", 1)]
    }


def total(samples: dict[str, float], prefix: str, *labels: str) -> float:
    return sum(
        v for k, v in samples.items() if k.startswith(prefix) and all(x in k for x in labels)
    )


@pytest.fixture
def fresh_server():
    """A 2-frontend server of its own (XLA off: quick to start), for tests that hurt it."""
    running = ServerProcess(*FRONTENDS_ARGS, "--drain-seconds", "10")
    yield running
    if running.process.poll() is None:
        running.process.kill()
        running.process.wait(timeout=10)


def test_every_frontend_serves_rest_with_the_in_process_answers(frontends_server, bundled_engine):
    xs = np.linspace(-1, 2, 40, dtype=np.float32).reshape(40, 1, 1)
    url = f"http://127.0.0.1:{frontends_server.http_port}/v2/models/quadratic/infer"

    def call(x: np.ndarray) -> np.ndarray:  # a connection of its own each time
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [[x]]}]}
        answer = httpx.post(url, json=body, timeout=30).json()
        grad = next(o for o in answer["outputs"] if o["name"] == "dy_dx")
        return np.asarray(grad["data"], np.float32)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda x: call(float(x[0, 0])), xs))
    expected = bundled_engine.run(Derivative.GRADIENT, xs[:, 0]).dy_dx[:, 0]
    assert_same_answer(np.concatenate(got), expected)
    counted = {name: value for name, value in scrape(frontends_server).items()
               if name.startswith("gradserve_requests_total")
               and 'rpc="rest/infer"' in name and 'code="OK"' in name}  # fmt: skip
    assert len(counted) == 2, counted  # one series per frontend process: both served REST
    assert sum(counted.values()) >= len(xs)


def test_frontends_never_load_tensorflow_and_stay_small(frontends_server):
    engine, frontends = roles(frontends_server)
    assert len(frontends) == 2
    assert not loads_tensorflow(frontends_server.process.pid)  # nor does the supervisor
    for pid in frontends:
        assert rss_mb(pid) < FRONTEND_RSS_LIMIT_MB
    assert rss_mb(engine) > rss_mb(frontends[0])


def call_concurrently(target: str, callers: int, calls: int, **client_args) -> list:
    """`callers` threads, each with its own client (its own connection, so the kernel spreads
    them over the frontends), each making `calls` 1-row calls; outcomes per call."""
    outcomes: list = []
    lock = threading.Lock()

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with GradientClient(target, timeout=30, **client_args) as client:
            for _ in range(calls):
                x = float(rng.uniform(0, 1))
                try:
                    outcome = (x, client.evaluate(x))
                except GradserveError as error:
                    outcome = (x, error)
                with lock:
                    outcomes.append(outcome)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a caller hung"
    return outcomes


def test_engine_merges_the_sub_batches_of_both_frontends(frontends_server, bundled_engine):
    before = scrape(frontends_server)
    outcomes = call_concurrently(frontends_server.target, callers=16, calls=40)
    after = scrape(frontends_server)
    assert not [r for _, r in outcomes if isinstance(r, GradserveError)]
    xs = np.array([[x] for x, _ in outcomes], np.float32)
    reference = bundled_engine.run(Derivative.GRADIENT, xs)
    assert_same_answer([r.dy_dx[0, 0] for _, r in outcomes], reference.dy_dx[:, 0])

    def calls(process: str) -> float:
        key = "gradserve_engine_calls_total"
        return total(after, key, process) - total(before, key, process)

    sub_batches = [calls('process="frontend-0"'), calls('process="frontend-1"')]
    engine_calls = calls('process="engine"')
    assert min(sub_batches) > 0  # both frontends took callers
    # A frontend has one sub-batch in flight at a time: an engine call that serves fewer
    # calls than there were sub-batches has merged sub-batches of different frontends.
    assert engine_calls < sum(sub_batches)
    rows = total(after, "gradserve_rows_computed_total", 'process="engine"') - total(
        before, "gradserve_rows_computed_total", 'process="engine"'
    )
    assert rows == len(outcomes)


def test_the_engine_process_caps_merged_batches_by_max_batch_ms():
    """--max-batch-ms reaches the engine process's batchers: with a budget no call can meet,
    the engine learns each call's cost and caps the batches it merges from both frontends
    at one row (it reports the cap it learned; batched on rows only, it had none)."""
    server = ServerProcess(*FRONTENDS_ARGS, "--max-batch-ms", "0.001", "--drain-seconds", "10")
    try:
        outcomes = call_concurrently(server.target, callers=8, calls=10)
        assert not [r for _, r in outcomes if isinstance(r, GradserveError)]
        samples = scrape(server)
    finally:
        server.stop()
    caps = [
        value
        for key, value in samples.items()
        if key.startswith("gradserve_batch_row_cap")
        and 'process="engine"' in key
        and 'derivative="gradient"' in key
    ]
    assert caps == [1.0], caps
    assert total(samples, "gradserve_rows_computed_total", 'process="engine"') == len(outcomes)


def test_priority_and_deadline_cross_to_the_engine_process(frontends_server, bundled_engine):
    """HIGH requests with and without a deadline, mixed with NORMAL ones, over both frontends
    (each new connection lands on either): every answer is the engine's own, so the
    sub-batches' priority and deadline reach the engine process's queue and are served."""
    x = np.linspace(0.05, 0.95, 24, dtype=np.float32).reshape(24, 1)
    answers = []
    for i, row in enumerate(x):
        with grpc.insecure_channel(frontends_server.target) as channel:
            request = pb.EvaluateRequest(
                x=tensors.to_tensor(row[None]), priority=pb.HIGH if i % 2 else pb.NORMAL
            )
            timeout = 30 if i % 3 else None
            answers.append(pb_grpc.GradientServiceStub(channel).Evaluate(request, timeout=timeout))
    reference = bundled_engine.run(Derivative.GRADIENT, x)
    assert_same_answer(
        np.concatenate([tensors.from_tensor(a.dy_dx) for a in answers]), reference.dy_dx
    )


def wait_for(predicate, timeout: float) -> float:
    """Seconds until `predicate()` held; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - start


def test_killed_frontend_is_replaced_and_sdk_callers_see_no_error(fresh_server, bundled_engine):
    _, frontends = roles(fresh_server)
    results: list = []
    killed: dict[str, float] = {}

    def load() -> None:
        results.extend(call_concurrently(fresh_server.target, callers=8, calls=150))

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(1.0)
    victim = frontends[0]
    os.kill(victim, signal.SIGKILL)
    killed["at"] = time.monotonic()

    def replaced() -> bool:
        _, now = roles(fresh_server)
        return (
            len(now) == 2
            and victim not in now
            and all(f'process="frontend-{i}"' in " ".join(scrape(fresh_server)) for i in (0, 1))
        )

    replaced_after = wait_for(replaced, timeout=30)
    loader.join(timeout=180)
    assert not loader.is_alive()
    print(f"frontend replaced and serving {replaced_after:.2f} s after SIGKILL")
    errors = [r for _, r in results if isinstance(r, GradserveError)]
    assert errors == [], errors[:3]
    assert len(results) == 8 * 150
    xs = np.array([[x] for x, _ in results], np.float32)
    expected = bundled_engine.run(Derivative.GRADIENT, xs).dy_dx[:, 0]
    assert_close([r.dy_dx[0, 0] for _, r in results], expected)  # XLA off there, on here
    assert fresh_server.stop() == 0


def test_killed_engine_fails_calls_fast_reports_not_serving_and_exits_one(fresh_server):
    engine, _ = roles(fresh_server)
    no_retry = RetryPolicy(attempts=1)
    statuses: list[int] = []
    with grpc.insecure_channel(fresh_server.target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        os.kill(engine, signal.SIGKILL)
        started = time.monotonic()
        outcomes = call_concurrently(fresh_server.target, callers=4, calls=5, retry=no_retry)
        with_errors = time.monotonic() - started
        try:
            statuses.append(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)
        except grpc.RpcError as error:  # the frontend may already be gone: its connection
            # refused (UNAVAILABLE) or closed under the check (CANCELLED)
            gone = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
            statuses.append(-1 if error.code() in gone else -2)
    codes = [r.code for _, r in outcomes if isinstance(r, GradserveError)]
    # UNAVAILABLE from the frontends; a call that arrives in the instant a frontend's gRPC
    # server closes is cancelled by the transport instead (the SDK retries both).
    assert set(codes) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
    assert grpc.StatusCode.UNAVAILABLE in codes
    assert len([r for _, r in outcomes if isinstance(r, GradserveError)]) == len(outcomes)
    assert statuses[0] in (health_pb2.HealthCheckResponse.NOT_SERVING, -1)
    assert fresh_server.process.wait(timeout=60) == 1
    names = sorted(c.name for c in codes)
    print(f"{len(codes)} calls after the engine died, all answered within {with_errors:.2f} s: "
          f"{ {n: names.count(n) for n in set(names)} }")  # fmt: skip


def test_serving_on_one_connection_means_every_frontend_serves():
    """A frontend reports SERVING only once the supervisor says that every frontend serves:
    a caller that saw SERVING on one connection is answered on each new connection,
    whichever frontend it reaches, from the first call (stand-in engine: frontends that
    start within milliseconds of each other)."""
    stand_in = Path(__file__).resolve().parents[1] / "bench" / "stand_in.py"
    for _ in range(2):
        server = ServerProcess("--frontends", "2", "--drain-seconds", "10", script=stand_in)
        try:
            channels = [grpc.insecure_channel(server.target) for _ in range(8)]
            request = pb.EvaluateRequest(x=tensors.to_tensor(np.ones((1, 1), np.float32)))
            for channel in channels:
                pb_grpc.GradientServiceStub(channel).Evaluate(request, timeout=30)
                channel.close()
        finally:
            server.stop()


def test_children_end_when_the_supervisor_is_killed(fresh_server):
    kids = children(fresh_server.process.pid)
    assert len(kids) >= 3
    supervisor = fresh_server.process.pid
    call_concurrently(fresh_server.target, callers=4, calls=3)  # sub-batches: segments exist
    assert list(SHM_DIR.glob(f"gradserve-{supervisor}-*"))
    fresh_server.process.kill()
    fresh_server.process.wait(timeout=10)
    wait_for(lambda: not any(Path(f"/proc/{pid}").exists() and maps(pid) for pid in kids), 30)
    assert not list(SHM_DIR.glob(f"gradserve-{supervisor}-*"))  # no shared memory left behind


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (QueueFull("queue full: 9 of 8 rows"), QueueFull),
        (Closed("shutting down"), Closed),
        (RequestTooLarge("rows"), RequestTooLarge),
        (ValueError("kind needs a vector v"), EngineFailed),
    ],
)
def test_errors_cross_from_the_engine_process_as_themselves(raised, expected) -> None:
    """What the engine process answers for a failed sub-batch (a frame on its socket) is
    raised in the frontend as the same error with the same message, so each keeps its
    status; anything else, and the engine failing on rows, is EngineFailed with its cause."""
    answer = messages.decode(messages.encode(SubBatchAnswer.failed(raised)))
    with pytest.raises(expected) as info:
        answer.raise_error()
    assert str(info.value) == str(raised) and type(info.value) is expected
    failed = EngineFailed("the engine failed on this request: bad row")
    failed.__cause__ = ValueError("bad row")
    with pytest.raises(EngineFailed, match=r"^bad row$"):
        messages.decode(messages.encode(SubBatchAnswer.failed(failed))).raise_error()
    SubBatchAnswer(path="p").raise_error()  # outputs: nothing raised


def test_every_message_crosses_as_bytes_and_back_unchanged() -> None:
    """The exchange's frames (no pickle) give back exactly what was sent, each field."""
    ref = ArrayRef(4096, (300, 64, 64, 3), "<f4")
    sent = [
        [EngineModel("quadratic", 1, (1,), (1,), "/CPU:0", "float32"),
         EngineModel("modèle", 7, (64, 64, 3), (), "/GPU:0", "float64"),
         EngineModel("quadratic", 3, (), (), "", "", "UNAVAILABLE", "version 3 failed: no file")],
        SubBatch("quadratic", "vjp", "/dev/shm/gradserve-1-f2.3", ref, ArrayRef(0, (3, 1), "<f8"),
                 Priority.HIGH, 12345.678, 5, 2, bytes(range(50))),
        Control("load", "quadratic", 9), ControlDone(9), Released("modèle", 7),
        ControlDone(10, "version 3 failed", "LoadFailed"),
        SubBatch("m", "gradient", "p", ArrayRef(0, (1,), "<f4"), None),
        SubBatchAnswer("/dev/shm/e1.0", ArrayRef(0, (7, 1), "<f4"), None),
        SubBatchAnswer("/dev/shm/e1.1", ArrayRef(0, (2, 1), "<f4"), None, slot=3, row_cap=96),
        SubBatchAnswer(error="queue full: 9 of 8 rows; retry later", error_kind="QueueFull"),
    ]  # fmt: skip
    for message in sent:
        assert messages.decode(messages.encode(message)) == message


def test_trace_contexts_cross_to_the_engine_process_whole() -> None:
    """A sub-batch's trace contexts come back as the same span contexts; bytes that are not
    whole contexts are refused."""
    provider = TracerProvider()
    spans = [provider.get_tracer("t").start_span(f"request {i}") for i in range(3)]
    contexts = unpack_contexts(pack_contexts(spans))
    assert [(c.trace_id, c.span_id, c.trace_flags) for c in contexts] == [
        (c.trace_id, c.span_id, c.trace_flags) for c in (s.get_span_context() for s in spans)
    ]
    assert all(c.is_remote and c.trace_flags.sampled for c in contexts)
    with pytest.raises(ValueError, match="each takes 25"):
        unpack_contexts(bytes(26))


def test_a_frame_that_is_not_a_message_is_refused_whatever_its_bytes() -> None:
    """Truncated, extended, corrupted or other-version frames raise BadFrame (the engine
    closes the connection that sent one), never another error, and nothing is run."""
    frame = messages.encode(SubBatch("quadratic", "gradient", "p", ArrayRef(0, (2, 1), "<f4"),
                                     None, Priority.NORMAL, None))  # fmt: skip
    bad = [frame[:n] for n in range(len(frame))] + [frame + b"\x00", b"", pickle_like()]
    bad.append(bytes([messages.VERSION + 1]) + frame[1:])
    bad += [frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1 :] for i in range(len(frame))]
    for data in bad:
        try:
            decoded = messages.decode(data)
        except messages.BadFrame:
            continue
        # A flipped byte inside a string or a number may still make a well-formed message;
        # it must then be a message of the format, not anything else.
        assert isinstance(decoded, SubBatch | SubBatchAnswer | list), data


def pickle_like() -> bytes:
    """A pickle stream, as the exchange's frames once were."""
    return b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00\x8c\x02osK\x01."


def test_frames_arrive_whole_however_the_bytes_are_cut() -> None:
    """FrameReader gives back each frame Connection.send_bytes wrote, whole and in order,
    whether the bytes arrive a few at a time or many frames at once; nothing while a frame
    is incomplete; EOFError once the sender closed and every frame was taken; BadFrame for
    a length no message has."""
    frames = [messages.encode(SubBatchAnswer(error="x" * n, slot=n)) for n in (0, 7, 300, 5)]
    wire = b"".join(len(f).to_bytes(4, "big") + f for f in frames)
    for cut in (1, 3, 17, len(wire)):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            reader, got = messages.FrameReader(Connection(ours.detach())), []
            for start in range(0, len(wire), cut):
                theirs.sendall(wire[start : start + cut])
                got += wait_for_frames(reader) if start + cut >= len(wire) else reader.frames()
            assert got == frames
            theirs.close()
            with pytest.raises(EOFError):
                for _ in range(100):
                    reader.frames()
            reader.close()
    ours, theirs = socket.socketpair()
    with ours, theirs:
        reader = messages.FrameReader(Connection(ours.detach()))
        theirs.sendall((messages.MAX_FRAME + 1).to_bytes(4, "big"))
        with pytest.raises(messages.BadFrame):
            wait_for_frames(reader)
        reader.close()


def wait_for_frames(reader: messages.FrameReader) -> list[bytes]:
    """The frames once at least one has arrived (a local socket delivers at once)."""
    for _ in range(1000):
        frames = reader.frames()
        if frames:
            return frames
        time.sleep(0.001)
    raise AssertionError("no frame arrived")


def test_a_large_answer_crosses_whole_while_small_calls_go_on():
    """Jacobians of the bundled digits model, 512 rows per sub-batch (1.3 MB of outputs, past
    remote.COPY_OFF_LOOP: copied out of the engine's segment on a worker thread): each
    equals the engine's own, and a 1-row caller on the same server is answered meanwhile."""
    from gradserve.server.config import BUNDLED_DIR
    from gradserve.server.engine.compiled import TensorFlowEngine

    server = ServerProcess("--frontends", "2", "--model", "digits", "--max-batch-size", "512",
                           "--drain-seconds", "10")  # fmt: skip
    try:
        with GradientClient(server.target) as client:
            shape = client.model_info().input_shape
            rng = np.random.default_rng(3)
            xs = [rng.random((512, *shape), dtype=np.float32) for _ in range(3)]
            small: list = []

            def light() -> None:
                with GradientClient(server.target) as other:
                    small.extend(other.evaluate(xs[0][:1]) for _ in range(5))

            caller = threading.Thread(target=light)
            caller.start()
            answers = [client.evaluate(x, "jacobian") for x in xs]
            caller.join(timeout=60)
        assert len(small) == 5
    finally:
        server.stop()
    engine = TensorFlowEngine(
        BUNDLED_DIR / "digits.keras", xla=False, max_batch_size=512, deterministic=True
    )
    for x, answer in zip(xs, answers, strict=True):
        assert answer.dy_dx.nbytes >= COPY_OFF_LOOP
        assert_same_answer(answer.dy_dx, engine.run(Derivative.JACOBIAN, x).dy_dx)


class _TwoInputs:
    """An engine the engine-side checks look at: 2 inputs, 1 output, float32."""

    name, input_shape, output_shape, device = "m", (2,), (1,), "cpu"
    numpy_dtype = np.dtype(np.float32)


def test_the_engine_process_refuses_rows_it_cannot_take_and_a_slot_used_twice():
    """A frontend that sends rows of another width or a kind without its vector gets that
    sub-batch refused with InvalidInput on its slot, and nothing is queued; one that sends a
    second sub-batch on a slot in flight is disconnected (BadFrame ends its session: its
    slots can no longer be trusted)."""
    from gradserve.server.core.scheduler import Scheduler
    from gradserve.server.multiproc.engine_process import _Session
    from gradserve.server.multiproc.shm import Segment

    ours, theirs = socket.socketpair()
    frontend = Connection(theirs.detach())
    session = _Session(Connection(ours.detach()), 1, 2)
    scheduler = Scheduler(max_batch_size=8)
    models = {("m", 1): (scheduler, _TwoInputs())}
    segment = Segment(f"gradserve-test-{os.getpid()}")
    try:
        path, (wide, _) = segment.write([np.zeros((3, 5), np.float32), None])
        session.submit(SubBatch("m", "gradient", path, wide, None, slot=0), models)
        path, (rows, _) = segment.write([np.zeros((3, 2), np.float32), None])
        session.submit(SubBatch("m", "vjp", path, rows, None, slot=1), models)
        for slot in (0, 1):
            answer = messages.decode(frontend.recv_bytes())
            assert (answer.slot, answer.error_kind) == (slot, "InvalidInput"), answer
        assert scheduler.pending == 0
        session.submit(SubBatch("m", "gradient", path, rows, None, slot=0), models)
        assert scheduler.pending == 1
        with pytest.raises(messages.BadFrame):
            session.submit(SubBatch("m", "gradient", path, rows, None, slot=0), models)
        with pytest.raises(messages.BadFrame):
            session.submit(SubBatch("m", "gradient", path, rows, None, slot=2), models)
    finally:
        session.close()
        frontend.close()
        segment.close()
    assert scheduler.pending == 0  # closing the session withdrew what it had queued


def test_frontends_that_keep_dying_are_replaced_ever_later_then_stop_the_server(fresh_server):
    """A frontend that dies after it served is replaced (at once, then after 0.5, 1, 2 s);
    the RESTART_LIMIT-th death within the window stops the server with exit 1, once."""
    deaths = 0
    while fresh_server.process.poll() is None and deaths < RESTART_LIMIT:
        wait_for(lambda: fresh_server.process.poll() is not None
                 or len(roles(fresh_server)[1]) == 2, timeout=60)  # fmt: skip
        if fresh_server.process.poll() is not None:
            break
        os.kill(roles(fresh_server)[1][0], signal.SIGKILL)
        deaths += 1
    assert fresh_server.process.wait(timeout=60) == 1
    errors = fresh_server.process.stderr.read()
    assert deaths == RESTART_LIMIT
    assert errors.count("replacing it in") == RESTART_LIMIT - 1
    for delay in (0.0, *(restart_delay(n) for n in range(1, RESTART_LIMIT - 1))):
        assert f"replacing it in {delay:.1f} s" in errors
    assert errors.count("stopping the server; exit 1") == 1
