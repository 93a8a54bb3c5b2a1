"""Large messages, both ways: bounded work before protobuf sees them, tensor bytes read in
place, and answers' large tensors written with one copy.

Protobuf parses a message in C, but a message made of millions of tiny fields still costs a
parse in proportion to its fields (and gradserve's own Python per field more), on the event
loop. So every message of LARGE bytes or more is surveyed first (`survey`): one pass over its
fields and, where the schema says a field is a message, over theirs, that stops at
MAX_FIELDS fields in all and refuses the message then, and refuses a structure protobuf would
refuse too. A legitimate request has a few dozen fields; its size is in a few long ones
(tensor bytes, packed numbers), which the survey skips in one step.

The same pass finds the bytes of the configured tensor fields (`x.data`, `v.data`), which are
then cut out of the message as views, so that only the small rest is parsed (protobuf would
copy them twice); and an answer's large tensors are appended to its serialized small part
(`Spliced`). The protobuf wire format allows both: a message is a sequence of tagged fields,
a nested message is a length-prefixed field, and fields may come in any order. Anything
unusual about a field to be cut (repeated, of another wire type, small) leaves it uncut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.descriptor import Descriptor

VARINT, FIXED64, LENGTH, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5
LARGE = 64 * 1024  # smaller messages and payloads are not worth the bookkeeping
# Fields a large message may have, nested ones included: far more than any request needs
# (an EvaluateRequest has at most 8, its tensors 3 each; a standard request a few per
# input, output and parameter), far fewer than can make a parse take long.
MAX_FIELDS = 4096
MAX_DEPTH = 100  # nested messages and groups, as protobuf's own limit

Path = tuple[int, int]  # (field of the outer message, field of the nested message)


class Refused(Exception):
    """The message is not surveyed further: what is wrong with it, for its error answer."""


def _varint(data: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise Refused(f"a varint at byte {pos} is cut short or too long")
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


class _Survey:
    """One pass over a message's fields, nested messages included, within MAX_FIELDS."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.left = MAX_FIELDS

    def fields(self, start: int, end: int, group: int = 0, depth: int = 0):
        """Each field of the message in data[start:end] as (number, wire type, start of the
        field, start of its payload, end of the field), each counted against the budget. In
        a group (`group`: its field number), up to its end tag, and the generator returns
        where that tag ends."""
        if depth > MAX_DEPTH:
            raise Refused(f"it nests deeper than {MAX_DEPTH} messages or groups")
        data, pos = self.data, start
        while pos < end:
            first = pos
            key, pos = _varint(data, pos, end)
            number, wire = key >> 3, key & 7
            if number == 0:
                raise Refused(f"field number 0 at byte {first}")
            if wire == END_GROUP:
                if number != group:
                    raise Refused(f"an end of group {number} at byte {first} with none open")
                return pos
            self.left -= 1
            if self.left < 0:
                raise Refused(
                    f"it has more than {MAX_FIELDS} fields, nested ones included; a request "
                    "needs a few dozen (repeated numbers are sent packed)"
                )
            if wire == VARINT:
                _, pos = _varint(data, pos, end)
                payload = pos
            elif wire == LENGTH:
                size, payload = _varint(data, pos, end)
                pos = payload + size
            elif wire in (FIXED64, FIXED32):
                payload = pos
                pos += 8 if wire == FIXED64 else 4
            elif wire == START_GROUP:  # unknown to every schema here, but parsed to its end
                payload = pos
                pos = _drain(self.fields(pos, end, number, depth + 1))
            else:
                raise Refused(f"wire type {wire} at byte {first} does not exist")
            if pos > end:
                raise Refused(f"field {number} at byte {first} runs past the end of its message")
            yield number, wire, first, payload, pos
        if group:
            raise Refused(f"group {group} is never closed")
        return pos

    def check(self, descriptor: Descriptor, start: int, end: int, depth: int) -> None:
        """Survey data[start:end] as a message of `descriptor`."""
        for number, wire, _, payload, stop in self.fields(start, end, depth=depth):
            self.nested(descriptor, number, wire, payload, stop, depth)

    def nested(self, descriptor: Descriptor, number: int, wire: int, payload: int, stop: int,
               depth: int) -> None:  # fmt: skip
        """Look into a field the schema says is a message (protobuf parses those; unknown
        length-delimited fields and bytes it keeps as they are)."""
        known = descriptor.fields_by_number.get(number)
        if wire == LENGTH and known is not None and known.message_type is not None:
            self.check(known.message_type, payload, stop, depth + 1)


def _drain(fields) -> int:
    """Run a group's field generator to its end tag (its fields are counted as they go)."""
    while True:
        try:
            next(fields)
        except StopIteration as done:
            return done.value


def survey(
    data: bytes, descriptor: Descriptor, lifted: Mapping[Path, str] | None = None
) -> tuple[bytes, dict[str, memoryview]]:
    """Survey a large serialized message of `descriptor` (raising Refused: too many fields,
    too deep, or malformed as protobuf would find it) and cut the payload at each of the
    `lifted` paths (outer field, nested field) out of it: the rest of the message, to parse,
    and the payloads by name, as views. A path whose fields are not there exactly once,
    length-delimited at both levels and large, is left whole."""
    view = memoryview(data)
    walk = _Survey(view)
    by_outer = {outer: (inner, name) for (outer, inner), name in (lifted or {}).items()}
    seen: dict[int, int] = {}
    candidates: dict[int, tuple[int, int, int]] = {}  # outer number -> (start, payload, end)
    for number, wire, first, payload, stop in walk.fields(0, len(view)):
        seen[number] = seen.get(number, 0) + 1
        if number in by_outer and wire == LENGTH:
            candidates[number] = (first, payload, stop)
        walk.nested(descriptor, number, wire, payload, stop, 0)
    cuts = []
    for number, (first, payload, stop) in candidates.items():
        inner, name = by_outer[number]
        cut = _inner_cut(view, payload, stop, inner) if seen[number] == 1 else None
        if cut is not None:
            cuts.append((first, stop, number, payload, *cut, name))
    if not cuts:
        return data, {}
    return _spliced_rest(view, sorted(cuts))


def _inner_cut(view: memoryview, start: int, end: int, inner: int) -> tuple[int, int, int] | None:
    """Where the nested field `inner` of the (surveyed) message in view[start:end] lies, as
    (its start, its payload's start, its end), if it occurs once, length-delimited and large."""
    found = [f for f in _Survey(view).fields(start, end) if f[0] == inner]
    if len(found) != 1 or found[0][1] != LENGTH or found[0][4] - found[0][3] < LARGE:
        return None
    return found[0][2:]


def _spliced_rest(view: memoryview, cuts: list) -> tuple[bytes, dict[str, memoryview]]:
    """The message without the cut payloads (each outer field re-framed around what is left
    of its nested message), and the payloads."""
    pieces: list[bytes | memoryview] = []
    lifted: dict[str, memoryview] = {}
    at = 0
    for first, stop, number, payload, inner_first, inner_payload, inner_stop, name in cuts:
        rest = bytes(view[payload:inner_first]) + bytes(view[inner_stop:stop])
        pieces += [view[at:first], varint(number << 3 | LENGTH), varint(len(rest)), rest]
        lifted[name] = view[inner_payload:inner_stop]
        at = stop
    pieces.append(view[at:])
    return b"".join(pieces), lifted


@dataclass
class Lifted:
    """A parsed message whose large payloads were cut out (see `survey`), by name."""

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
