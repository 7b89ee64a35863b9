import numpy as np
import pytest
from scipy.stats import norm

from dpseg.tools.onerun import gaussian_estimate, gdp_delta, gdp_epsilon, one_run_bound, one_run_figures, p_value


def test_gaussian_dp_conversions():
    # mu-GDP: delta(0) = 2 Phi(mu / 2) - 1, and gdp_epsilon inverts gdp_delta, also for a large mu
    assert gdp_delta(0.0, 1.0) == pytest.approx(2 * norm.cdf(0.5) - 1)
    assert gdp_delta(gdp_epsilon(1.63, 1e-5), 1.63) == pytest.approx(1e-5, rel=1e-6)
    assert gdp_epsilon(0.0, 1e-5) == 0.0
    assert 40 < gdp_epsilon(6.26, 1e-5) < gdp_epsilon(15.6, 1e-5) < 200


def test_the_one_run_bound_catches_a_separation_and_never_a_coin():
    rng = np.random.default_rng(0)
    member = rng.random(1000) < 0.5
    perfect = one_run_bound(member.astype(float), member, 1e-5)
    # perfect guesses of 1,000 canaries cannot confirm more than about 4.6 (Bonferroni over the guesses tried)
    assert 4.0 < perfect["epsilon_lower_bound_one_run"] < 6.0 and perfect["correct"] == perfect["guesses"]
    coin = one_run_bound(rng.normal(size=1000), member, 1e-5)
    assert coin["epsilon_lower_bound_one_run"] < 0.5
    # 90 right of 100 guesses: unlikely if the run were 1-DP (accuracy at most 0.73), plausible if 2-DP (0.88)
    assert 0 <= p_value(1000, 100, 90, 1.0, 1e-5) < 0.01 < 0.1 < p_value(1000, 100, 90, 2.0, 1e-5) <= 1


def test_the_estimate_recovers_the_epsilon_of_a_gaussian_mechanism():
    rng = np.random.default_rng(1)
    member = rng.random(20000) < 0.5
    scores = rng.normal(size=20000) + 1.56 * member
    assert gaussian_estimate(scores[member], scores[~member], 1e-5) == pytest.approx(gdp_epsilon(1.56, 1e-5), abs=0.3)
    figures = one_run_figures(scores, member, 1e-5)
    assert figures["one_run_canaries"] == 20000 and figures["one_run_in"] == int(member.sum())
    assert gaussian_estimate(np.ones(5), np.zeros(5), 1e-5) == 200.0  # a perfect separation is capped


def test_a_canary_in_the_update_sum_scores_high_whatever_the_sign_convention_of_updates():
    import torch

    from dpseg.bundle import Bundle
    from dpseg.canaries import CanarySet, trained_parameters
    from dpseg.tools.onerun import site_scores

    named = trained_parameters(Bundle().network())
    canaries = CanarySet(10, 4, "site-1", [p.numel() for _, p in named])
    # a weight difference after a step on canary 3's gradient: minus the learning rate times u_3
    step = -0.01 * canaries.direction(3)
    sums = {n: chunk.reshape(p.shape).numpy() for (n, p), chunk in zip(named, torch.split(step, canaries.sizes))}
    scores, member = site_scores(sums, 10, 4, "site-1", "all")
    assert scores[3] == pytest.approx(1.0, abs=1e-5) and np.array_equal(member, canaries.member)
