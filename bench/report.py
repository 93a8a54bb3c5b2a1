"""Render one bench run as markdown: ceilings, load steps, the target ratios."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from gradserve.client.loadtest import StepResult


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _find(results: list[StepResult], label: str, mode: str, conc: int, rows: int) -> StepResult:
    return next(
        r
        for r in results
        if (r.label, r.mode, r.concurrency, r.rows_per_request) == (label, mode, conc, rows)
    )


def _engine(engine: list[dict], batch: int, xla: str = "on", kind: str = "gradient") -> dict:
    return next(e for e in engine if (e["batch"], e["xla"], e["kind"]) == (batch, xla, kind))


def render(engine: list[dict], results: list[StepResult], rss: dict, elapsed: float, args) -> str:
    lines = [
        f"Run of {datetime.date.today()} on {os.cpu_count()} cores ({_cpu()}), "
        f"{args.repeats} repeats of {args.seconds:g} s per step, medians; "
        f"whole run {elapsed:.0f} s. Load generator: `gradserve loadtest` (one asyncio "
        "process on the same machine, so it shares the 2 cores with the server).",
        "",
        "### Engine alone (in-process, bundled model)",
        "",
        "| batch | kind | XLA us/call | XLA rows/s | no-XLA us/call | no-XLA rows/s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for e in engine:
        if e["xla"] != "on":
            continue
        off = _engine(engine, e["batch"], "off", e["kind"])
        lines.append(
            f"| {e['batch']} | {e['kind']} | {e['us_per_call']:.0f} | {e['rows_per_s']:,.0f} "
            f"| {off['us_per_call']:.0f} | {off['rows_per_s']:,.0f} |"
        )
    lines += [
        "",
        "### Servers under load (gradient, 1 input column)",
        "",
        "| server | mode | concurrency | rows/msg | req/s | rows/s | p50 ms | p99 ms "
        "| mean batch | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k} {v}" for k, v in r.errors.items()) or "0"
        lines.append(
            f"| {r.label} | {r.mode} | {r.concurrency} | {r.rows_per_request} "
            f"| {r.requests_per_s:,.0f} | {r.rows_per_s:,.0f} | {r.latency_ms['p50']:.2f} "
            f"| {r.latency_ms['p99']:.2f} | {r.batch_rows['mean']:.1f} | {errors} |"
        )
    lines += ["", "### Targets", "", *_targets(engine, results, rss), ""]
    lines += ["![rows/s against p99 latency](benchmarks.png)"]
    return "\n".join(lines)


def _targets(engine: list[dict], results: list[StepResult], rss: dict) -> list[str]:
    def row(name: str, value: str, target: str, ok: bool) -> str:
        return f"| {name} | {value} | {target} | {'met' if ok else 'NOT met'} |"

    batched64 = _find(results, "batched", "unary", 64, 1)
    transport64 = _find(results, "transport", "unary", 64, 1)
    unbatched64 = _find(results, "unbatched", "unary", 64, 1)
    engine64 = _engine(engine, 64)["rows_per_s"]
    stream256 = _find(results, "batched", "stream", 1, 256)
    engine256 = _engine(engine, 256)["rows_per_s"]
    c1 = _find(results, "batched", "unary", 1, 1).latency_ms["p50"]
    t1 = _find(results, "transport", "unary", 1, 1).latency_ms["p50"]
    e1 = _engine(engine, 1)["us_per_call"] / 1e3
    ceiling = min(transport64.rows_per_s, engine64)
    r_transport = batched64.rows_per_s / transport64.rows_per_s
    r_unbatched = batched64.rows_per_s / unbatched64.rows_per_s
    r_stream = stream256.rows_per_s / engine256
    peak = max(rss.get("batched", 0.0), rss.get("unbatched", 0.0))
    return [
        "| measure | value | target | |",
        "|---|---:|---|---|",
        row("unary c=64: batched / transport ceiling", f"{r_transport:.2f}", ">= 0.8",
            r_transport >= 0.8),
        row("unary c=64: batched / unbatched", f"{r_unbatched:.2f}", ">= 2", r_unbatched >= 2),
        row("unary c=64: batched / min(transport, engine@64)",
            f"{batched64.rows_per_s / ceiling:.2f}", "(informative)", True),
        row("1 stream, 256 rows/msg: batched / engine@256", f"{r_stream:.2f}", ">= 0.5",
            r_stream >= 0.5),
        row("c=1 p50 (ms) vs transport p50 + engine@1 + 0.2",
            f"{c1:.2f} vs {t1:.2f} + {e1:.2f} + 0.2 = {t1 + e1 + 0.2:.2f}", "<=",
            c1 <= t1 + e1 + 0.2),
        row("peak server RSS (MB), gradserve", f"{peak:.0f}", "< 1500", peak < 1500),
    ]  # fmt: skip
