"""Per model version statistics, as the standard protocol's statistics extension reports
them: requests answered and failed with where their time went, and the batches the engine
ran, by size.

A request's figures come from the same `Hops` its answer carries, so the statistics and the
answers never disagree: queue is its queue hop, compute input its hand-off (joining rows,
thread hand-off), compute infer its engine time and compute output its encoding; its decoding
is in success but in none of the parts (perf_analyzer shows it as overhead). Counters only,
updated on the event loop; plain Python.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gradserve.wire.timing import Hops

if TYPE_CHECKING:
    from gradserve.server.core.scheduler import Part

# The per-request durations, in the protocol's order and under its names.
REQUEST_STATISTICS = (
    "success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
)  # fmt: skip
# The per-batch durations.
BATCH_STATISTICS = ("compute_input", "compute_infer", "compute_output")


@dataclass(slots=True)
class Duration:
    """How many of something happened and their summed nanoseconds."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


def _durations(names: tuple[str, ...]) -> dict[str, Duration]:
    return {name: Duration() for name in names}


@dataclass
class Statistics:
    """One served version's counters since it was loaded."""

    requests: dict[str, Duration] = field(default_factory=lambda: _durations(REQUEST_STATISTICS))
    inference_count: int = 0  # rows answered by successful requests
    execution_count: int = 0  # engine calls
    last_inference_ms: int = 0  # epoch milliseconds of the last answer
    batches: dict[int, dict[str, Duration]] = field(default_factory=dict)  # by batch rows

    def answered(self, rows: int, hops: Hops) -> None:
        """A request of `rows` rows answered, its time spent as `hops` says."""
        requests = self.requests
        requests["success"].add(hops.total_us * 1000)
        requests["queue"].add(hops.queue_us * 1000)
        requests["compute_input"].add(hops.handoff_us * 1000)
        requests["compute_infer"].add(hops.compute_us * 1000)
        requests["compute_output"].add(hops.encode_us * 1000)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000

    @staticmethod
    def batch_durations() -> dict[str, Duration]:
        """The durations of one batch size, zero."""
        return _durations(BATCH_STATISTICS)

    def failed(self, seconds: float) -> None:
        """A request for this version failed after `seconds` in the server."""
        self.requests["fail"].add(round(seconds * 1e9))

    def executed(self, rows: int, input_s: float, infer_s: float, output_s: float) -> None:
        """One engine call of `rows` rows: joining and handing over its rows, the engine,
        splitting its outputs back to its requests."""
        self.execution_count += 1
        batch = self.batches.get(rows)
        if batch is None:
            batch = self.batches[rows] = self.batch_durations()
        for name, seconds in zip(BATCH_STATISTICS, (input_s, infer_s, output_s), strict=True):
            batch[name].add(round(seconds * 1e9))

    def batch_done(
        self, parts: list[Part], dispatched: float, began: float, ended: float, split: float,
        error: BaseException | None,
    ) -> None:  # fmt: skip
        """The scheduler's watch: count each engine call that succeeded."""
        if error is None:
            rows = sum(part.stop - part.start for part in parts)
            self.executed(rows, began - dispatched, ended - began, split - ended)

    def add(self, other: Statistics) -> None:
        """Add `other`'s counters to these (several processes' share of one version)."""
        for name, duration in other.requests.items():
            self.requests[name].add(duration.ns, duration.count)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        for rows, durations in other.batches.items():
            mine = self.batches.setdefault(rows, self.batch_durations())
            for name, duration in durations.items():
                mine[name].add(duration.ns, duration.count)
