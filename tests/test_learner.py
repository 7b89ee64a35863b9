import pytest

from dpseg.datalist import resolve
from dpseg.learner import SiteLearner
from dpseg.privacy import Ledger, PrivacyError, calibrate
from dpseg.site import SiteSettings


def _learner(cohort, tmp_path, budget):
    learner = SiteLearner(dp=True, target_epsilon=8.0, batch_size=2, local_epochs=1.0)
    datalist = cohort / "site-1" / "datalist.json"
    learner.settings = SiteSettings("site-1", datalist, tmp_path / "ledger.json", budget)
    learner.app_dir, learner.job_id = tmp_path, "job-2"
    learner.train_items = resolve(datalist, "training")
    learner.local_steps = 2
    return learner


def test_a_refused_job_stays_refused_in_later_rounds(cohort, tmp_path):
    first = Ledger.open(tmp_path / "ledger.json", 10.0)
    first.reserve("job-1", calibrate(8.0, 1e-5, 1.0, 2, 4, 4))
    learner = _learner(cohort, tmp_path, 10.0)
    for _ in range(2):  # round after round
        with pytest.raises(PrivacyError, match="privacy budget exceeded"):
            learner._start_privacy(num_rounds=2, fl_ctx=None)
        assert learner.accountant is None


def test_an_accepted_job_is_calibrated_for_all_rounds(cohort, tmp_path):
    learner = _learner(cohort, tmp_path, 20.0)
    learner._start_privacy(num_rounds=3, fl_ctx=None)
    assert learner.accountant.settings.steps == 3 * 2
    assert Ledger.open(tmp_path / "ledger.json", 20.0).committed() == pytest.approx(8.0)


@pytest.mark.parametrize("args, error, name", [
    ({"learning_rate": "$__import__('os').system('touch pwned')"}, TypeError, "learning_rate"),
    ({"batch_size": "16"}, TypeError, "batch_size"),
    ({"dp": "false"}, TypeError, "dp"),
    ({"accountant": "$@network_def"}, ValueError, "accountant"),
    ({"optimizer": "torch.optim.LBFGS"}, ValueError, "optimizer"),
])
def test_job_arguments_are_plain_values_never_code(args, error, name):
    with pytest.raises(error, match=name):
        SiteLearner(**args)


def test_a_job_cannot_point_a_site_at_another_bundle():
    with pytest.raises(TypeError):  # no argument takes a bundle path or config: the site's installed copy only
        SiteLearner(bundle_root="/tmp/evil_bundle")
