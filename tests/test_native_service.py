"""The native servicer over a real server and batcher: status codes, limits, cancellation."""

from __future__ import annotations

import threading
from dataclasses import replace

import grpc
import numpy as np
import pytest
from conftest import TEST_CONFIG, GatedEngine, RunningServer, assert_same_answer, wait_until

from gradserve.client import GradientClient, GradserveError
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire import tensors


def raw_x(rows: np.ndarray, dtype: int = pb.FLOAT32) -> pb.Tensor:
    np_type = "<f8" if dtype == pb.FLOAT64 else "<f4"
    return pb.Tensor(shape=rows.shape, dtype=dtype, data=rows.astype(np_type).tobytes())


def tensor(shape, data: bytes, dtype: int = pb.FLOAT32) -> pb.Tensor:
    return pb.Tensor(shape=shape, dtype=dtype, data=data)


BAD_REQUESTS = {
    "wrong width": (
        pb.EvaluateRequest(x=raw_x(np.zeros((2, 3)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expects 1 value(s) per row, got 3",
    ),
    "one dim": (
        pb.EvaluateRequest(x=tensor([2], b"\0" * 8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must have shape [n, 1] (2 dims)",
    ),
    "three dims": (
        pb.EvaluateRequest(x=tensor([1, 1, 1], b"\0" * 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "(2 dims); got shape [1, 1, 1]",
    ),
    "no rows": (
        pb.EvaluateRequest(x=tensor([0, 1], b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs at least one row",
    ),
    "negative dim": (
        pb.EvaluateRequest(x=tensor([-4, 1], b"")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs at least one row",
    ),
    "missing x": (pb.EvaluateRequest(id="a"), grpc.StatusCode.INVALID_ARGUMENT, "x is missing"),
    "bytes short": (
        pb.EvaluateRequest(x=tensor([3, 1], b"\0" * 8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "has 8 bytes, but shape [3, 1] of float32 needs 12 bytes",
    ),
    "bytes of float64 sent as float32": (
        pb.EvaluateRequest(x=tensor([2, 1], np.zeros(2).tobytes())),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs 8 bytes",
    ),
    "huge shape": (
        pb.EvaluateRequest(x=tensor([2**62, 1], b"\0" * 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "bytes",
    ),
    "unknown dtype": (
        pb.EvaluateRequest(x=tensor([1, 1], b"\0" * 4, dtype=7)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected FLOAT32 (0) or FLOAT64 (1)",
    ),
    "unknown derivative": (
        pb.EvaluateRequest(x=raw_x(np.zeros((1, 1))), derivative=9),
        grpc.StatusCode.INVALID_ARGUMENT,
        "derivative 9 is unknown",
    ),
    "nan": (
        pb.EvaluateRequest(x=raw_x(np.array([[0.1], [np.nan]]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "1 non-finite value(s)",
    ),
    "inf": (
        pb.EvaluateRequest(x=raw_x(np.array([[np.inf], [-np.inf]]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "2 non-finite value(s)",
    ),
    "float64 beyond float32 range": (
        pb.EvaluateRequest(x=raw_x(np.array([[1e300]]), dtype=pb.FLOAT64)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "beyond the model's float range",
    ),
    "unknown model": (
        pb.EvaluateRequest(x=raw_x(np.zeros((1, 1))), model="resnet50"),
        grpc.StatusCode.NOT_FOUND,
        "model 'resnet50' is not served here; this server serves 'quadratic'",
    ),
    "more rows than any request may carry": (
        pb.EvaluateRequest(x=raw_x(np.zeros((TEST_CONFIG.max_queue_rows + 1, 1)))),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"at most {TEST_CONFIG.max_queue_rows} rows",
    ),
}


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.GradientServiceStub(channel)


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_input_gets_a_clear_status_and_the_server_goes_on(stub, case):
    request, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Evaluate(request, timeout=10)
    assert info.value.code() == code
    assert message in info.value.details()
    good = stub.Evaluate(pb.EvaluateRequest(x=raw_x(np.array([[0.6]]))), timeout=10)
    assert good.y.shape == [1, 1]


def test_stream_answers_every_bad_message_in_place(stub):
    requests = []
    for i, case in enumerate(sorted(BAD_REQUESTS)):
        good = pb.EvaluateRequest(id=f"good{i}", x=raw_x(np.array([[i / 20]])))
        bad = pb.EvaluateRequest()
        bad.CopyFrom(BAD_REQUESTS[case][0])
        bad.id = case
        requests += [good, bad]
    responses = list(stub.EvaluateStream(iter(requests), timeout=30))
    assert [r.id for r in responses] == [r.id for r in requests]
    for request, response in zip(requests, responses, strict=True):
        if request.id.startswith("good"):
            assert not response.HasField("error") and response.dy_dx.shape == [1, 1]
        else:
            code, message = BAD_REQUESTS[request.id][1:]
            assert response.error.code == code.value[0]
            assert message in response.error.message


def test_float64_input_is_accepted_and_converted(stub):
    x = np.array([[0.2], [0.6]])
    as64 = stub.Evaluate(pb.EvaluateRequest(x=raw_x(x, pb.FLOAT64)), timeout=10)
    as32 = stub.Evaluate(pb.EvaluateRequest(x=raw_x(x)), timeout=10)
    assert as64.y.dtype == pb.FLOAT32 and as64.y.data == as32.y.data


def test_model_info_and_unknown_model(stub):
    info = stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10)
    assert (info.name, info.input_width, info.output_width) == ("quadratic", 1, 1)
    assert info.max_batch_size == TEST_CONFIG.max_batch_size
    with pytest.raises(grpc.RpcError) as error:
        stub.GetModelInfo(pb.ModelInfoRequest(model="nope"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_oversized_message_is_refused_by_the_transport(bundled_engine):
    config = replace(TEST_CONFIG, max_message_mb=1)
    with RunningServer(config, bundled_engine) as running, GradientClient(running.target) as client:
        with pytest.raises(GradserveError) as info:
            client.evaluate(np.zeros(300_000))  # 1.2 MB of float32
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in info.value.message
        assert client.evaluate(0.5).y.shape == (1, 1)


def test_queue_full_is_refused_at_once_and_loses_nothing(gated_server):
    running, gated = gated_server
    gated.gate.clear()
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        busy = stub.Evaluate.future(pb.EvaluateRequest(x=raw_x(np.full((1, 1), 0.1))), timeout=30)
        wait_until(lambda: gated.entered == 1)
        queued = [
            stub.Evaluate.future(pb.EvaluateRequest(id=str(i), x=raw_x(np.full((16, 1), i / 10))))
            for i in range(4)
        ]
        wait_until(lambda: running.batcher.queued_rows == 64)
        with pytest.raises(grpc.RpcError) as info:
            stub.Evaluate(pb.EvaluateRequest(x=raw_x(np.zeros((1, 1)))), timeout=30)
        # Answered while the engine is held and the queue still full: it did not wait.
        assert running.batcher.queued_rows == 64 and not gated.gate.is_set()
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full: 64 of 64 rows are waiting" in info.value.details()
        gated.gate.set()
        assert busy.result(timeout=30).y.shape == [1, 1]
        for future in queued:
            assert future.result(timeout=30).y.shape == [16, 1]
    assert running.batcher.queued_rows == 0


def test_cancelled_and_expired_requests_are_never_computed(gated_server):
    running, gated = gated_server
    gated.gate.clear()
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        first = stub.Evaluate.future(pb.EvaluateRequest(x=raw_x(np.full((1, 1), 0.5))), timeout=30)
        wait_until(lambda: gated.entered == 1)
        doomed = stub.Evaluate.future(pb.EvaluateRequest(x=raw_x(np.full((20, 1), 0.25))))
        kept = stub.Evaluate.future(pb.EvaluateRequest(x=raw_x(np.full((3, 1), 0.9))), timeout=30)
        wait_until(lambda: running.batcher.queued_rows == 23)
        expiring = stub.Evaluate.future(
            pb.EvaluateRequest(x=raw_x(np.full((10, 1), 0.75))), timeout=0.5
        )
        doomed.cancel()
        with pytest.raises(grpc.RpcError) as info:
            expiring.result(timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: running.batcher.queued_rows == 3)
        gated.gate.set()
        assert first.result(timeout=30).y.shape == [1, 1]
        assert kept.result(timeout=30).y.shape == [3, 1]
    computed = np.concatenate([x for _, x in gated.calls])[:, 0]
    assert sorted(set(np.round(computed, 2))) == [0.5, 0.9]
    assert gated.rows_computed == 4
    assert running.batcher.queued_rows == 0


def test_cancelled_stream_frees_its_queued_rows(gated_server):
    running, gated = gated_server
    gated.gate.clear()
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        requests = [pb.EvaluateRequest(id=str(i), x=raw_x(np.full((4, 1), 0.3))) for i in range(8)]
        call = stub.EvaluateStream(iter(requests), timeout=30)
        wait_until(lambda: running.batcher.queued_rows + sum(len(x) for _, x in gated.calls) >= 28)
        call.cancel()
        wait_until(lambda: running.batcher.queued_rows == 0)
        gated.gate.set()
        with GradientClient(running.target, timeout=10) as client:
            assert client.evaluate(0.6).y.shape == (1, 1)
    # Only the batch already in the engine when the stream was cancelled ran, plus the probe.
    first_batch = len(gated.calls[0][1])
    assert first_batch < 32 and gated.rows_computed == first_batch + 1


def test_a_message_that_cannot_fit_is_refused_before_it_is_read(bundled_engine):
    """Admission happens before gRPC reads a unary message: a caller whose last message
    would not fit the memory budget now is refused at once (RESOURCE_EXHAUSTED), even if
    what it sends this time is a few garbage bytes that, once read, would be INVALID_ARGUMENT;
    a caller of small messages is still admitted; every byte is given back afterwards."""
    gated = GatedEngine(bundled_engine)
    config = replace(TEST_CONFIG, max_queue_mb=4, max_batch_size=1 << 17)
    # 480 KB message: ~2.9 MB held while queued (message and answer reserved by the call,
    # rows and results by the batcher); another like it does not fit in 4 MiB.
    big = np.full((120_000, 1), 0.25)

    def client(name: str):
        return ("x-gradserve-client", name)

    with RunningServer(config, gated) as running, grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GradientServiceStub(channel)
        raw = channel.unary_unary("/gradserve.v1.GradientService/Evaluate")
        for name, rows in (("bulk", big), ("light", np.full((1, 1), 0.5))):  # sizes learned
            stub.Evaluate(pb.EvaluateRequest(x=raw_x(rows)), metadata=[client(name)], timeout=30)
        gated.gate.clear()
        held = stub.Evaluate.future(
            pb.EvaluateRequest(x=raw_x(big)), metadata=[client("bulk")], timeout=30
        )
        wait_until(lambda: gated.entered == 3)
        with pytest.raises(grpc.RpcError) as refused:
            raw(b"\xff" * 10, metadata=[client("bulk")], timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value
        assert "queue full" in refused.value.details() and "MiB" in refused.value.details()
        with pytest.raises(grpc.RpcError) as garbage:  # same bytes, a caller that fits: read
            raw(b"\xff" * 10, metadata=[client("light")], timeout=30)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        small = pb.EvaluateRequest(x=raw_x(np.full((1, 1), 0.5)))
        light = stub.Evaluate.future(small, metadata=[client("light")])
        newcomer = stub.Evaluate.future(small, metadata=[client("new")])  # unknown: read first
        gated.gate.set()
        assert held.result(timeout=30).dy_dx.shape == [120_000, 1]
        assert light.result(timeout=30).y.shape == [1, 1]
        assert newcomer.result(timeout=30).y.shape == [1, 1]
        wait_until(lambda: running.server.memory.held == 0)


def test_large_tensors_read_in_place_and_spliced_answer_exactly_as_small_ones(stub):
    """x and v past 64 KiB bypass protobuf both ways (transport/bulk.py); unary and stream
    answers equal those of the same rows sent in small requests (split into other batches)."""
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(40_000, 1)).astype(np.float32)  # 160 KB
    v = rng.normal(size=(40_000, 1)).astype(np.float32)
    big = pb.EvaluateRequest(id="big", derivative=pb.VJP, x=raw_x(x), v=raw_x(v))
    small = [
        stub.Evaluate(pb.EvaluateRequest(derivative=pb.VJP, x=raw_x(xs), v=raw_x(vs)), timeout=30)
        for xs, vs in zip(np.array_split(x, 40), np.array_split(v, 40), strict=True)
    ]
    expected_y = np.concatenate([tensors.from_tensor(r.y) for r in small])
    expected = np.concatenate([tensors.from_tensor(r.dy_dx) for r in small])
    streamed = list(stub.EvaluateStream(iter([big, big]), timeout=60))
    for answer in [stub.Evaluate(big, timeout=30), *streamed]:
        assert answer.id == "big" and not answer.HasField("error")
        assert_same_answer(tensors.from_tensor(answer.y), expected_y)
        assert_same_answer(tensors.from_tensor(answer.dy_dx), expected)
    assert np.abs(expected).max() > 0  # a real derivative, not zeros


def test_calls_that_never_send_their_message_do_not_hold_up_new_callers(server):
    """Admission happens before the message is read, so an open call still waiting for its
    message must not keep other (new) callers from being read and answered."""
    stop = threading.Event()

    def never_sends():
        stop.wait(timeout=30)
        return
        yield  # pragma: no cover - a generator that ends without sending anything

    with grpc.insecure_channel(server.target) as idle_channel:
        method = "/gradserve.v1.GradientService/Evaluate"
        silent = idle_channel.stream_unary(method)
        pending = [silent.future(never_sends(), timeout=30) for _ in range(4)]
        try:
            for i in range(3):  # each a new connection, so a caller not seen yet
                with GradientClient(server.target, timeout=10) as client:
                    assert client.evaluate(0.1 * (i + 1)).y.shape == (1, 1)
        finally:
            stop.set()
        for call in pending:
            with pytest.raises(grpc.RpcError) as info:
                call.result(timeout=30)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "no request message" in info.value.details()
