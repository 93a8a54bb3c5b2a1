"""A request's clock readings inside the batcher (`SchedulerTiming`).

The batcher measures a request's hops inside it; the data plane adds its arrival and the
moment its answer was built (serving/dataplane.breakdown). Together they make the `Hops`
every answer carries (`gradserve.wire.timing`), which add up to the server's
arrival-to-answer time exactly, to rounding: nothing hides between two measurements.
"""

from __future__ import annotations

from dataclasses import dataclass


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
