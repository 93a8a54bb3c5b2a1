"""`gradserve loadtest` against a live server: its JSON adds up, nothing fails."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.parametrize("mode", ["unary", "stream"])
def test_loadtest_json_counts_add_up(server, tmp_path, mode):
    out = tmp_path / "results.json"
    csv = tmp_path / "results.csv"
    run = subprocess.run(
        [sys.executable, "-m", "gradserve.server.cli", "loadtest", "--target", server.target,
         "--mode", mode, "--concurrency", "1,4", "--rows", "3", "--duration", "0.6",
         "--requests", "400", "--warmup", "0.1", "--json", str(out), "--csv", str(csv)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    steps = json.loads(out.read_text())
    assert [s["concurrency"] for s in steps] == [1, 4]
    for step in steps:
        assert step["mode"] == mode and step["errors"] == {}
        assert 0 < step["requests"] <= 400
        assert step["requests_per_s"] == pytest.approx(step["requests"] / step["seconds"])
        assert step["rows_per_s"] == pytest.approx(3 * step["requests_per_s"])
        lat = step["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert step["batch_rows"]["mean"] >= 3
        hops = step["breakdown_us"]
        assert hops["compute"] > 0 and hops["server"] > 0
        # Medians of parts need not add up exactly, but no part exceeds the server's total,
        # and the server's total fits in the client's latency.
        assert max(hops[h] for h in ("decode", "queue", "handoff", "compute")) <= hops["server"]
        assert hops["server"] <= lat["p99"] * 1e3
    assert len(csv.read_text().splitlines()) == 3
    assert "req/s" in run.stdout and "p99" in run.stdout
    assert "where the time went" in run.stdout and "handoff" in run.stdout


def test_loadtest_exits_non_zero_when_requests_fail(bundled_engine, tmp_path):
    from dataclasses import replace

    from conftest import TEST_CONFIG, GatedEngine, RunningServer

    gated = GatedEngine(bundled_engine)
    gated.gate.clear()
    with RunningServer(replace(TEST_CONFIG, max_queue_rows=4), gated) as running:
        run = subprocess.run(
            [sys.executable, "-m", "gradserve.client.loadtest", "--target", running.target,
             "--concurrency", "8", "--duration", "0.5", "--warmup", "0", "--timeout", "2",
             "--json", str(tmp_path / "r.json")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        gated.gate.set()
    assert run.returncode == 1
    errors = json.loads((tmp_path / "r.json").read_text())[0]["errors"]
    assert errors.get("RESOURCE_EXHAUSTED", 0) > 0
    assert "failed" in run.stderr
