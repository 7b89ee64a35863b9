"""What an audit may send: an acknowledgement by default; means over at least two scored updates,
marked NOT DP-protected, where the site chose to release them; the server keeps nothing else."""

import pytest

from dpseg.auditresults import RELEASED_KEYS, acknowledgement, received, released_means


def _row(ssim: float, **extra) -> dict:
    return {"site": "site-1", "round": 0, "ssim": ssim, "psnr": 20.0, "mse": 0.01, "baseline_ssim": 0.5,
            "identified": 1.0, "patient_identified": 1.0, "baseline_identified": 0.0,
            "baseline_patient_identified": 0.0, "slice_rank": 1.0, "cohort_slices": 400, "patients_in_update": 1,
            **extra}


def test_means_are_released_over_two_scored_updates_or_more_and_never_ranks_or_counts():
    assert released_means([_row(0.4)]) is None  # one update of one slice: its own values
    assert released_means([_row(0.4), {"site": "site-1", "round": 1, "patients_in_update": 0}]) is None
    means = released_means([_row(0.4), _row(0.6)])
    assert set(means) == set(RELEASED_KEYS) and means["ssim"] == pytest.approx(0.5)


def test_the_acknowledgement_carries_no_value_unless_the_site_releases_means():
    means = released_means([_row(0.4), _row(0.6)])
    assert acknowledgement("none", means) == {"status": "kept at the site", "release": "none"}
    released = acknowledgement("aggregate", means)["released"]
    assert released["dp_protected"] is False and "NOT DP-protected" in released["note"]
    assert "released" not in acknowledgement("aggregate", None)


def test_the_server_keeps_only_the_acknowledgement_and_marked_means():
    reply = {"status": "kept at the site", "release": "aggregate", "slice_rank": 3, "cohort_slices": 400,
             "released": {"dp_protected": True, "means": {"ssim": 0.5, "slice_rank": 2.0, "batch_size": 1,
                                                          "psnr": float("nan")}}}
    kept = received(reply)
    assert set(kept) == {"status", "release", "released"} and kept["released"]["means"] == {"ssim": 0.5}
    assert kept["released"]["dp_protected"] is False
    assert "released" not in received({**reply, "release": "none"})  # released only by a site that chose to
