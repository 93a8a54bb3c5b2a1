"""Large messages (transport/bulk.py): what the survey refuses protobuf refuses too, what is
cut out of a request and what is spliced into an answer mean exactly what protobuf itself
reads and writes, and a message of any shape costs a bounded survey."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from gradserve.inference import grpc_service_pb2 as oip
from gradserve.server.protocols.native import LIFTED
from gradserve.server.transport import bulk
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import tensors

ROWS = 5000  # 20 KB per column of float32: x of 4 columns is past bulk.LARGE
DESCRIPTOR = pb.EvaluateRequest.DESCRIPTOR


def survey(data: bytes):
    return bulk.survey(data, DESCRIPTOR, LIFTED)


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
    rest, payloads = survey(data)
    assert set(payloads) == {"x", "v"} and len(rest) < 200
    parsed = pb.EvaluateRequest.FromString(rest)
    assert bytes(payloads["x"]) == whole.x.data and bytes(payloads["v"]) == whole.v.data
    parsed.x.data, parsed.v.data = whole.x.data, whole.v.data
    assert parsed == whole


def test_small_payloads_and_unusual_messages_are_left_whole_to_protobuf() -> None:
    big = request().SerializeToString()
    x_again = pb.EvaluateRequest(x=tensors.to_tensor(np.zeros((5000, 4), np.float32)))
    repeated = big + x_again.SerializeToString()  # x twice: protobuf merges them, so x stays
    rest, payloads = survey(repeated)
    assert set(payloads) == {"v"}
    parsed = pb.EvaluateRequest.FromString(rest)
    assert parsed.x == pb.EvaluateRequest.FromString(repeated).x
    # truncated, an unclosed group, an end of group with none open, a bad wire type
    for broken in (big[:-1], big + b"\x0b", big + b"\x0c", big + b"\x0f\x00"):
        with pytest.raises(bulk.Refused):
            survey(broken)
        with pytest.raises(DecodeError):
            pb.EvaluateRequest.FromString(broken)


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


# ------------------------------------------------------------------- differential fuzzing


def _ours(message_class, data: bytes, lifted):
    """What the server reads from a received message (survey, cut, parse the rest, put the
    payloads back), or None when it refuses it."""
    try:
        rest, payloads = bulk.survey(data, message_class.DESCRIPTOR, lifted)
        message = message_class.FromString(rest)
    except (bulk.Refused, DecodeError):
        return None
    for name, payload in payloads.items():
        getattr(message, name).data = bytes(payload)
    return message


def _theirs(message_class, data: bytes):
    try:
        return message_class.FromString(data)
    except DecodeError:
        return None


def _tensor_field(draw, number: int, array: np.ndarray) -> bytes:
    """A tensor as field `number` of a request, its own fields in a drawn layout: in any
    order, the shape packed or not, the data once or twice (protobuf keeps the last)."""
    data = b"\x1a" + bulk.varint(array.nbytes) + array.tobytes()
    dims = [bulk.varint(d) for d in array.shape]
    packed = b"".join(dims)
    shape = draw(st.sampled_from([b"\x0a" + bulk.varint(len(packed)) + packed,
                                  b"".join(b"\x08" + d for d in dims)]))  # fmt: skip
    parts = [shape, data, b"\x10\x00"]
    if draw(st.booleans()):
        parts.append(draw(st.sampled_from([data, b"\x1a\x02ab", b"\x1a\x00"])))
    body = b"".join(draw(st.permutations(parts)))
    return bytes([number << 3 | bulk.LENGTH]) + bulk.varint(len(body)) + body


def _native(draw) -> bytes:
    rows = draw(st.integers(4100, 9000))  # x of 4 float32 columns: 64 to 144 KiB
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rest = pb.EvaluateRequest(
        id=draw(st.text(max_size=8)), model=draw(st.text(max_size=8)),
        derivative=draw(st.integers(0, 12)), priority=draw(st.integers(0, 3)),
    )  # fmt: skip
    if draw(st.booleans()):
        rest.target = draw(st.integers(-5, 5))
    if draw(st.booleans()):
        rest.explain.steps = draw(st.integers(0, 100))
        rest.explain.baseline.CopyFrom(tensors.to_tensor(np.zeros((1, 4), np.float32)))
    fields = [rest.SerializeToString()]
    fields.append(_tensor_field(draw, 2, rng.uniform(size=(rows, 4)).astype(np.float32)))
    if draw(st.booleans()):
        fields.append(_tensor_field(draw, 5, rng.normal(size=(rows, 4)).astype(np.float32)))
    return b"".join(draw(st.permutations(fields)))


def _standard(draw) -> bytes:
    rows = draw(st.integers(16400, 40000))
    request = oip.ModelInferRequest(model_name=draw(st.text(max_size=8)), id="s")
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 1])
    request.raw_input_contents.append(np.zeros(rows, "<f4").tobytes())
    request.parameters["derivative"].string_param = "jacobian"
    return request.SerializeToString()


# Fields a mutation may append: x or v again, unknown fields of every wire type, groups,
# an end of group, a length past the end, a field number 0, a bad wire type.
_EXTRA = [
    pb.EvaluateRequest(x=pb.Tensor(shape=[1, 4], data=b"\0" * 16)).SerializeToString(),
    pb.EvaluateRequest(v=pb.Tensor(data=b"\0" * 70_000)).SerializeToString(),
    b"\x78\x00", b"\x79" + b"\0" * 8, b"\x7d" + b"\0" * 4, b"\x7a\x03abc",
    b"\x7b\x78\x00\x7c", b"\x7b\x7b\x7c", b"\x7c", b"\x7a\xff\xff\x7f", b"\x00\x00", b"\x7e",
    b"\x12\x05\x1a\x03\x00\x00\x00",
]  # fmt: skip


def _mutated(draw, data: bytes) -> bytes:
    for _ in range(draw(st.integers(0, 3))):
        size = len(data)
        at = draw(st.one_of(st.integers(0, 64), st.integers(0, max(size, 1)),
                            st.integers(max(size - 64, 0), max(size, 1))))  # fmt: skip
        at = min(at, size)
        op = draw(st.sampled_from(["flip", "cut", "insert", "append", "repeat"]))
        if op == "flip" and size:
            at = min(at, size - 1)
            data = data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
        elif op == "cut":
            data = data[:at]
        elif op == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=12)) + data[at:]
        elif op == "append":
            data += draw(st.sampled_from(_EXTRA))
        else:
            data += data[at : at + draw(st.integers(1, 40))]
    return data


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_survey_cut_and_parse_read_what_protobuf_reads(data) -> None:
    """Valid and mutated large requests of both protocols: the survey with its cuts and the
    parse of the rest give exactly what protobuf gives on the whole message, or both refuse
    it (no message here comes near the field budget)."""
    native = data.draw(st.booleans())
    message_class, lifted = (pb.EvaluateRequest, LIFTED) if native else (oip.ModelInferRequest, {})
    body = _mutated(data.draw, (_native if native else _standard)(data.draw))
    assert _ours(message_class, body, lifted) == _theirs(message_class, body)


@pytest.mark.parametrize("nested", [False, True])
def test_a_message_of_tiny_fields_is_refused_after_a_bounded_survey(nested: bool) -> None:
    tiny = b"\x78\x00" * (8 << 20)  # 16 MiB of unknown field 15, varint 0
    if nested:  # the same inside the explain options, a message field
        tiny = b"\x3a" + bulk.varint(len(tiny)) + tiny
    with pytest.raises(bulk.Refused, match=f"more than {bulk.MAX_FIELDS} fields"):
        survey(tiny)
    within = b"\x78\x00" * (bulk.MAX_FIELDS - 1) + request().SerializeToString()[: 1 << 17]
    assert _ours(pb.EvaluateRequest, within, LIFTED) == _theirs(pb.EvaluateRequest, within)


def test_groups_nested_past_protobufs_depth_are_refused_by_both() -> None:
    deep = b"\x7b" * 101 + b"\x7c" * 101 + request().SerializeToString()
    assert _theirs(pb.EvaluateRequest, deep) is None
    with pytest.raises(bulk.Refused, match="nests deeper"):
        survey(deep)
    shallow = b"\x7b" * 50 + b"\x7c" * 50 + request().SerializeToString()
    assert _ours(pb.EvaluateRequest, shallow, LIFTED) == _theirs(pb.EvaluateRequest, shallow)
