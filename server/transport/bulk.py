"""Large tensor bytes past protobuf, both ways: read in place, written with one copy.

Parsing a 15 MB request with protobuf copies its tensor bytes twice (into the parsed
message, then out of it into a Python bytes object), and building and serializing an answer
copies them three or four times, all on the event loop. Here the bytes of the configured
fields are cut out of the received message as views (`lift`), only the small rest is parsed,
and an answer's large tensors are appended to its serialized small part (`Spliced`). The
protobuf wire format allows both: a message is a sequence of tagged fields, a nested message
is a length-prefixed field, and fields may come in any order.

Anything unusual (a field repeated, a group, a malformed length) is left to protobuf itself:
`lift` then cuts nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5
LARGE = 64 * 1024  # smaller payloads are not worth the bookkeeping

Path = tuple[int, int]  # (field of the outer message, field of the nested message)


class _Malformed(Exception):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Malformed
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: memoryview) -> list[tuple[int, int, int, int, int]]:
    """(number, wire type, start of the field, start of its payload, end) of each field."""
    fields, pos = [], 0
    while pos < len(data):
        start = pos
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == VARINT:
            _, pos = _varint(data, pos)
            payload = pos
        elif wire == LENGTH:
            size, payload = _varint(data, pos)
            pos = payload + size
        elif wire in (FIXED64, FIXED32):
            payload = pos
            pos += 8 if wire == FIXED64 else 4
        else:  # groups and unknown wire types: protobuf decides
            raise _Malformed
        if pos > len(data) or number == 0:
            raise _Malformed
        fields.append((number, wire, start, payload, pos))
    return fields


def _cut(data: memoryview, inner: int) -> tuple[bytes, memoryview] | None:
    """A nested message without its field `inner` (if that occurs once, large), and the
    field's payload as a view; None when there is nothing to cut or the message is unusual."""
    try:
        found = [f for f in _fields(data) if f[0] == inner]
    except _Malformed:
        return None
    if len(found) != 1 or found[0][1] != LENGTH or found[0][4] - found[0][3] < LARGE:
        return None
    _, _, start, payload, end = found[0]
    return bytes(data[:start]) + bytes(data[end:]), data[payload:end]


def lift(data: bytes, paths: Mapping[Path, str]) -> tuple[bytes, dict[str, memoryview]]:
    """Cut the large payload at each of `paths` (outer field, nested field) out of the
    serialized message `data`: the rest of the message (to parse) and the payloads by name.
    Cuts nothing where the message is unusual, leaving it whole to protobuf."""
    if len(data) < LARGE:  # nothing in it can be large
        return data, {}
    view = memoryview(data)
    try:
        fields = _fields(view)
    except _Malformed:
        return data, {}
    counts: dict[int, int] = {}
    for number, *_ in fields:
        counts[number] = counts.get(number, 0) + 1
    by_outer = {outer: (inner, name) for (outer, inner), name in paths.items()}
    pieces: list[bytes | memoryview] = []
    lifted: dict[str, memoryview] = {}
    for number, wire, start, payload, end in fields:
        target = by_outer.get(number)
        cut = None
        if target is not None and wire == LENGTH and counts[number] == 1:
            cut = _cut(view[payload:end], target[0])
        if cut is None:
            pieces.append(view[start:end])
            continue
        rest, lifted[target[1]] = cut
        pieces += [varint(number << 3 | LENGTH), varint(len(rest)), rest]
    if not lifted:
        return data, {}
    return b"".join(pieces), lifted


@dataclass
class Lifted:
    """A parsed message whose large payloads were cut out (see `lift`), by name."""

    message: object
    payloads: dict[str, memoryview] = field(default_factory=dict)


@dataclass
class Spliced:
    """An answer whose large tensors are written after its small part, without going through
    protobuf: each (outer field, nested message head, data field, C-contiguous array)."""

    message: object
    tensors: list[tuple[int, bytes, int, np.ndarray]] = field(default_factory=list)

    def serialize(self) -> bytes:
        pieces: list[bytes | memoryview] = [self.message.SerializeToString()]
        for outer, head, data_field, array in self.tensors:
            data = memoryview(array).cast("B")
            data_key = varint(data_field << 3 | LENGTH) + varint(len(data))
            size = len(head) + len(data_key) + len(data)
            pieces += [varint(outer << 3 | LENGTH), varint(size), head, data_key, data]
        return b"".join(pieces)


def serializer(serialize: Callable[[object], bytes]) -> Callable[[object], bytes]:
    """`serialize` for plain messages, and Spliced answers written by their own method."""

    def write(answer: object) -> bytes:
        return answer.serialize() if isinstance(answer, Spliced) else serialize(answer)

    return write
