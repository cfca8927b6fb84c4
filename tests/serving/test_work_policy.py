"""The Ray Serve autoscaling rule on the engines' own work (no cluster: the policy is a plain
callable over Serve's AutoscalingContext, faked here with the fields it reads)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve (the surge[ray] extra)")

from surge.router import ModelKind, ModelSpec  # noqa: E402
from surge.serving.ray import WORK_METRIC, RayScaling, WorkPolicy, model_scaling  # noqa: E402


def ctx(replicas: int, work: list[float], queued: float = 0.0, ongoing: float = 0.0) -> object:
    return SimpleNamespace(
        current_num_replicas=replicas,
        total_queued_requests=queued,
        total_num_requests=ongoing,
        aggregated_metrics={WORK_METRIC: {f"r{i}": w for i, w in enumerate(work)}},
        policy_state={},
    )


@pytest.mark.parametrize(
    ("replicas", "work", "queued", "want"),
    [
        (1, [0.0], 0.0, 0),  # idle: Serve keeps min_replicas, or scales to zero after its delay
        (1, [4.0], 0.0, 1),  # at the target
        (1, [5.0], 0.0, 2),  # over it
        (2, [8.0, 7.0], 2.0, 5),  # calls queued at handles count as work too
        (3, [1.0, 0.0, 0.0], 0.0, 1),
    ],
)
def test_replicas_are_the_work_over_the_target(
    replicas: int, work: list[float], queued: float, want: int
) -> None:
    assert WorkPolicy(target_work=4)(ctx(replicas, work, queued))[0] == want  # type: ignore[arg-type]


def test_a_model_scaled_to_zero_starts_a_replica_for_a_waiting_request() -> None:
    policy = WorkPolicy(target_work=16)
    assert policy(ctx(0, [], ongoing=1.0))[0] == 1  # type: ignore[arg-type]
    assert policy(ctx(0, [], queued=1.0))[0] == 1  # type: ignore[arg-type]
    assert policy(ctx(0, []))[0] == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("own", "flags", "want"),
    [
        ((None, None), (1, 2), (1, 2)),  # the flags'
        ((0, 4), (1, 2), (0, 4)),  # the model's own, from surge.toml
        ((None, 1), (2, 3), (1, 1)),  # a max below the flags' min takes the min with it
        ((3, None), (1, 2), (3, 3)),  # a min above the flags' max takes the max with it
    ],
)
def test_a_model_s_own_bounds_win_over_the_flags(
    own: tuple[int | None, int | None], flags: tuple[int, int], want: tuple[int, int]
) -> None:
    spec = ModelSpec("m", "/m", ModelKind.CHAT, min_replicas=own[0], max_replicas=own[1])
    scaling = model_scaling(spec, RayScaling(min_replicas=flags[0], max_replicas=flags[1]))
    assert (scaling.min_replicas, scaling.max_replicas) == want
