"""The Grafana dashboard and the Prometheus alert rules in deploy/: every metric their queries
name is one the server exports, and each alert fires when it should (promtool's rule tests,
where promtool is installed: `make promtool`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from prometheus_client.core import Metric

from gradserve.client import GradientClient

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gradserve.json"
RULES = ROOT / "deploy" / "prometheus"
PROMTOOL = ROOT / "build" / "promtool" / "usr" / "bin" / "promtool"
# Series Prometheus itself makes for each scrape target.
PROMETHEUS_OWN = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}  # fmt: skip


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers, ranges and grouping clauses that are not functions, keywords or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group() in _KEYWORDS:
            continue
        if re.fullmatch(r"[0-9]*e[0-9]*", match.group()):  # an exponent's tail: 1e-9
            continue
        names.add(match.group())
    return names


def test_the_parser_finds_exactly_the_metrics():
    expression = (
        'histogram_quantile(0.99, sum by (le, hop) (rate(a_bucket{instance=~"$x", hop!="q"}'
        "[$__rate_interval]))) / clamp_min(sum(rate(b_total[5m])), 1e-9) > 0.5 or up == 0"
    )
    assert metric_names(expression) == {"a_bucket", "b_total", "up"}


@pytest.fixture(scope="module")
def exported(server) -> set[str]:
    """Every series name the server exports, once it has answered both protocols."""
    with GradientClient(server.target) as client:
        client.evaluate(np.ones((2, 1), np.float32))
    with grpcclient.InferenceServerClient(server.target) as client:
        tensor = grpcclient.InferInput("x", [1, 1], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 1), np.float32))
        client.infer("quadratic", [tensor])
    names = set()
    family: Metric
    for family in server.server.metrics.registry.collect():
        names |= {sample.name for sample in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def _dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    return [(p["title"], t["expr"]) for p in panels for t in p["targets"]]


def _rules() -> list[dict]:
    document = yaml.safe_load((RULES / "alerts.yml").read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def assert_every_metric_exported(expressions: list[tuple[str, str]], exported: set[str]) -> None:
    """Each (where, PromQL) names at least one metric, and only metrics the server exports
    (or Prometheus's own)."""
    for where, expression in expressions:
        names = metric_names(expression)
        assert names, f"{where} names no metric: {expression}"
        missing = names - exported - PROMETHEUS_OWN
        assert not missing, f"{where} names {sorted(missing)}, which nothing exports"


def test_every_metric_the_dashboard_names_is_exported(exported):
    expressions = _dashboard_expressions()
    assert len(expressions) >= 20
    assert_every_metric_exported([(f"panel {t!r}", e) for t, e in expressions], exported)


def test_the_dashboard_is_well_formed():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in dashboard["panels"]:
        assert panel["title"] and {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
    covered = " ".join(expression for _, expression in _dashboard_expressions())
    wanted = ["gradserve_requests_total", "gradserve_request_hop_seconds_bucket",
              "gradserve_batch_rows_bucket", "gradserve_queue_rows", "gradserve_queue_bytes",
              "gradserve_batch_cost_per_row_seconds", "process_cpu_seconds_total"]  # fmt: skip
    assert all(name in covered for name in wanted)


def test_every_metric_the_alerts_name_is_exported(exported):
    rules = _rules()
    assert {r["alert"] for r in rules} >= {
        "GradserveQueueSaturated", "GradserveErrorRate", "GradserveEngineDown",
    }  # fmt: skip
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["for"]
        missing = metric_names(rule["expr"]) - exported - PROMETHEUS_OWN
        assert not missing, f"alert {rule['alert']} names {sorted(missing)}, which nothing exports"


def _promtool() -> str | None:
    return str(PROMTOOL) if PROMTOOL.exists() else shutil.which("promtool")


@pytest.mark.skipif(_promtool() is None, reason="promtool not installed (make promtool)")
def test_promtool_checks_the_rules_and_every_alert_fires_when_it_should():
    for command in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"]):
        done = subprocess.run([_promtool(), *command], cwd=RULES, capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr


def _autoscaling_expressions() -> list[tuple[str, str]]:
    """The PromQL of the KEDA triggers and of the prometheus-adapter rules (its templates
    filled in as the adapter fills them)."""
    folder = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "autoscaling"
    scaled = yaml.safe_load((folder / "keda-scaledobject.yaml").read_text())
    found = [(t["name"], t["metadata"]["query"]) for t in scaled["spec"]["triggers"]]
    adapter = yaml.safe_load((folder / "prometheus-adapter-rules.yaml").read_text())
    for rule in yaml.safe_load(adapter["data"]["config.yaml"])["rules"]:
        query = rule["metricsQuery"].replace("<<.GroupBy>>", "pod")
        found.append((rule["name"]["as"], query.replace("<<.LabelMatchers>>", 'pod="p"')))
        found.append((rule["name"]["as"] + " (series)", rule["seriesQuery"]))
    return found


def test_every_metric_the_autoscalers_name_is_exported(exported):
    expressions = _autoscaling_expressions()
    assert len(expressions) >= 4
    assert_every_metric_exported(expressions, exported)
