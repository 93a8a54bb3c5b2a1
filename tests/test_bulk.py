"""Large tensor bytes past protobuf (server/bulk.py): what is cut out of a request and what
is spliced into an answer must mean exactly what protobuf itself reads and writes."""

from __future__ import annotations

import numpy as np
import pytest

from gradserve.server.protocols.native import LIFTED
from gradserve.server.transport import bulk
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import tensors

ROWS = 5000  # 20 KB per column of float32: x of 4 columns is past bulk.LARGE


def request(rows: int = ROWS, **extra) -> pb.EvaluateRequest:
    rng = np.random.default_rng(rows)
    x = rng.uniform(size=(rows, 4)).astype(np.float32)
    v = rng.uniform(size=(rows, 4)).astype(np.float32)
    return pb.EvaluateRequest(
        id="r1", model="m", derivative=pb.VJP, x=tensors.to_tensor(x), v=tensors.to_tensor(v),
        priority=pb.HIGH, target=3, **extra,
    )  # fmt: skip


def test_lifted_payloads_and_the_parsed_rest_equal_protobufs_own_parse() -> None:
    whole = request()
    data = whole.SerializeToString()
    rest, payloads = bulk.lift(data, LIFTED)
    assert set(payloads) == {"x", "v"} and len(rest) < 200
    parsed = pb.EvaluateRequest.FromString(rest)
    assert bytes(payloads["x"]) == whole.x.data and bytes(payloads["v"]) == whole.v.data
    parsed.x.data, parsed.v.data = whole.x.data, whole.v.data
    assert parsed == whole


def test_small_payloads_and_unusual_messages_are_left_whole_to_protobuf() -> None:
    small = request(rows=10).SerializeToString()
    assert bulk.lift(small, LIFTED) == (small, {})
    big = request().SerializeToString()
    x_again = pb.EvaluateRequest(x=tensors.to_tensor(np.zeros((5000, 4), np.float32)))
    repeated = big + x_again.SerializeToString()  # x twice: protobuf merges them, so x stays
    rest, payloads = bulk.lift(repeated, LIFTED)
    assert set(payloads) == {"v"}
    parsed = pb.EvaluateRequest.FromString(rest)
    assert parsed.x == pb.EvaluateRequest.FromString(repeated).x
    for broken in (big[:-1], big + b"\x0b", b"\xff" * 12, b""):  # truncated, group, garbage
        rest, payloads = bulk.lift(broken, LIFTED)
        assert (rest, payloads) == (broken, {})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_spliced_answer_parses_to_the_message_protobuf_would_have_written(dtype) -> None:
    dy_dx = np.random.default_rng(1).normal(size=(3000, 2, 4)).astype(dtype)
    y = np.arange(6, dtype=dtype).reshape(3, 2)
    spliced = bulk.Spliced(pb.EvaluateResponse(id="a", y=tensors.to_tensor(y)))
    head = pb.Tensor(shape=dy_dx.shape, dtype=tensors.float_type(dtype).wire).SerializeToString()
    number = pb.EvaluateResponse.DY_DX_FIELD_NUMBER
    spliced.tensors.append((number, head, pb.Tensor.DATA_FIELD_NUMBER, dy_dx))
    spliced.message.timing.total_us = 7
    expected = pb.EvaluateResponse(id="a", y=tensors.to_tensor(y), dy_dx=tensors.to_tensor(dy_dx))
    expected.timing.total_us = 7
    parsed = pb.EvaluateResponse.FromString(bulk.serializer(None)(spliced))
    assert parsed == expected
    np.testing.assert_array_equal(tensors.from_tensor(parsed.dy_dx), dy_dx)


def test_varint_round_trips_through_protobuf() -> None:
    for value in (0, 1, 127, 128, 300, 2**31, 2**63 - 1):
        message = pb.Tensor(shape=[value])
        assert message.SerializeToString() == b"\x0a" + bulk.varint(len(bulk.varint(value))) + (
            bulk.varint(value)
        )
