"""The canary audit of the site's DP step: the bounds against hand computations, a canary through
the real step, a broken mechanism caught and the shipped one not, on a tiny job in seconds."""

import json
import math

import numpy as np
import pytest

from dpseg.tools.privacyaudit import (VARIANTS, Mechanism, canary_run, clopper_pearson, epsilon_of_rates,
                                      log_likelihood_ratios, lower_bounds, privacy_audit, wrong_verdicts)

TINY = Mechanism(epsilon=8.0, delta=1e-5, max_grad_norm=1.0, batch_size=4, sample_rate=0.25, local_steps=5, rounds=2)
SHIPPED, NOISE_OFF = VARIANTS[0], VARIANTS[1]


def test_the_bounds_against_hand_computations():
    # no success in n trials: the upper bound solves (1 - p)^n = alpha
    assert clopper_pearson(0, 100, 0.025)[1] == pytest.approx(1 - 0.025 ** (1 / 100))
    assert clopper_pearson(100, 100, 0.025)[0] == pytest.approx(0.025 ** (1 / 100))
    assert clopper_pearson(0, 100, 0.025)[0] == 0.0 and clopper_pearson(100, 100, 0.025)[1] == 1.0
    # TPR 0.9, FPR 0.01, delta 0: epsilon >= log(90), or log(0.99 / 0.1) from the complement
    assert epsilon_of_rates(0.9, 0.01, 0.0) == pytest.approx(math.log(90))
    assert epsilon_of_rates(0.5, 0.5, 0.0) == 0.0
    # one step: log((1 - q) + q exp((y C - C^2 / 2) / (sigma C)^2))
    q, c, sigma, y = 0.25, 1.0, 2.0, 0.7
    mech = Mechanism(8.0, 1e-5, c, 4, q, 1, 1)
    expected = math.log((1 - q) + q * math.exp((y * c - c * c / 2) / (sigma * c) ** 2))
    assert log_likelihood_ratios(np.array([[y]]), mech, sigma)[0] == pytest.approx(expected)


def test_a_canary_adds_its_clipped_direction_to_the_noised_sum_through_the_real_step():
    trace = canary_run(TINY, NOISE_OFF, 200, np.random.default_rng(0))
    p = trace.projections
    assert p.shape == (TINY.steps, 200)
    # without noise every projection is 0 or the clip norm: a canary of norm 10 C was clipped to C
    assert np.allclose(np.minimum(np.abs(p), np.abs(p - 1.0)), 0.0, atol=1e-5)
    assert np.all(np.abs(p[:, ~trace.member]) < 1e-6)  # an out canary's coordinate gets nothing
    hits = (p[:, trace.member] > 0.5).sum()
    assert hits == trace.sampled and 0.15 < hits / (trace.member.sum() * TINY.steps) < 0.35  # Poisson at q 0.25
    clipless = canary_run(TINY, VARIANTS[3], 50, np.random.default_rng(1))  # "clipping off"
    assert clipless.projections[:, clipless.member].max() > 5.0  # its 10 C went in whole (noise std 1-2 C)


def test_noise_off_is_caught_and_the_shipped_mechanism_is_not(tmp_path):
    results = privacy_audit(tmp_path, TINY, runs=1, canaries=600, variants=(SHIPPED, NOISE_OFF), progress=lambda m: None)
    shipped, broken = results["results"]
    assert not shipped["caught"] and shipped["epsilon_lower_bound"] <= 8.0 and shipped["epsilon_lower_bound_gdp"] <= 8.0
    assert broken["caught"] and broken["epsilon_lower_bound_gdp"] > 8.0
    assert shipped["noise_std_over_clip"] == pytest.approx(results["noise_multiplier"], rel=0.1)
    assert broken["noise_std_over_clip"] == 0.0 and broken["contribution_over_clip"] == pytest.approx(1.0, abs=1e-4)
    # the one-run audit of each: noise off is far above the claim, the shipped bound is not
    assert shipped["epsilon_lower_bound_one_run"] <= 8.0 and broken["estimate_above_claim"]
    assert shipped["one_run_canaries"] == broken["one_run_canaries"] == 1000
    assert wrong_verdicts(results) == []
    assert wrong_verdicts({"results": [{**broken, "caught": False, "estimate_above_claim": False}]}) == ["noise off"]
    for name in ("privacy_audit.json", "privacy_audit.md", "privacy_audit.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| noise off | yes |" in (tmp_path / "privacy_audit.md").read_text()


def test_thresholds_are_chosen_on_other_canaries_than_those_counted():
    rng = np.random.default_rng(0)
    member = rng.random(4000) < 0.5
    scores = rng.normal(size=4000)  # scores that know nothing: no bound above 0, whatever the threshold
    bounds = lower_bounds(scores, member, 1e-5)
    assert bounds["epsilon_lower_bound"] < 0.3 and bounds["canaries_in"] + bounds["canaries_out"] == 2000


def test_the_privacy_audit_command_audits_the_shipped_job(tmp_path):
    from conftest import run_cli

    done = run_cli("privacy-audit", "--out", str(tmp_path / "audit"), "--rounds", "1", "--runs", "1",
                   "--canaries", "100", "--shipped-only")
    assert done.returncode == 0, done.stderr
    assert "shipped: lower bound" in done.stdout and "not caught" in done.stdout
    results = json.loads((tmp_path / "audit" / "privacy_audit.json").read_text())
    assert results["claimed_epsilon"] == 8.0 and results["mechanism"]["local_steps"] == 24
    assert results["mechanism"]["rounds"] == 1
    assert [r["variant"] for r in results["results"]] == ["shipped"]
    bad = run_cli("privacy-audit", "--out", str(tmp_path / "x"), "--job", str(tmp_path / "no_such_job"))
    assert bad.returncode == 2 and "no_such_job" in bad.stderr


def test_the_one_run_audit_refuses_a_work_folder_with_an_earlier_run(tmp_path):
    from conftest import run_cli

    (tmp_path / "out" / "fl_work" / "job").mkdir(parents=True)
    done = run_cli("privacy-audit", "--fl", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "holds an earlier audit run" in done.stderr
