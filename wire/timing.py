"""The latency breakdown every answer carries: where one request's time went in the server.

One dataclass for the server, which measures it, and for the SDK, which hands it back
(`gradserve.client.Timing`). Every protocol writes it under these field names: the native
`Timing` message, the standard protocol's response parameters. Plain Python.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Hops:
    """A request's time in microseconds per hop, arrival to answer inside the server (the
    hops add up to `total_us`), and the rows of the largest batch it was part of."""

    decode_us: int = 0  # arrival -> queued: parsing checks, validation, decoding
    queue_us: int = 0  # queued -> dispatched in a batch
    handoff_us: int = 0  # dispatched -> engine started (joining rows, thread hand-off)
    compute_us: int = 0  # inside the engine
    encode_us: int = 0  # engine ended -> answer built: split and encode
    total_us: int = 0  # arrival -> answer built
    batch_rows: int = 0


FIELDS = tuple(field.name for field in fields(Hops))
# The hops themselves, in order: every field in microseconds but the total.
HOPS = tuple(n.removesuffix("_us") for n in FIELDS if n.endswith("_us") and n != "total_us")
HOP_FIELDS = tuple(f"{hop}_us" for hop in HOPS)  # each hop's field, in the same order
