import inspect
import json

import pytest

from dpseg.ledger import Ledger
from dpseg.privacy import (ADJACENCY, CACHE_ENV, Accountant, PrivacyError, calibrate, check_cohort, continue_accountant,
                           replan)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_calibration_reaches_but_never_exceeds_the_target(accountant, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))  # nothing kept: the search itself
    for target, steps in ((8.0, 300), (1.0, 300)):
        s = calibrate(target, 1e-5, 1.0, 16, 16 / 84, steps, accountant)
        eps = Accountant(s).epsilon_after(steps)
        assert target - 0.01 <= eps <= target  # close to the target, not wastefully noisy
        assert s.sample_rate == pytest.approx(16 / 84)


def test_a_kept_calibration_saves_the_search_but_is_checked_every_time(tmp_path, monkeypatch):
    import dpseg.privacy as privacy

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first = calibrate(1.0, 1e-5, 1.0, 16, 0.25, 900)
    (kept,) = (tmp_path / "calibration").glob("*.json")
    searches = []
    real = privacy.noise_multiplier
    monkeypatch.setattr(privacy, "noise_multiplier", lambda *a: searches.append(a) or real(*a))
    assert calibrate(1.0, 1e-5, 1.0, 16, 0.25, 900) == first and searches == []  # kept: no search
    for edited in (first.noise_multiplier * 0.9, first.noise_multiplier * 3, "x"):
        kept.write_text(json.dumps({"noise_multiplier": edited}))  # too little noise, too much, nonsense
        assert calibrate(1.0, 1e-5, 1.0, 16, 0.25, 900).noise_multiplier == pytest.approx(first.noise_multiplier)
    assert len(searches) == 3  # each edited file was searched again, and the search result kept
    assert json.loads(kept.read_text())["noise_multiplier"] == pytest.approx(first.noise_multiplier)


def test_smaller_epsilon_needs_more_noise():
    sigmas = [calibrate(eps, 1e-5, 1.0, 16, 16 / 84, 100).noise_multiplier for eps in (8.0, 3.0, 1.0)]
    assert sigmas[0] < sigmas[1] < sigmas[2]


def test_accountant_continues_across_rounds_and_restarts():
    s = calibrate(8.0, 1e-5, 1.0, 16, 16 / 84, 60)
    acc = Accountant(s)
    seen = []
    for _ in range(3):  # three rounds of 20 steps, saved and restored in between
        acc.step(20)
        seen.append(acc.epsilon())
        acc = Accountant.from_state(json.loads(json.dumps(acc.state())))
    assert seen[0] < seen[1] < seen[2] <= 8.0
    assert seen[2] == pytest.approx(Accountant(s).epsilon_after(60))
    assert acc.steps == 60
    with pytest.raises(PrivacyError, match="planned 60 steps"):
        acc.step(1)
    older = {"settings": acc.state()["plan"], "history": acc.state()["history"]}  # a ledger written earlier
    assert Accountant.from_state(older).epsilon() == acc.epsilon()


def test_calibration_refuses_unsafe_settings():
    with pytest.raises(PrivacyError, match="delta"):
        check_cohort(calibrate(8.0, 0.05, 1.0, 4, 4 / 40, 10), 40)
    with pytest.raises(PrivacyError, match="sample_rate"):
        calibrate(8.0, 1e-5, 1.0, 50, 50 / 40, 10)
    with pytest.raises(PrivacyError, match="batch_size"):
        calibrate(8.0, 1e-5, 1.0, 0, 0.1, 10)
    with pytest.raises(PrivacyError, match="accountant"):
        calibrate(8.0, 1e-5, 1.0, 4, 4 / 40, 10, "gdp")


def test_calibration_depends_on_public_settings_only_and_names_its_adjacency():
    # the same job settings give the same noise at sites of 40 and of 4000 patients: nothing the
    # site sends about its privacy depends on its number of training patients
    s = calibrate(8.0, 1e-5, 1.0, 16, 0.25, 480)
    assert s.adjacency == ADJACENCY == "add/remove one patient"
    for n in (40, 41, 4000):
        check_cohort(s, n)
    assert "n_patients" not in inspect.signature(calibrate).parameters


def test_settings_cannot_change_after_calibration():
    s = calibrate(8.0, 1e-5, 1.0, 16, 16 / 84, 60)
    s.check_same(batch_size=16, max_grad_norm=1.0, noise_multiplier=s.noise_multiplier)
    for change in ({"batch_size": 32}, {"max_grad_norm": 2.0}, {"noise_multiplier": s.noise_multiplier / 2}):
        with pytest.raises(PrivacyError, match="refused"):
            s.check_same(**change)
    with pytest.raises(PrivacyError, match="unknown privacy setting"):
        s.check_same(sigma_override=0.0)


def test_a_stopped_job_continues_its_saved_accountant_from_the_ledger(tmp_path):
    s = calibrate(4.0, 1e-5, 1.0, 16, 16 / 84, 30)
    Ledger.create(tmp_path / "l.json", 10.0)
    ledger = Ledger.open(tmp_path / "l.json")
    ledger.reserve("job-a", s)
    first = Accountant(s)
    first.step(10)
    ledger.record("job-a", first)
    ledger = Ledger.open(tmp_path / "l.json")  # the site restarts
    same = dict(target_epsilon=4.0, delta=1e-5, max_grad_norm=1.0, batch_size=16, sample_rate=16 / 84, accountant="prv")
    assert continue_accountant(ledger, "job-b", 20, **same) is None  # nothing saved for another job
    acc = continue_accountant(ledger, "job-a", 20, **same)
    assert acc.steps == 10 and acc.epsilon() == pytest.approx(first.epsilon()) and acc.epsilon() > 0
    acc.step(20)
    ledger.record("job-a", acc)
    assert ledger.spent()[0] == pytest.approx(Accountant(s).epsilon_after(30))
    ledger.note_continuation("job-a", "job-a2")
    assert Ledger.open(tmp_path / "l.json").jobs["job-a"]["continued_by"] == ["job-a2"]
    # the plan is used up (its site trained rounds the server never completed): more steps get more noise
    more = continue_accountant(ledger, "job-a", 10, **same)
    assert more.steps == 30 and more.plan.steps == 40 and more.plan.noise_multiplier > s.noise_multiplier
    before = more.epsilon()
    more.step(10)
    assert before < more.epsilon() <= 4.0
    with pytest.raises(PrivacyError, match="step 41 refused"):
        more.step(1)
    overspent = Accountant(s, [(s.noise_multiplier / 2, s.sample_rate, 30)])
    with pytest.raises(PrivacyError, match="no noise fits 10 more steps: refused"):
        replan(overspent, 10)
    with pytest.raises(PrivacyError, match="cannot continue ledger entry job-a.*sample_rate"):
        continue_accountant(ledger, "job-a", 0, **{**same, "sample_rate": 16 / 90})


def test_reconstruction_bounds():
    from dpseg.privacy import reconstruction_bound, reconstruction_bound_eps_delta

    chance = 1 / 1000
    assert reconstruction_bound_eps_delta(0.0, 0.0, chance) == pytest.approx(chance)
    assert reconstruction_bound_eps_delta(1.0, 1e-5, chance) == pytest.approx(2.718281828 * chance + 1e-5)
    assert reconstruction_bound_eps_delta(8.0, 1e-5, chance) == 1.0  # vacuous at epsilon 8 for 1000 slices
    # the tight bound: more noise -> closer to chance; more steps -> larger; no chance -> nothing
    strong = reconstruction_bound([(10.0, 0.02, 100)], chance)
    weak = reconstruction_bound([(0.8, 0.02, 100)], chance)
    assert chance < strong < weak < 1.0
    assert reconstruction_bound([(0.8, 0.02, 400)], chance) > weak
    assert reconstruction_bound([(0.8, 0.02, 100)], 0.0) == 0.0
    with pytest.raises(ValueError, match="a probability"):
        reconstruction_bound([(0.8, 0.02, 100)], 1.5)


@pytest.mark.parametrize("q, sigma, kappa", [(1.0, 1.0, 1e-3), (0.25, 1.0, 1e-3), (0.25, 0.5, 1e-2), (0.5, 2.0, 5e-4)])
def test_the_tight_reconstruction_bound_of_one_step_is_its_closed_form(q, sigma, kappa):
    """One step of the Poisson-subsampled Gaussian: the best test of 'in' against 'out' at level
    kappa rejects for large x (Neyman-Pearson), so the bound is (1 - q) kappa + q Phi(Phi^-1(kappa) + 1/sigma);
    computed here by hand, not by the accountant. The accountant's profile, taken from above, gives
    at most 2% more (its discretisation: e^0.01 and 1e-9)."""
    from scipy.stats import norm

    from dpseg.privacy import reconstruction_bound

    closed = (1 - q) * kappa + q * norm.cdf(norm.ppf(kappa) + 1 / sigma)
    assert closed <= reconstruction_bound([(sigma, q, 1)], kappa) <= closed * 1.02 + 1e-8


def test_the_tight_bound_at_the_demo_job_is_far_below_the_loose_one():
    from dpseg.privacy import reconstruction_bound, reconstruction_bound_eps_delta

    demo = [(2.476, 0.25, 240)]  # jobs/fed_dp at epsilon 8: 10 rounds x 24 steps, rate 0.25
    assert reconstruction_bound(demo, 1 / 1512) < 0.1 < reconstruction_bound_eps_delta(8.0, 1e-5, 1 / 1512) == 1.0
