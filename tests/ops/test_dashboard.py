"""The Grafana dashboard and its provisioning files: well formed, every query valid PromQL, per
model and replica. (That it covers every exported metric is checked against a live server in
test_live_prometheus.py.)"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from tests.ops.conftest import PrometheusTools
from tests.ops.deploy import (
    GRAFANA_DIR,
    SELECTOR,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    runnable,
)

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["uid"] == "surge" and board["title"] == "surge"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "model", "replica"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"], name
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard_panels():
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    def cells(panel: dict) -> set[tuple[int, int]]:
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        return {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }

    for a, b in itertools.combinations(dashboard()["panels"], 2):
        assert not cells(a) & cells(b), (a["title"], b["title"])


def test_every_selector_follows_the_instance_variable() -> None:
    """Each surge metric a panel reads is filtered by $instance (and the per-model and
    per-replica filters are checked against a live server's labels in test_live_prometheus)."""
    for expr in dashboard_queries():
        for name, matchers in SELECTOR.findall(expr):
            if "label_values(" in expr and "$instance" not in expr:
                continue  # the instance variable's own query
            assert 'instance=~"$instance"' in matchers, (name, expr)


def test_dashboard_queries_are_valid_promql(
    prometheus_tools: PrometheusTools, tmp_path: Path
) -> None:
    """Each panel query, its variables at 'All', parses (promtool checks it as a recording rule)."""
    exprs = [runnable(t["expr"]) for p in dashboard_panels() for t in p["targets"]]
    rules = [{"record": f"dashboard_check:query_{i}", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = prometheus_tools.promtool_run("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_files() -> None:
    """The datasource provisioned is the default Prometheus, and the dashboard provider reads
    a directory (where docs/production.md says to put surge.json)."""
    datasources = yaml.safe_load(
        (GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasources["apiVersion"] == 1
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["isDefault"] and source["url"]
    providers = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/surge.yml").read_text())
    assert providers["apiVersion"] == 1
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
