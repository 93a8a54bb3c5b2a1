"""REST against the standard protocol over gRPC on the same server, and against a bare HTTP
echo on the same HTTP stack: both servers up at once, perf_analyzer's loads alternating
between them, medians over repeats, so a machine that speeds up or slows down between loads
moves every figure of a round alike.

The server is the default shape here (`--frontends 2`, the bundled model); the echo is
bench/transport_server.py's HTTP port (aiohttp behind the same connection gate, no model).
REST loads use perf_analyzer `-i http` with binary tensors both ways.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from bench import perf

BULK_ROWS = 4096  # rows per request of the bulk loads
# (server, mode, callers, rows): "rest" is perf_analyzer -i http, "unary" -i grpc
LOADS = (
    ("echo", "rest", 64, 1),
    ("server", "rest", 64, 1),
    ("server", "unary", 64, 1),
    ("server", "rest", 16, BULK_ROWS),
    ("server", "unary", 16, BULK_ROWS),
)


@dataclass(frozen=True)
class Comparison:
    """Median requests/s of each load of LOADS, and every round's figure."""

    median: dict[tuple, float]
    rounds: dict[tuple, list[float]]

    def rows_s(self, key: tuple) -> float:
        return self.median[key] * key[3]


def measure(tool: perf.Tool, targets: dict[str, dict[str, str]], repeats: int) -> Comparison:
    """`targets`: server name -> {"rest": host:port, "unary": host:port}."""
    rounds: dict[tuple, list[float]] = {load: [] for load in LOADS}
    for round_ in range(repeats):
        for load in LOADS:
            name, mode, callers, rows = load
            row = perf.load(tool, targets[name][mode], "quadratic", mode, callers, rows)
            if row is None:
                print(f"  rest compare: {load} gave no figure in round {round_ + 1}")
                continue
            rate = float(row["Inferences/Second"]) / rows  # perf_analyzer counts rows
            rounds[load].append(rate)
            print(f"  {name:<7} {mode:<6} x{callers:<3} {rows:>5} rows  {rate:>8.0f} req/s",
                  flush=True)  # fmt: skip
    median = {load: statistics.median(rates) for load, rates in rounds.items() if rates}
    return Comparison(median, rounds)
