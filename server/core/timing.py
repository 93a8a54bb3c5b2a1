"""A request's clock readings: the batcher's (`SchedulerTiming`) and the breakdown an answer
reports.

The batcher measures a request's hops inside it; whoever answered the request adds its
arrival and the moment its answer was built. Together they make the `Hops` every answer
carries (`gradserve.wire.timing`), which add up to the server's arrival-to-answer time
exactly, to rounding: nothing hides between two measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gradserve.wire.timing import Hops


@dataclass(frozen=True, slots=True)
class SchedulerTiming:
    """A request's hops inside the batcher, which add up to its time there. A request split
    over several engine calls also waits between them; each hop is summed over its calls."""

    queue_us: int  # waiting to be dispatched (a split request: also between its batches)
    handoff_us: int  # batch dispatched -> engine started (concatenation, thread hand-off)
    compute_us: int  # inside the engine
    batch_rows: int  # the largest batch it was part of
    queued: float  # time.perf_counter() when it was admitted
    done: float  # time.perf_counter() when its last engine call ended


def breakdown(arrived: float, timing: SchedulerTiming) -> Hops:
    """The hops of a request that arrived at `arrived` (time.perf_counter()) and whose answer,
    computed with `timing`, is built now."""
    now = time.perf_counter()
    return Hops(
        decode_us=round((timing.queued - arrived) * 1e6),
        queue_us=timing.queue_us,
        handoff_us=timing.handoff_us,
        compute_us=timing.compute_us,
        encode_us=round((now - timing.done) * 1e6),
        total_us=round((now - arrived) * 1e6),
        batch_rows=timing.batch_rows,
    )
