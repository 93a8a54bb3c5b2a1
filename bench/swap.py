"""`make bench-swap` (part of `make bench`): a new model version swapped in under load.

For one process and for --frontends 2: the bundled model as version 1 of a repository under
--model-control explicit (XLA on, as served), 8 SDK callers sending 1-row gradients all the
time; after a quiet spell, version 2 is dropped in and loaded (RepositoryModelLoad), and the
callers go on until version 1 is released and a while after. Per repeat: failed calls, p99
latency before the swap and during it (from the load request to version 1's release), the
swap's duration, and the server's memory (every process of it) before, at its peak during
the swap and after. Medians over repeats; the callers share the machine's cores with the
server. Writes the result between the swap markers of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.run import SERVE, SIDE_PORTS_OFF, Server, write_section  # noqa: E402
from gradserve.client import GradientClient, GradserveError  # noqa: E402
from gradserve.server.config import BUNDLED_MODEL  # noqa: E402

BEGIN, END = "<!-- swap:begin -->", "<!-- swap:end -->"
CALLERS = 8
MODES = {"one process": ["--frontends", "1"], "frontends=2": ["--frontends", "2"]}


@dataclass
class Swap:
    failed: int
    answered: int
    p99_before_ms: float
    p99_during_ms: float
    seconds: float
    rss_before_mb: float
    rss_peak_mb: float
    rss_after_mb: float

    @property
    def ratio(self) -> float:
        return self.p99_during_ms / self.p99_before_ms


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants."""
    total, stack = 0.0, [pid]
    while stack:
        current = stack.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        line = next((x for x in status.splitlines() if x.startswith("VmRSS:")), "VmRSS: 0")
        total += int(line.split()[1]) / 1024
    return total


class _Load:
    """CALLERS threads of 1-row gradients; each answer's start and latency, each failure."""

    def __init__(self, target: str) -> None:
        self.answers: list[tuple[float, float]] = []
        self.failed = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._call, args=(target,), daemon=True) for _ in range(CALLERS)
        ]
        for thread in self._threads:
            thread.start()

    def _call(self, target: str) -> None:
        with GradientClient(target, timeout=60) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    client.evaluate([[0.3]], "gradient", model="quadratic")
                except GradserveError:
                    self.failed += 1
                    continue
                self.answers.append((started, time.monotonic() - started))

    def p99_ms(self, since: float, until: float) -> float:
        latencies = [s for started, s in self.answers if since <= started < until]
        return float(np.percentile(latencies, 99)) * 1e3

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _released(client: GradientClient) -> bool:
    states = {v.version: v.state for v in client.repository_index()}
    return states.get("1") == "UNAVAILABLE" and states.get("2") == "READY"


def one_swap(mode: list[str], quiet_s: float) -> Swap:
    repository = Path(tempfile.mkdtemp(prefix="gradserve-swap-"))
    (repository / "quadratic" / "1").mkdir(parents=True)
    shutil.copy(BUNDLED_MODEL, repository / "quadratic" / "1" / "model.keras")
    flags = ["--model", "", "--model-repository", str(repository), "--model-control", "explicit"]
    server = Server("swap", [*SERVE, *SIDE_PORTS_OFF, *mode, *flags], health=True)
    rss: list[tuple[float, float]] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.1):
            rss.append((time.monotonic(), _tree_rss_mb(server.process.pid)))

    try:
        with GradientClient(server.target, timeout=300) as client:
            client.load_model("quadratic")
            threading.Thread(target=sample, daemon=True).start()
            load = _Load(server.target)
            time.sleep(quiet_s)
            began = time.monotonic()
            staging = repository / "staging"
            staging.mkdir()
            shutil.copy(BUNDLED_MODEL, staging / "model.keras")
            staging.rename(repository / "quadratic" / "2")
            client.load_model("quadratic")
            while not _released(client):
                time.sleep(0.05)
            released = time.monotonic()
            time.sleep(quiet_s / 2)
            load.stop()
            sampling.set()
    finally:
        server.stop()
        shutil.rmtree(repository, ignore_errors=True)
    first = load.answers[0][0]
    return Swap(
        failed=load.failed,
        answered=len(load.answers),
        p99_before_ms=load.p99_ms(first, began),
        p99_during_ms=load.p99_ms(began, released),
        seconds=released - began,
        rss_before_mb=statistics.median(m for t, m in rss if t < began),
        rss_peak_mb=max(m for t, m in rss if began <= t <= released),
        rss_after_mb=rss[-1][1],
    )


def render(results: dict[str, list[Swap]], repeats: int) -> str:
    lines = [
        f"{CALLERS} SDK callers sending 1-row gradients throughout; version 2 of the bundled "
        "model (XLA on: every kind compiled in the warm-up) loaded with RepositoryModelLoad "
        f"while they run. Medians of {repeats} repeats; memory is every process of the server.",
        "",
        "| server | failed calls | answered | p99 before (ms) | p99 during (ms) | during / "
        "before | swap (s) | RSS before (MB) | RSS peak during (MB) | RSS after (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, swaps in results.items():

        def med(field: str, swaps=swaps) -> float:
            return statistics.median(getattr(s, field) for s in swaps)

        lines.append(
            f"| {label} | {sum(s.failed for s in swaps)} | {sum(s.answered for s in swaps):,} "
            f"| {med('p99_before_ms'):.1f} | {med('p99_during_ms'):.1f} | {med('ratio'):.2f} "
            f"| {med('seconds'):.2f} | {med('rss_before_mb'):.0f} | {med('rss_peak_mb'):.0f} "
            f"| {med('rss_after_mb'):.0f} |"
        )
    lines.append("")
    lines.append("Target: p99 during the swap at most 2x the p99 before it; no failed call.")
    return "\n".join(lines)


def write(text: str) -> None:
    write_section(BEGIN, END, "Model swap", text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quiet-seconds", type=float, default=8.0, help="before the swap")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    results = {}
    for label, mode in MODES.items():
        results[label] = []
        for repeat in range(args.repeats):
            swap = one_swap(mode, args.quiet_seconds)
            print(f"{label} #{repeat + 1}: {swap}", flush=True)
            results[label].append(swap)
    text = render(results, args.repeats)
    print(text)
    if not args.no_write:
        write(text)
    return 1 if any(s.failed for swaps in results.values() for s in swaps) else 0


if __name__ == "__main__":
    sys.exit(main())
