"""The standard inference protocol, called with the real `tritonclient[grpc]` package."""

from __future__ import annotations

import queue
from dataclasses import replace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import TEST_CONFIG, GatedEngine, RunningServer, assert_same_answer
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from gradserve.client import GradientClient
from gradserve.server.protocols.kserve import MAX_TYPED_VALUES
from gradserve.wire.kinds import Derivative

MODEL = "quadratic"


@pytest.fixture
def client(server):
    with triton.InferenceServerClient(server.target) as c:
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def x_input(x: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    tensor = triton.InferInput("x", list(x.shape), datatype)
    tensor.set_data_from_numpy(x)
    return tensor


def test_live_ready_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")
    server = client.get_server_metadata()
    assert server.name == "gradserve" and "model_configuration" in server.extensions
    meta = client.get_model_metadata(MODEL, as_json=True)
    assert meta["name"] == MODEL and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("x", "FP32", ["-1", "1"])
    ]
    assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [
        ("y", ["-1", "1"]),
        ("dy_dx", ["-1", "1"]),
    ]
    config = client.get_model_config(MODEL, as_json=True)["config"]
    assert config["name"] == MODEL and int(config["max_batch_size"]) == TEST_CONFIG.max_queue_rows
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("x", "TYPE_FP32", ["1"])
    ]
    assert [o["name"] for o in config["output"]] == ["y", "dy_dx"]


def test_infer_raw_gradient_and_jacobian_equal_the_native_api(server, client):
    x = np.array([[0.2], [0.6], [0.9]], np.float32)
    gradient = client.infer(MODEL, [x_input(x)], request_id="r1")
    jacobian = client.infer(MODEL, [x_input(x)], parameters={"derivative": "jacobian"})
    with GradientClient(server.target, timeout=10) as native:
        expected_grad = native.evaluate(x)
        expected_jac = native.evaluate(x, "jacobian")
    assert gradient.get_response().id == "r1"
    assert_same_answer(gradient.as_numpy("y"), expected_grad.y)
    assert_same_answer(gradient.as_numpy("dy_dx"), expected_grad.dy_dx)
    assert jacobian.as_numpy("dy_dx").shape == (3, 1, 1)
    assert_same_answer(jacobian.as_numpy("dy_dx"), expected_jac.dy_dx)
    np.testing.assert_allclose(gradient.as_numpy("dy_dx")[:, 0], 8 * (x[:, 0] - 0.5), atol=0.3)
    params = {k: v.int64_param for k, v in gradient.get_response().parameters.items()}
    assert params["batch_rows"] >= 3 and params["compute_us"] > 0
    hops = ("decode_us", "queue_us", "handoff_us", "compute_us", "encode_us")
    assert abs(sum(params[h] for h in hops) - params["total_us"]) <= 6  # each rounded to 1 us


def test_infer_fp64_input_is_converted(client):
    x = np.array([[0.2], [0.6]])
    as64 = client.infer(MODEL, [x_input(x, "FP64")])
    as32 = client.infer(MODEL, [x_input(x.astype(np.float32))])
    assert_same_answer(as64.as_numpy("dy_dx"), as32.as_numpy("dy_dx"))


def test_typed_contents_are_answered_in_typed_contents(stub, server):
    request = service_pb2.ModelInferRequest(model_name=MODEL, id="typed")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[2, 1])
    tensor.contents.fp32_contents.extend([0.2, 0.6])
    response = stub.ModelInfer(request, timeout=10)
    assert not response.raw_output_contents
    assert [o.name for o in response.outputs] == ["y", "dy_dx"]
    grad = np.array(response.outputs[1].contents.fp32_contents)
    with GradientClient(server.target, timeout=10) as native:
        expected = native.evaluate([0.2, 0.6]).dy_dx[:, 0]
    assert_same_answer(grad.astype(np.float32), expected)
    assert list(response.outputs[1].shape) == [2, 1]


def test_typed_contents_are_bounded_and_large_answers_travel_raw(mimo_server):
    """Typed values cost a Python object each: a request of more than MAX_TYPED_VALUES is
    refused with the advice to send raw contents, and an answer that large is sent raw."""
    big = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(mimo_server.target, options=big) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        def typed(rows: int, derivative: str) -> service_pb2.ModelInferRequest:
            request = service_pb2.ModelInferRequest(model_name="mimo")
            request.parameters["derivative"].string_param = derivative
            tensor = request.inputs.add(name="x", datatype="FP32", shape=[rows, 3])
            tensor.contents.fp32_contents.extend(np.full(rows * 3, 0.5, np.float32).tolist())
            return request

        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(typed(MAX_TYPED_VALUES // 3 + 1, "gradient"), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "send larger tensors in raw_input_contents" in info.value.details()
        rows = MAX_TYPED_VALUES // 3  # the Jacobian is [rows, 2, 3]: twice the values
        response = stub.ModelInfer(typed(rows, "jacobian"), timeout=60)
    assert [o.name for o in response.outputs] == ["y", "dy_dx"]
    assert not any(o.contents.fp32_contents for o in response.outputs)
    jacobian = np.frombuffer(response.raw_output_contents[1], "<f4").reshape(rows, 2, 3)
    assert_same_answer(jacobian[:1], response_of_one(mimo_server.target))


def response_of_one(target: str) -> np.ndarray:
    with GradientClient(target, timeout=10) as native:
        return native.evaluate(np.full((1, 3), 0.5), "jacobian").dy_dx


def test_only_y_requested_computes_no_derivative(bundled_engine):
    gated = GatedEngine(bundled_engine)
    with (
        RunningServer(replace(TEST_CONFIG, max_queue_rows=1000), gated) as running,
        triton.InferenceServerClient(running.target) as client,
    ):
        x = np.array([[0.3]], np.float32)
        result = client.infer(MODEL, [x_input(x)], outputs=[triton.InferRequestedOutput("y")])
        assert result.as_numpy("dy_dx") is None
        assert [o.name for o in result.get_response().outputs] == ["y"]
        both = client.infer(MODEL, [x_input(x)])
    assert [kind for kind, _ in gated.calls] == [Derivative.NONE, Derivative.GRADIENT]
    assert_same_answer(result.as_numpy("y"), both.as_numpy("y"))


def expect_error(call, status: str, *fragments: str) -> None:
    with pytest.raises(InferenceServerException) as info:
        call()
    assert info.value.status() == f"StatusCode.{status}", info.value.message()
    for fragment in fragments:
        assert fragment in info.value.message()


def test_errors_name_the_tensor_and_what_was_expected(client, stub):
    x = np.array([[0.5]], np.float32)
    expect_error(lambda: client.infer("nope", [x_input(x)]), "NOT_FOUND", "'nope'", MODEL)
    expect_error(
        lambda: client.infer(MODEL, [x_input(x)], model_version="2"), "NOT_FOUND", "version '2'"
    )
    expect_error(lambda: client.get_model_metadata("nope"), "NOT_FOUND", "'nope'")
    expect_error(lambda: client.get_model_config("nope"), "NOT_FOUND", "'nope'")
    expect_error(
        lambda: client.infer(MODEL, [x_input(np.array([[1]], np.int32), "INT32")]),
        "INVALID_ARGUMENT",
        "input 'x' has datatype 'INT32'; expected FP32 or FP64",
    )
    expect_error(
        lambda: client.infer(MODEL, [x_input(np.zeros((2, 3), np.float32))]),
        "INVALID_ARGUMENT",
        "x has shape [2, 3]: the model expects 1 value(s) per row",
    )
    expect_error(
        lambda: client.infer(MODEL, [x_input(np.zeros(4, np.float32))]),
        "INVALID_ARGUMENT",
        "x must have shape [n, 1] (2 dims)",
    )
    wrong = triton.InferInput("w", [1, 1], "FP32")
    wrong.set_data_from_numpy(x)
    expect_error(
        lambda: client.infer(MODEL, [wrong]),
        "INVALID_ARGUMENT",
        "expected input tensor(s) ['x'], got ['w']",
    )
    expect_error(
        lambda: client.infer(MODEL, [x_input(x)], outputs=[triton.InferRequestedOutput("z")]),
        "INVALID_ARGUMENT",
        "unknown output 'z'",
    )
    expect_error(
        lambda: client.infer(MODEL, [x_input(x)], parameters={"derivative": "laplacian"}),
        "INVALID_ARGUMENT",
        "\"derivative\" is 'laplacian'",
    )
    short = service_pb2.ModelInferRequest(model_name=MODEL)
    short.inputs.add(name="x", datatype="FP32", shape=[3, 1])
    short.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(short, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "x has 8 bytes, but shape [3, 1] of float32 needs 12 bytes" in info.value.details()
    typed = service_pb2.ModelInferRequest(model_name=MODEL)
    typed.inputs.add(name="x", datatype="FP32", shape=[3, 1]).contents.fp32_contents.extend([1.0])
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(typed, timeout=10)
    assert "1 values in contents.fp32_contents, but shape [3, 1] needs 3" in info.value.details()
    assert client.infer(MODEL, [x_input(x)]).as_numpy("y").shape == (1, 1)


def test_stream_of_1000_with_a_bad_one_answers_all_in_order(client, bundled_engine):
    received: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: received.put((result, error)))
    rng = np.random.default_rng(8)
    xs = rng.uniform(0, 1, size=(1000, 1, 1)).astype(np.float32)
    try:
        for i, x in enumerate(xs):
            tensor = x_input(np.zeros((1, 2), np.float32) if i == 500 else x)
            client.async_stream_infer(MODEL, [tensor], request_id=str(i))
        answers = [received.get(timeout=30) for _ in xs]
    finally:
        client.stop_stream()
    expected = bundled_engine.run(Derivative.GRADIENT, xs[:, 0, :]).dy_dx
    for i, (result, error) in enumerate(answers):
        if i == 500:
            assert result is None and "INVALID_ARGUMENT" in error.message()
            assert "expects 1 value(s) per row" in error.message()
            continue
        assert error is None, error
        assert result.get_response().id == str(i)
        assert_same_answer(result.as_numpy("dy_dx")[0], expected[i])
