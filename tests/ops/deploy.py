"""The deploy/ files and docs/production.md, and the metric names and PromQL they hold."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST = PROMETHEUS_DIR / "alerts_test.yml"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "surge.json"
SYSTEMD_UNIT = ROOT / "deploy" / "systemd" / "surge.service"
PRODUCTION_DOC = ROOT / "docs" / "production.md"

METRIC_NAME = re.compile(r"\bsurge:[A-Za-z_][A-Za-z0-9_:]*")
# a metric and its label matchers: surge:x{a="b", c=~"d"}
SELECTOR = re.compile(r"(surge:[A-Za-z_][A-Za-z0-9_:]*)\{([^}]*)\}")
# Grafana's variables, as a query is run with every variable at "All"
DASHBOARD_VARIABLES = {
    "$__rate_interval": "1m",
    "$instance": ".*",
    "$model": ".*",
    "$replica": ".*",
}


def alert_rules() -> list[dict]:
    """Every rule of alerts.yml."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """The dashboard's panels, rows left out."""
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_queries() -> list[str]:
    """Every PromQL of the dashboard: its panels' and its template variables'."""
    exprs = [t["expr"] for p in dashboard_panels() for t in p["targets"]]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            exprs.append(var["query"]["query"])
    return exprs


def runnable(expr: str) -> str:
    """A dashboard query as Prometheus runs it: variables replaced by their 'All' values."""
    for name, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def metric_names(*texts: str) -> set[str]:
    """The surge:* metric names in some texts."""
    return {name for text in texts for name in METRIC_NAME.findall(text)}


def alerts_test_series() -> list[str]:
    """The input series of alerts_test.yml."""
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    return [s["series"] for test in tests for s in test["input_series"]]
