"""dpseg.jobprivacy: a site's privacy for one job (calibrate or continue, ledger, checks, meta)."""

import pytest

from dpseg.jobprivacy import JobPrivacy
from dpseg.ledger import Ledger
from dpseg.privacy import PrivacyError, calibrate
from dpseg.wire import PrivacyMeta


def _privacy(tmp_path, budget: float, job_id: str = "job-2", resumes: str | None = None) -> JobPrivacy:
    """site-1's privacy for job ``job_id`` (entry: the job id, or the stopped job's it ``resumes``):
    epsilon 8, delta 1e-5, batch 2, sample rate 0.5; a new ledger of total ``budget`` if none."""
    if not (tmp_path / "ledger.json").exists():
        Ledger.create(tmp_path / "ledger.json", budget)
    return JobPrivacy("site-1", tmp_path / "ledger.json", resumes or job_id, job_id, resumes is not None,
                      8.0, 1e-5, 1.0, 2, 0.5, "prv")


def test_a_refused_job_stays_refused_in_later_rounds(tmp_path):
    Ledger.create(tmp_path / "ledger.json", 10.0)
    Ledger.open(tmp_path / "ledger.json").reserve("job-1", calibrate(8.0, 1e-5, 1.0, 2, 2 / 4, 4))
    privacy = _privacy(tmp_path, 10.0)
    for _ in range(2):  # round after round
        with pytest.raises(PrivacyError, match="privacy budget exceeded"):
            privacy.start(steps=4, n_patients=4)
        assert not privacy.started


def test_an_accepted_job_is_calibrated_for_all_rounds_and_checks_each_round(tmp_path):
    privacy = _privacy(tmp_path, 20.0)
    assert "calibrated noise multiplier" in privacy.start(steps=3 * 2, n_patients=4)
    assert privacy.accountant.plan.steps == 3 * 2
    assert Ledger.open(tmp_path / "ledger.json").committed() == pytest.approx(8.0)
    privacy.check_round(None, 2, 0)
    with pytest.raises(PrivacyError, match="sample_rate=0.25: refused"):
        privacy.check_round({"sample_rate": 0.25}, 2, 0)  # the server may not change a setting
    privacy.accountant.step(6)
    with pytest.raises(PrivacyError, match="spent 6 of the 6 steps"):
        privacy.check_round(None, 2, 3)
    meta = PrivacyMeta.from_dict(privacy.meta())
    assert meta.dp and meta.steps == meta.planned_steps == 6 and meta.ledger_entry == "job-2" and meta.epsilon <= 8.0
    (tmp_path / "large").mkdir()  # delta 1e-5 is not below 1 / 100,000 patients: refused before the ledger
    with pytest.raises(PrivacyError, match="delta"):
        _privacy(tmp_path / "large", 20.0).start(6, n_patients=100_000)
    assert Ledger.open(tmp_path / "large" / "ledger.json").jobs == {}


def test_a_resumed_job_continues_the_stopped_jobs_accountant(tmp_path):
    stopped = _privacy(tmp_path, 20.0, job_id="job-1")
    stopped.start(steps=3 * 2, n_patients=4)  # planned 3 rounds x 2 steps
    stopped.accountant.step(2)  # round 0 done, then the job stopped
    stopped.record()
    spent = stopped.accountant.epsilon()
    resumed = _privacy(tmp_path, 20.0, job_id="job-7", resumes="job-1")
    assert "continuing ledger entry job-1" in resumed.start(steps=2 * 2, n_patients=4)  # the 2 rounds left
    assert resumed.accountant.steps == 2 and resumed.accountant.epsilon() == pytest.approx(spent) and spent > 0
    ledger = Ledger.open(tmp_path / "ledger.json")
    assert list(ledger.jobs) == ["job-1"] and ledger.jobs["job-1"]["continued_by"] == ["job-7"]
    assert ledger.committed() == pytest.approx(8.0)  # counted once
    resumed.accountant.step(4)
    resumed.record()
    # a site whose plan is used up (it trained a round the server never completed) continues with more noise
    # and the new plan covers every round left, not just the next one
    used_up = _privacy(tmp_path, 20.0, job_id="job-8", resumes="job-1")
    used_up.start(steps=2 * 2, n_patients=4)
    s = used_up.accountant.plan
    assert s.steps == 6 + 2 * 2 and s.noise_multiplier > stopped.accountant.plan.noise_multiplier
    used_up.accountant.step(2)
    used_up.accountant.step(2)
    assert used_up.accountant.epsilon() <= 8.0
    unknown = _privacy(tmp_path, 20.0, job_id="job-9", resumes="job-0")
    with pytest.raises(PrivacyError, match="resumes ledger entry job-0, which has no saved accountant"):
        unknown.start(steps=4, n_patients=4)
