"""surge on Ray Serve, on a real local Ray cluster (num_cpus=2, no dashboard) inside a network
namespace with only loopback up: tests/serving/ray_scenarios.py runs every scenario on one
cluster (Ray's start-up costs seconds) and these tests read what it saw."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="Ray Serve (the surge[ray] extra)")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SCENARIO_TIMEOUT_S = 720


def _netns_works() -> str | None:
    """Why a user + network namespace can't be made here, or None."""
    if shutil.which("unshare") is None:
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"can't make a network namespace: {probe.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def seen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    why = _netns_works()
    if why is not None:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("ray")
    out = work / "result.json"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            "unshare",
            "-rn",
            sys.executable,
            "-m",
            "tests.serving.ray_scenarios",
            str(out),
            str(work),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=SCENARIO_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # Ray's processes are in its session
        log, _ = proc.communicate()
    results = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode != 0 or "error" in results:
        pytest.fail(f"the Ray scenarios failed: {results.get('error')}\n{log[-6000:]}")
    yield results


def test_a_stream_through_serve_is_the_plain_answer_and_ends_with_done(
    seen: dict[str, Any],
) -> None:
    stream = seen["stream"]
    assert stream["done"] and stream["errors"] == []
    assert stream["text"] == stream["plain"] and stream["text"]


def test_a_client_that_disconnects_is_aborted_on_its_remote_host(seen: dict[str, Any]) -> None:
    # each client that left ended its sequence on the host; a cancel Ray lost (best effort)
    # let one run to its end, but never every time
    disconnect = seen["disconnect"]
    assert disconnect["work"] == 0
    assert disconnect["aborts"][-1] == 1, disconnect


def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(seen: dict[str, Any]) -> None:
    assert seen["replicas_before"] == 1
    assert seen["replicas_under_load"] == 2
    assert seen["replicas_after_load"] <= 1


def test_an_idle_model_scales_to_zero_and_a_request_wakes_it(seen: dict[str, Any]) -> None:
    assert seen["replicas_idle"] == 0
    assert seen["woken_answer"] == seen["stream"]["plain"]  # it waited, it did not fail
    assert seen["replicas_woken"] >= 1


def test_streams_of_a_killed_replica_go_on_elsewhere_with_the_same_text(
    seen: dict[str, Any],
) -> None:
    streams = seen["streams"]
    assert streams, "no stream ran under load"
    for stream in streams:
        assert stream["done"] and stream["errors"] == [] and stream["same"], stream
    # its streams moved (no stream was lost or ended with an error)
    failovers = sum(float(line.rsplit(" ", 1)[1]) for line in seen["failovers_metric"])
    assert failovers >= 1
    assert seen["after_kill_plain"] == seen["stream"]["plain"]  # Serve replaced it; all serve


def test_metrics_have_a_row_per_engine_replica(seen: dict[str, Any]) -> None:
    labels = sorted(line.split('replica="', 1)[1].split('"', 1)[0] for line in seen["ready_rows"])
    ids = sorted(name.rsplit("#", 1)[1] for name in seen["host_actors"])
    assert labels == ids and len(ids) == 2  # Serve's replica ids, each ready


def test_embeddings_through_serve_equal_a_local_encoder_worker(seen: dict[str, Any]) -> None:
    served = np.array(seen["embeddings_served"])
    local = np.array(seen["embeddings_local"]["rows"])
    assert served.shape == local.shape == (3, 32)
    np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-6)
    assert seen["encoder_replicas"] == 1  # its own deployment, not the ingress's worker
    counts = {
        line.split("{", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in seen["encoder_metrics"]
    }
    # the replica's counts, reported with its replies: the batches a local worker ran for the
    # same calls (the bad input failed before any batch)
    assert counts == {
        "surge:encoder_batches_total": seen["embeddings_local"]["batches"],
        "surge:encoder_rows_total": seen["embeddings_local"]["num_rows"],
    }


def test_bad_embedding_input_through_serve_is_a_400_with_an_openai_error(
    seen: dict[str, Any],
) -> None:
    bad = seen["embeddings_bad"]
    assert bad["status"] == 400
    error = bad["body"]["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "input"
    # the worker's own words, as a local worker says them (no Ray traceback)
    assert error["message"] == seen["embeddings_local"]["bad"] and error["message"]
