"""The alert rules: promtool checks them and runs their unit tests; each is tested and documented."""

from __future__ import annotations

import yaml

from tests.ops.conftest import PrometheusTools
from tests.ops.deploy import (
    ALERTS,
    ALERTS_TEST,
    PRODUCTION_DOC,
    PROMETHEUS_CONFIG,
    PROMETHEUS_DIR,
    alert_rules,
)

# what the issue asks for, each by the alert that answers it
REQUIRED_ALERTS = {
    "SurgeEngineDown",  # engine down
    "SurgeReplicaDown",  # replica down
    "SurgeReplicaCrashLoop",  # crash loop: the breaker opened
    "SurgeEngineRestarting",  # crash loop: restarts increasing
    "SurgeQueueGrowing",
    "SurgeTTFTHigh",
    "SurgeKVCacheFull",
    "SurgeHighErrorRate",
    "SurgeHighRejectionRate",
}


def test_promtool_check_rules(prometheus_tools: PrometheusTools) -> None:
    result = prometheus_tools.promtool_run("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_test_rules(prometheus_tools: PrometheusTools) -> None:
    """The rules' unit tests over synthetic series (alerts_test.yml): each alert fires when it
    should, with its labels and annotations, and stays quiet in the look-alike cases."""
    result = prometheus_tools.promtool_run("test", "rules", ALERTS_TEST.name, cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_example_prometheus_config(prometheus_tools: PrometheusTools) -> None:
    """The example prometheus.yml is valid and loads alerts.yml; its job is the rules' "surge"."""
    result = prometheus_tools.promtool_run(
        "check", "config", PROMETHEUS_CONFIG.name, cwd=PROMETHEUS_DIR
    )
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert [job["job_name"] for job in config["scrape_configs"]] == ["surge"]


def test_every_alert_is_labelled_tested_and_documented() -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)), names
    assert REQUIRED_ALERTS <= set(names)
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {
        case["alertname"] for t in tests for case in t["alert_rule_test"] if case["exp_alerts"]
    }
    doc = PRODUCTION_DOC.read_text()
    for rule in rules:
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description"} <= set(rule["annotations"]), name
        assert name in tested, f"{name}: no case of alerts_test.yml sees it fire"
        assert f"`{name}`" in doc, f"{name} is not explained in {PRODUCTION_DOC.name}"
