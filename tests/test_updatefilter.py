"""The server's update filter: what is never aggregated."""

import numpy as np
import pytest

from dpseg.updatefilter import update_problem

SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,)}
FACTS = {"dp": True, "epsilon": 2.5, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.25, "steps": 24}
DP_META = {"privacy": FACTS}


def good():
    return {"conv.weight": np.zeros((4, 1, 3, 3), np.float32), "conv.bias": np.ones(4, np.float32)}


def test_a_good_update_passes():
    assert update_problem(good(), DP_META, SHAPES, require_privacy=True, max_epsilon=8.0) is None
    assert update_problem(good(), {}, SHAPES, require_privacy=False, max_epsilon=None) is None


@pytest.mark.parametrize("damage, reason", [
    (lambda d: d["conv.bias"].__setitem__(0, np.nan), "non-finite"),
    (lambda d: d["conv.weight"].__setitem__((0, 0, 0, 0), np.inf), "non-finite"),
    (lambda d: d.pop("conv.bias"), "missing parameters: conv.bias"),
    (lambda d: d.__setitem__("extra.weight", np.zeros(2)), "unexpected parameters: extra.weight"),
    (lambda d: d.__setitem__("conv.bias", np.zeros(5)), "wrong shape for conv.bias"),
])
def test_damaged_updates_are_rejected(damage, reason):
    data = good()
    damage(data)
    assert reason in update_problem(data, DP_META, SHAPES, require_privacy=False, max_epsilon=None)


@pytest.mark.parametrize("meta, reason", [
    ({}, "no privacy meta"),
    ({"privacy": None}, "no privacy meta"),
    ({"privacy": {"dp": False, "unit": "patient"}}, "without DP"),
    ({"privacy": {"dp": False, "epsilon": 1.0}}, "without DP"),
    ({"privacy": {**FACTS, "epsilon": 8.01}}, "above the job's target 8.0"),
    ({"privacy": {**FACTS, "epsilon": float("nan")}}, "above the job's target"),
    ({"privacy": {"dp": True, "epsilon": 2.5}}, "unreadable privacy meta: privacy meta of a DP update without"),
    ({"privacy": {**FACTS, "patients": 40}}, "unknown key(s) ['patients']"),  # nothing beyond the documented facts
    ({"privacy": {**FACTS, "steps": "24"}}, "steps must be a int"),
    ({"privacy": [1, 2]}, "must be a mapping"),
])
def test_dp_job_updates_need_their_privacy_meta_within_the_target(meta, reason):
    assert reason in update_problem(good(), meta, SHAPES, require_privacy=True, max_epsilon=8.0)
