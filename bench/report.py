"""Render one bench run as markdown: ceilings, load steps, the target ratios."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path

from bench import scaling
from bench.flood import LIGHT_P99_MS, MARGIN_MB, QUEUE_MB
from bench.rest_compare import BULK_ROWS
from gradserve.client.loadtest import BREAKDOWN, StepResult

FRONTENDS = 2
DETERMINISTIC = "deterministic"  # the label of the server run with --deterministic on


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


def _engine(
    engine: list[dict], batch: int, xla: str = "on", kind: str = "gradient", det: str = "off"
) -> dict:
    key = (batch, xla, kind, det)
    return next(e for e in engine if (e["batch"], e["xla"], e["kind"], e["deterministic"]) == key)


def render(
    engine: list[dict],
    results: list[StepResult],
    rss: dict,
    elapsed: float,
    args,
    costs: dict,
    explain: dict | None = None,
) -> str:
    lines = [
        f"Run of {datetime.date.today()} on {os.cpu_count()} cores ({_cpu()}), "
        f"{args.repeats} repeats of {args.seconds:g} s per step, medians; "
        f"whole run {elapsed:.0f} s. Load generator: `gradserve loadtest` (one asyncio "
        "process on the same machine, so it shares the 2 cores with the server). `batched` is "
        "one process (`--frontends 1`); "
        f"`frontends={FRONTENDS}` is `--frontends {FRONTENDS}`: {FRONTENDS} protocol "
        "processes and one engine process (`--frontends auto` on 2 to 5 cores).",
        "",
        "### Engine alone (in-process, bundled model)",
        "",
        "| batch | kind | XLA us/call | XLA rows/s | no-XLA us/call | no-XLA rows/s |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for e in engine:
        if e["xla"] != "on" or e["deterministic"] != "off":
            continue
        off = _engine(engine, e["batch"], "off", e["kind"])
        lines.append(
            f"| {e['batch']} | {e['kind']} | {e['us_per_call']:.0f} | {e['rows_per_s']:,.0f} "
            f"| {off['us_per_call']:.0f} | {off['rows_per_s']:,.0f} |"
        )
    lines += ["", *_deterministic_cost(engine, results)]
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
    lines += ["", *_breakdown(results)]
    if costs:
        lines += ["", *scaling.render(costs, FRONTENDS)]
    if explain is not None:
        lines += [
            "",
            "### Integrated gradients over one stream (batched server)",
            "",
            f"{explain['rows']} rows x {explain['steps']} steps per message (Simpson rule: "
            f"{explain['steps'] + 1} path rows per row, all counted), "
            f"{explain['messages']} messages over all repeats, p50 {explain['p50_ms']:.2f} ms: "
            f"**{explain['path_rows_per_s']:,.0f} path rows/s**, mean engine batch "
            f"{explain['mean_batch']:.0f} rows.",
        ]
    targets = _targets(engine, results, rss)
    if explain is not None:
        targets.append(explain_target(engine, explain).splitlines()[-1])
    lines += ["", "### Targets", "", *targets, ""]
    lines += ["![rows/s against p99 latency](benchmarks.png)"]
    return "\n".join(lines)


def _deterministic_cost(engine: list[dict], results: list[StepResult]) -> list[str]:
    """What --deterministic costs: the engine's time per call with the tiled functions over
    today's, per kind, batch and XLA setting; and the deterministic server's requests/s
    against the same server without it, per load."""
    lines = [
        "### What `--deterministic` costs",
        "",
        "Engine alone: us per call, deterministic / today (ratio > 1: slower).",
        "",
        "| batch | kind | XLA today | XLA deterministic | ratio | no-XLA today "
        "| no-XLA deterministic | ratio |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in engine:
        if e["xla"] != "on" or e["deterministic"] != "off":
            continue
        cells = []
        for xla in ("on", "off"):
            today = _engine(engine, e["batch"], xla, e["kind"])["us_per_call"]
            tiled = _engine(engine, e["batch"], xla, e["kind"], "on")["us_per_call"]
            cells.append(f"{today:.0f} | {tiled:.0f} | {tiled / today:.2f}")
        lines.append(f"| {e['batch']} | {e['kind']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Servers (`--frontends {FRONTENDS}`), gradserve loadtest: requests/s without and with "
        "`--deterministic on`.",
        "",
        "| mode | concurrency | rows/msg | today req/s | deterministic req/s | today / det |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.label != DETERMINISTIC:
            continue
        today = _find(results, f"frontends={FRONTENDS}", r.mode, r.concurrency,
                      r.rows_per_request)  # fmt: skip
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.rows_per_request} | {today.requests_per_s:,.0f} "
            f"| {r.requests_per_s:,.0f} | {today.requests_per_s / r.requests_per_s:.2f} |"
        )
    return lines


def _breakdown(results: list[StepResult]) -> list[str]:
    """Where a gradserve request's time went: the server's hops (medians of what each
    response reports) and the rest of the client's latency (network, gRPC, client)."""
    columns = BREAKDOWN
    lines = [
        "### Where the time went (batched server, medians in microseconds)",
        "",
        "decode: arrival to queued; queue: to dispatched in a batch; handoff: to engine start; "
        "compute: engine; encode: engine end to answer built (on a stream, also waiting for the "
        "answers before it); server: arrival to answer; outside: the client's latency minus "
        "server (gRPC, network, the load generator).",
        "",
        "| mode | concurrency | rows/msg | " + " | ".join(columns) + " |",
        "|---|---:|---:|" + "---:|" * len(columns),
    ]
    for r in results:
        if r.label == "batched" and r.breakdown_us:
            cells = " | ".join(f"{r.breakdown_us[c]:,.0f}" for c in columns)
            lines.append(f"| {r.mode} | {r.concurrency} | {r.rows_per_request} | {cells} |")
    return lines


def _targets(engine: list[dict], results: list[StepResult], rss: dict) -> list[str]:
    def row(name: str, value: str, target: str, ok: bool) -> str:
        return f"| {name} | {value} | {target} | {'met' if ok else 'NOT met'} |"

    batched64 = _find(results, "batched", "unary", 64, 1)
    transport64 = _find(results, "transport", "unary", 64, 1)
    unbatched64 = _find(results, "unbatched", "unary", 64, 1)
    streams16 = _find(results, "batched", "stream", 16, 1)
    transport_streams16 = _find(results, "transport", "stream", 16, 1)
    stream256 = _find(results, "batched", "stream", 1, 256)
    engine256 = _engine(engine, 256)["rows_per_s"]
    batched1 = _find(results, "batched", "unary", 1, 1)
    c1 = batched1.latency_ms["p50"]
    server1 = batched1.breakdown_us.get("server", float("inf"))
    t1 = _find(results, "transport", "unary", 1, 1).latency_ms["p50"]
    e1_us = _engine(engine, 1)["us_per_call"]
    e1 = e1_us / 1e3
    r_transport = batched64.rows_per_s / transport64.rows_per_s
    r_unbatched = batched64.rows_per_s / unbatched64.rows_per_s
    r_streams = streams16.rows_per_s / transport_streams16.rows_per_s
    r_stream = stream256.rows_per_s / engine256
    peak = max(rss.get("batched", 0.0), rss.get("unbatched", 0.0))
    return [
        "| measure | value | target | |",
        "|---|---:|---|---|",
        row("c=1 server p50 (us) vs engine@1 + 150", f"{server1:.0f} vs {e1_us + 150:.0f}",
            "<=", server1 <= e1_us + 150),
        row("c=1 client p50 (ms) vs transport p50 + engine@1 + 0.2",
            f"{c1:.2f} vs {t1:.2f} + {e1:.2f} + 0.2 = {t1 + e1 + 0.2:.2f}", "<=",
            c1 <= t1 + e1 + 0.2),
        row("unary c=64: batched / transport ceiling", f"{r_transport:.2f}", ">= 0.6",
            r_transport >= 0.6),
        row("16 streams, 1 row/msg: batched / transport ceiling", f"{r_streams:.2f}", ">= 0.6",
            r_streams >= 0.6),
        row("unary c=64: batched / unbatched", f"{r_unbatched:.2f}", ">= 2", r_unbatched >= 2),
        row("1 stream, 256 rows/msg: batched / engine@256", f"{r_stream:.2f}", ">= 0.5",
            r_stream >= 0.5),
        row("peak server RSS (MB), gradserve", f"{peak:.0f}", "< 1500", peak < 1500),
        *_frontend_targets(results),
    ]  # fmt: skip


def _frontend_targets(results: list[StepResult]) -> list[str]:
    label = f"frontends={FRONTENDS}"
    if not any(r.label == label for r in results):
        return []
    multi64 = _find(results, label, "unary", 64, 1).rows_per_s
    single64 = _find(results, "batched", "unary", 64, 1).rows_per_s
    transport64 = _find(results, "transport", "unary", 64, 1).rows_per_s
    p50 = {r.label: r.latency_ms["p50"] for r in results if (r.mode, r.concurrency) == ("unary", 1)}
    best = min(p50["batched"], p50["unbatched"])
    return [
        f"| unary c=64: {label} / batched (one process) | {multi64 / single64:.2f} | >= 1.3 "
        f"| {'met' if multi64 >= 1.3 * single64 else 'NOT met'} |",
        f"| unary c=64: {label} / transport ceiling | {multi64 / transport64:.2f} | >= 0.8 "
        f"| {'met' if multi64 >= 0.8 * transport64 else 'NOT met'} |",
        f"| c=1 p50 (ms): {label} (auto here) vs best one-process | {p50[label]:.2f} vs "
        f"{best:.2f} | (informative) | |",
    ]


def render_flood(floods: dict) -> list[str]:
    """The flood step: the light caller's latency idle and under the flood, the flooders'
    rows/s, refusals, losses and the server's memory, with and without fairness and the
    time cap; then the targets."""
    fair, fifo = floods["fair"], floods["fifo"]
    lines = [
        f"### Flood ({fair.callers} callers x {fair.rows}-row requests of a 64x64x3 model in a "
        f"loop, plus one 1-row caller; {fair.seconds:.0f} s)",
        "",
        f"fair: `--fairness on --max-batch-ms 20`; fifo: `--fairness off --max-batch-ms 0`; "
        f"one process each; `fair, frontends=N`: the fair settings in the multi-process shape; "
        f"all `--max-queue-mb {QUEUE_MB}`. Refused flood calls wait 50 ms and try again; "
        "every caller runs in a process other than the server's and the measuring one. "
        "Medians of the rounds (each figure on its own; calls lost summed). Memory: what all "
        "the server's processes hold together (resident pages, shared-memory segments once), "
        "at baseline and its highest sample during the flood; the sum of each process's own "
        "peak is an upper bound of it.",
        "",
        "| server | light p50 idle ms | light p99 idle ms | light p50 flood ms "
        "| light p99 flood ms | light max flood ms | flood rows/s | answered | refused | lost "
        "| memory baseline MB | memory peak MB | sum of peaks MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for label, f in floods.items():
        lost = ", ".join(f"{k} {v}" for k, v in f.lost.items()) or "0"
        lines.append(
            f"| {label} | {f.light_idle_ms['p50']:.1f} | {f.light_idle_ms['p99']:.1f} "
            f"| {f.light_flood_ms['p50']:.1f} | {f.light_flood_ms['p99']:.1f} "
            f"| {f.light_flood_ms['max']:.1f} | {f.flood_rows_per_s:,.0f} | {f.answered} "
            f"| {f.refused} | {lost} | {f.baseline_rss_mb:.0f} | {f.peak_rss_mb:.0f} "
            f"| {f.peak_hwm_sum_mb:.0f} |"
        )
    ratio = fair.flood_rows_per_s / fifo.flood_rows_per_s if fifo.flood_rows_per_s else 0.0
    rss_bound = fair.baseline_rss_mb + QUEUE_MB * 1.2 + MARGIN_MB
    lost = sum(sum(f.lost.values()) for f in floods.values())
    shapes = [(label, f) for label, f in floods.items() if label.startswith("fair, frontends")]

    def row(name: str, value: str, target: str, ok: bool) -> str:
        return f"| {name} | {value} | {target} | {'met' if ok else 'NOT met'} |"

    return [
        *lines,
        "",
        "| measure | value | target | |",
        "|---|---:|---|---|",
        row("light p99 under flood (ms)", f"{fair.light_flood_ms['p99']:.1f}",
            f"<= {LIGHT_P99_MS}", fair.light_flood_ms["p99"] <= LIGHT_P99_MS),
        row("flood rows/s: fair / fifo", f"{ratio:.2f}", ">= 0.8", ratio >= 0.8),
        row("peak memory (MB), fair", f"{fair.peak_rss_mb:.0f}",
            f"<= baseline + {QUEUE_MB} x 1.2 + {MARGIN_MB} = {rss_bound:.0f}",
            fair.peak_rss_mb <= rss_bound),
        row("flood calls lost (neither answered nor RESOURCE_EXHAUSTED)", str(lost), "0",
            lost == 0),
        *(line for label, shape in shapes for line in _shape_targets(label, shape, fair)),
    ]  # fmt: skip


def _shape_targets(label: str, shape, one_process) -> list[str]:
    """The multi-process shape's flood targets: the one process's, and within 1.2x of it."""
    p99, alone = shape.light_flood_ms["p99"], one_process.light_flood_ms["p99"]
    bound = shape.baseline_rss_mb + QUEUE_MB * 1.2 + MARGIN_MB
    ok = "met", "NOT met"
    return [
        f"| light p99 under flood (ms), {label} | {p99:.1f} | <= {LIGHT_P99_MS} and <= 1.2 x "
        f"{alone:.1f} | {ok[not (p99 <= LIGHT_P99_MS and p99 <= 1.2 * alone)]} |",
        f"| peak memory (MB), {label} | {shape.peak_rss_mb:.0f} | <= baseline + {QUEUE_MB} x 1.2 + "
        f"{MARGIN_MB} = {bound:.0f} | {ok[not shape.peak_rss_mb <= bound]} |",
    ]


def explain_target(engine: list[dict], explain: dict) -> str:
    """The integrated-gradients target as a table (header and one row)."""
    ceiling = _engine(engine, 1024)["rows_per_s"]
    ratio = explain["path_rows_per_s"] / ceiling
    return "\n".join([
        "| measure | value | target | |",
        "|---|---:|---|---|",
        f"| integrated gradients, 1 stream: path rows/s / engine gradient@1024 "
        f"({explain['path_rows_per_s']:,.0f} / {ceiling:,.0f}) | {ratio:.2f} | >= 0.5 "
        f"| {'met' if ratio >= 0.5 else 'NOT met'} |",
    ])  # fmt: skip


def render_perf(perf: list, note: str, engine: list[dict]) -> list[str]:
    """perf_analyzer's loads, their CPU per request, the engine's CPU per sub-batch (real
    model and stand-in), the projection from those costs, and the targets they meet."""
    lines = ["### Standard protocol under perf_analyzer (1 row per request)", ""]
    if not perf:
        return [*lines, f"Not run: {note}; the figures above come from `gradserve loadtest`."]
    by = {(r.label, r.mode, r.concurrency): r for r in perf}
    lines += [
        f"Load generator: {note}. CPU per request of each process role over the load "
        "(its CPU seconds / requests answered); `stand-in` is `--frontends "
        f"{FRONTENDS}` with an engine that computes nothing (bench/stand_in.py).",
        "",
        "| server | load | req/s | / transport | p50 ms | p99 ms | CPU us per request |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in perf:
        ceiling = by.get(("transport", r.mode, r.concurrency))
        ratio = f"{r.req_s / ceiling.req_s:.2f}" if ceiling else ""
        cpu = ", ".join(f"{role} {us:.0f}" for role, us in r.cpu_us.items())
        lines.append(f"| {r.label} | {r.name} | {r.req_s:,.0f} | {ratio} | {r.p50_ms:.2f} "
                     f"| {r.p99_ms:.2f} | {cpu} |")  # fmt: skip
    multi = by.get((f"frontends={FRONTENDS}", "unary", 64))
    stand_in = by.get(("stand-in", "unary", 64))
    if multi is None or stand_in is None or not multi.sub_batches_per_s:
        return lines
    costs = perf_costs(multi, stand_in)
    lines += [
        "",
        f"Costs at 64 callers over `--frontends {FRONTENDS}` (CPU time):",
        "",
        "| measured | value |",
        "|---|---:|",
        f"| frontends, per 1-row request | {costs['frontend_us']:.0f} us |",
        f"| engine process, per request | {costs['engine_us']:.0f} us |",
        f"| engine process, per sub-batch, bundled model | {costs['sub_batch_us']:.0f} us "
        f"({multi.req_s / multi.sub_batches_per_s:.1f} requests per sub-batch) |",
        f"| engine process, per sub-batch, stand-in engine | {costs['stand_in_us']:.0f} us "
        f"(at most {1e6 / costs['stand_in_us']:,.0f} sub-batches/s on one core) |",
        "",
        "Projected 1-row requests/s with one core for the engine process and the rest for "
        "frontends, from the costs above (a projection, not a measurement; the load "
        "generator's CPU is not counted), next to what was measured here:",
        "",
        "| cores | " + " | ".join(str(c) for c in scaling.CORES) + " |",
        "|---|" + "---:|" * len(scaling.CORES),
        "| projected req/s | "
        + " | ".join(f"{costs['projection'][c]:,.0f}" for c in scaling.CORES) + " |",
        "",
        f"Measured on this machine: one process {by[('batched', 'unary', 64)].req_s:,.0f} "
        f"req/s, `--frontends {FRONTENDS}` {multi.req_s:,.0f} req/s (64 callers).",
        "",
        *_perf_targets(by, costs, engine),
    ]  # fmt: skip
    return lines


def render_rest(comparison) -> list[str]:
    """REST against gRPC's standard protocol and the bare HTTP echo: medians of alternating
    rounds (bench/rest_compare.py), and the targets they meet."""
    lines = ["### REST against gRPC and a bare HTTP echo (perf_analyzer, alternating)", ""]
    if comparison is None:
        return [*lines, "Not run: no perf_analyzer."]
    median = comparison.median
    lines += [
        f"Both servers up at once: `--frontends {FRONTENDS}` (REST on its HTTP port, the "
        "standard protocol on its gRPC port) and bench/transport_server.py's HTTP echo (the "
        "same aiohttp stack and connection gate, no model); perf_analyzer's loads in turn, "
        f"{len(next(iter(comparison.rounds.values())))} rounds, medians. REST: `-i http`, "
        "binary tensors both ways.",
        "",
        "| server | protocol | callers | rows | req/s (median) | rows/s | every round |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for key, rates in comparison.rounds.items():
        name, mode, callers, rows = key
        protocol = "REST (HTTP)" if mode == "rest" else "gRPC"
        if key in median:
            lines.append(f"| {name} | {protocol} | {callers} | {rows} | {median[key]:,.0f} | "
                         f"{comparison.rows_s(key):,.0f} | "
                         + ", ".join(f"{r:,.0f}" for r in rates) + " |")  # fmt: skip
    keys = {"rest": ("server", "rest", 64, 1), "grpc": ("server", "unary", 64, 1),
            "echo": ("echo", "rest", 64, 1), "bulk_rest": ("server", "rest", 16, BULK_ROWS),
            "bulk_grpc": ("server", "unary", 16, BULK_ROWS)}  # fmt: skip
    if any(k not in median for k in keys.values()):
        return [*lines, "", "REST targets: not every load gave a figure."]
    rest, grpc, echo = (median[keys[k]] for k in ("rest", "grpc", "echo"))
    bulk_rest, bulk_grpc = (comparison.rows_s(keys[k]) for k in ("bulk_rest", "bulk_grpc"))

    def row(name: str, value: float, target: float, detail: str) -> str:
        verdict = "met" if value >= target else "NOT met"
        return f"| {name} | {value:.2f} ({detail}) | >= {target} | {verdict} |"

    return [
        *lines,
        "",
        "| measure | value | target | |",
        "|---|---:|---|---|",
        row("REST x64 / gRPC standard protocol x64", rest / grpc, 0.8,
            f"{rest:,.0f} vs {grpc:,.0f} req/s"),
        row("REST x64 / bare HTTP echo x64", rest / echo, 0.5,
            f"{rest:,.0f} vs {echo:,.0f} req/s"),
        row(f"REST / gRPC, 16 callers x {BULK_ROWS} rows (rows/s)", bulk_rest / bulk_grpc, 0.8,
            f"{bulk_rest:,.0f} vs {bulk_grpc:,.0f} rows/s"),
    ]  # fmt: skip


def perf_costs(multi, stand_in) -> dict:
    """CPU per request and per sub-batch, and the projection they give."""
    frontend = multi.cpu_us["frontends"]
    engine_us = multi.cpu_us["engine"]
    per_sub_batch = engine_us * multi.req_s / multi.sub_batches_per_s
    stand_in_sub = stand_in.cpu_us["engine"] * stand_in.req_s / stand_in.sub_batches_per_s
    projection = {c: min((c - 1) * 1e6 / frontend, 1e6 / engine_us) for c in scaling.CORES}
    return {"frontend_us": frontend, "engine_us": engine_us, "sub_batch_us": per_sub_batch,
            "stand_in_us": stand_in_sub, "projection": projection}  # fmt: skip


def _perf_targets(by: dict, costs: dict, engine: list[dict]) -> list[str]:
    def row(name: str, value: str, target: str, ok: bool) -> str:
        return f"| {name} | {value} | {target} | {'met' if ok else 'NOT met'} |"

    default = f"frontends={FRONTENDS}" if _auto_frontends() > 1 else "batched"
    ratio = {
        key: by[(default, *key)].req_s / by[("transport", *key)].req_s
        for key in [("unary", 64), ("stream", 16)]
    }
    p50, t50 = by[(default, "unary", 1)].p50_ms, by[("transport", "unary", 1)].p50_ms
    e1 = _engine(engine, 1)["us_per_call"] / 1e3
    transport_cpu = by[("transport", "unary", 64)].cpu_us["server"]
    frontend = costs["frontend_us"]
    return [
        f"Targets (perf_analyzer; the default here is `{default}`):",
        "",
        "| measure | value | target | |",
        "|---|---:|---|---|",
        row("unary x64: default / transport", f"{ratio['unary', 64]:.2f}", ">= 0.7",
            ratio["unary", 64] >= 0.7),
        row("unary x1: default p50 (ms) vs transport p50 + engine@1 + 0.3",
            f"{p50:.2f} vs {t50 + e1 + 0.3:.2f}", "<=", p50 <= t50 + e1 + 0.3),
        row("stream x16: default / transport", f"{ratio['stream', 16]:.2f}", ">= 0.6",
            ratio["stream", 16] >= 0.6),
        row("stand-in engine: CPU per sub-batch (us)", f"{costs['stand_in_us']:.0f}", "<= 80",
            costs["stand_in_us"] <= 80),
        row("frontend CPU per request / transport's (x64)", f"{frontend / transport_cpu:.2f}",
            "<= 1.3", frontend <= 1.3 * transport_cpu),
        row("projection at 16 cores (req/s)", f"{costs['projection'][16]:,.0f}", ">= 20,000",
            costs["projection"][16] >= 20_000),
    ]  # fmt: skip


def _auto_frontends() -> int:
    from gradserve.server.config import ServerConfig

    return ServerConfig().frontend_count()
