"""A live `surge serve` against the deploy/ files: the dashboard shows every metric it exports
and reads none it doesn't, and a real Prometheus scraping it with alerts.yml fires
SurgeEngineDown once the engine core is killed for good."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
import yaml

from tests.ops.conftest import PrometheusTools
from tests.ops.deploy import (
    ALERTS,
    PRODUCTION_DOC,
    SELECTOR,
    alert_rules,
    alerts_test_series,
    dashboard_panels,
    dashboard_queries,
    metric_names,
    runnable,
)
from tests.server.conftest import TINY_ARGS
from tests.server.utils import RemoteSurgeServer, free_port, remote_server
from tests.tiny_models import make_tiny_model_dir

_T = TypeVar("_T")

MODEL = "tiny"
# Generous: a core restart loads torch and the model in a fresh process on a busy 2-core machine.
# Nothing is timed against these; they only turn a hang into a failure.
WAIT_S = 240.0
# One crash is restarted, the second opens the breaker: the engine is then down for good
# (--engine-max-restarts must be at least 1).
SERVER_ARGS = [
    *TINY_ARGS,
    "--served-model-name",
    MODEL,
    "--engine-max-restarts",
    "1",
    "--engine-restart-window",
    "3600",
]
# SurgeEngineDown waits 1m before firing; here 30 s, so both of its states are seen: long enough
# that a restart on a loaded CI machine (the core reloading its model) never fires it, short
# enough that the test doesn't wait the real rule's minute.
TEST_FOR = "30s"
SCRAPE_INTERVAL = "1s"


def wait_for(condition: Callable[[], _T | None], what: str, log: Callable[[], str]) -> _T:
    """Poll until `condition()` is truthy; fail with `log()` past WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            value = condition()
            if value:
                return value
        time.sleep(0.5)
    pytest.fail(f"no {what} after {WAIT_S:.0f}s:\n{log()}")


@dataclass
class Exported:
    """What /metrics says: each family's type, and each sample name's label names."""

    types: dict[str, str]
    labels: dict[str, set[str]]

    @classmethod
    def parse(cls, text: str) -> Exported:
        types, labels = {}, {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split()
                if not name.endswith("_created"):  # the client's creation-time gauges
                    types[name] = kind
            elif line and not line.startswith("#"):
                name, _, rest = line.partition("{")
                labels.setdefault(name, set()).update(re.findall(r'(\w+)="', rest))
        return cls(types, labels)

    def sample_names(self, family: str) -> set[str]:
        if self.types[family] == "histogram":
            return {f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        return {family}

    def names(self) -> set[str]:
        """Every name a query may use: families and their samples."""
        return set(self.types).union(*(self.sample_names(f) for f in self.types))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RemoteSurgeServer, str]]:
    """The tiny model served with one restart allowed, after one finished request; and its
    /metrics text at that point (the Prometheus test later kills its core)."""
    model_dir = make_tiny_model_dir(tmp_path_factory.mktemp("ops-tiny"))
    with remote_server(model_dir, SERVER_ARGS) as server:
        server.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        yield server, httpx.get(server.url("/metrics"), timeout=10).text


@pytest.fixture(scope="module")
def exported(served: tuple[RemoteSurgeServer, str]) -> Exported:
    return Exported.parse(served[1])


def test_dashboard_shows_every_exported_metric(exported: Exported) -> None:
    on_dashboard = metric_names(*dashboard_queries())
    missing = [f for f in exported.types if not exported.sample_names(f) & on_dashboard]
    assert not missing, f"exported but on no dashboard panel: {missing}"


def test_rules_dashboard_and_docs_name_only_exported_metrics(exported: Exported) -> None:
    texts = {
        "dashboard": dashboard_queries(),
        "alerts.yml": [rule["expr"] for rule in alert_rules()],
        "alerts_test.yml": alerts_test_series(),
        "docs/production.md": [PRODUCTION_DOC.read_text()],
    }
    for where, exprs in texts.items():
        unknown = metric_names(*exprs) - exported.names()
        assert not unknown, f"{where} names metrics surge does not export: {sorted(unknown)}"


def test_dashboard_filters_by_model_and_replica(exported: Exported) -> None:
    """A metric labelled by model (replica) is always read through the $model ($replica)
    variable, so each panel follows the dashboard's model and replica choice."""
    for panel in dashboard_panels():
        for target in panel["targets"]:
            for name, matchers in SELECTOR.findall(target["expr"]):
                labels = exported.labels.get(name, set())
                for label in {"model", "replica"} & labels:
                    assert f'{label}=~"${label}"' in matchers, (panel["title"], name, label)


# ---- a real Prometheus ----------------------------------------------------------------------


class Prometheus:
    """`prometheus` on a free 127.0.0.1 port with its storage in `workdir`; stopped by PID."""

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, path: str, **params: str) -> dict:
        body = httpx.get(self.base_url + path, params=params, timeout=10).json()
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.get("/api/v1/query", query=expr)["result"]

    def alerts(self, name: str, state: str) -> list[dict]:
        return [
            a
            for a in self.get("/api/v1/alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == state
        ]

    def is_ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}:\n{self.read_log()}")
        return httpx.get(self.base_url + "/-/ready", timeout=5).status_code == 200

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


def write_config(workdir: Path, target: str) -> Path:
    """prometheus.yml scraping `target` every second, and a copy of alerts.yml in which
    SurgeEngineDown waits TEST_FOR instead of its minute."""
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == "SurgeEngineDown":
                rule["for"] = TEST_FOR
    (workdir / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [{"job_name": "surge", "static_configs": [{"targets": [target]}]}],
    }
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def prometheus(
    prometheus_tools: PrometheusTools,
    served: tuple[RemoteSurgeServer, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    """A real Prometheus scraping the served model with deploy/prometheus/alerts.yml, once it
    has scraped replica 0 ready."""
    server = served[0]
    workdir = tmp_path_factory.mktemp("prometheus")
    config = write_config(workdir, f"127.0.0.1:{server.port}")
    prom = Prometheus(prometheus_tools.prometheus, config, workdir)
    try:
        wait_for(prom.is_ready, "ready Prometheus", prom.read_log)
        wait_for(
            lambda: [r for r in prom.query("surge:replica_ready") if r["value"][1] == "1"],
            "scrape of a ready replica",
            prom.read_log,
        )
        yield prom
    finally:
        prom.close()


def kill_core(server: RemoteSurgeServer) -> int:
    """SIGKILL the engine core; its PID, once the server has reaped it."""
    pid = server.core_pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), "reaped core", server.read_log)
    # gone and reaped: the PID may be reused, so the server's close() must not signal it
    server._pids_seen.discard(pid)
    return pid


def new_ready_core(server: RemoteSurgeServer, old_pid: int) -> int | None:
    if httpx.get(server.url("/ready"), timeout=5).status_code != 200:
        return None
    with contextlib.suppress(RuntimeError):
        pid = server.core_pid()
        return pid if pid != old_pid else None
    return None


@pytest.mark.slow
def test_engine_down_alert_fires(
    served: tuple[RemoteSurgeServer, str], prometheus: Prometheus
) -> None:
    """Kill the core: surge restarts it (SurgeEngineDown stays quiet). Kill it again: the
    breaker opens, replica_ready drops to 0 for good, and Prometheus fires SurgeEngineDown for
    the model (and SurgeReplicaCrashLoop for its replica)."""
    server = served[0]

    def log() -> str:
        return f"surge:\n{server.read_log()}\nprometheus:\n{prometheus.read_log()}"

    assert not prometheus.alerts("SurgeEngineDown", "firing")
    first = kill_core(server)
    wait_for(lambda: new_ready_core(server, first), "restarted core", log)
    wait_for(
        lambda: [
            r for r in prometheus.query("surge:engine_restarts_total") if r["value"][1] == "1"
        ],
        "scraped restart",
        log,
    )
    wait_for(
        lambda: [r for r in prometheus.query("surge:replica_ready") if r["value"][1] == "1"],
        "scrape of the restarted replica ready",
        log,
    )
    assert not prometheus.alerts("SurgeEngineDown", "firing")

    kill_core(server)
    firing = wait_for(lambda: prometheus.alerts("SurgeEngineDown", "firing"), "firing alert", log)
    (alert,) = firing
    assert alert["labels"]["model"] == MODEL and alert["labels"]["severity"] == "critical"
    assert alert["labels"]["job"] == "surge"
    assert alert["annotations"]["summary"].startswith(f"{MODEL} on 127.0.0.1:{server.port}")
    (loop,) = wait_for(
        lambda: prometheus.alerts("SurgeReplicaCrashLoop", "firing"), "crash loop", log
    )
    assert loop["labels"]["replica"] == "0"
    assert httpx.get(server.url("/ready"), timeout=5).status_code == 503


def test_dashboard_queries_run_on_prometheus(prometheus: Prometheus) -> None:
    """Every dashboard query, its variables at 'All', runs on the real Prometheus; the ones
    reading gauges return the served model's series."""
    for expr in dashboard_queries():
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        prometheus.query(runnable(expr))
    for gauge in ("surge:num_requests_running", "surge:kv_cache_usage_perc"):
        (series,) = prometheus.query(runnable(f'{gauge}{{model=~"$model"}}'))
        assert series["metric"]["model"] == MODEL
