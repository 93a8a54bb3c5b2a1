"""The flood, scaled down: large requests from several callers in a loop while one caller
sends 1-row requests, against a real server subprocess serving a 64x64x3-input model.

Asserts the bounds with generous margins (the machine is shared): every flood call is
answered or refused with RESOURCE_EXHAUSTED, none lost; the byte bound refuses some; the
light caller's p99 stays within its idle p99 + 3 x --max-batch-ms + a margin; the server's
peak RSS stays within its baseline + the queue bound + a fixed margin for what the bound
does not count (gRPC's buffers of messages still arriving, the allocator's slack). The
full-size flood and its figures are in `make bench`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import load_script

MAX_BATCH_MS = 20
MAX_QUEUE_MB = 8
# The light caller shares 2 busy cores with the flood and its clients: this margin only
# catches starvation (seconds); the batcher tests check the order of service exactly.
LATENCY_MARGIN_MS = 1000
RSS_MARGIN_MB = 200


flood = load_script("bench/flood.py", "gradserve_bench_flood")


@pytest.fixture(scope="module")
def head_model(tmp_path_factory) -> Path:
    return flood.build_model(tmp_path_factory.mktemp("flood") / "head.keras")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("frontends", ["1", "2"])
def test_flood_is_fair_bounded_and_loses_nothing(head_model: Path, frontends: str) -> None:
    """In one process and in the multi-process shape (its RSS summed over its processes)."""
    args = ["--frontends", frontends, "--xla", "off", "--max-batch-size", "256"]
    args += ["--max-queue-mb", str(MAX_QUEUE_MB)]
    args += ["--max-batch-ms", str(MAX_BATCH_MS)]
    result = flood.run_flood(head_model, args, callers=4, rows=32, seconds=3, idle_seconds=1)

    assert result.lost == {}, result
    assert result.answered > 0, result
    assert result.refused > 0, result  # 4 x 32 rows x 3 x 48 KiB (message, x, result) > 8 MiB

    idle_p99, flood_p99 = result.light_idle_ms["p99"], result.light_flood_ms["p99"]
    assert result.light_flood_ms["n"] >= 5, result
    assert flood_p99 <= idle_p99 + 3 * MAX_BATCH_MS + LATENCY_MARGIN_MS, result

    if not math.isnan(result.peak_rss_mb):
        bound = result.baseline_rss_mb + 1.2 * MAX_QUEUE_MB + RSS_MARGIN_MB
        assert result.peak_rss_mb <= bound, result
