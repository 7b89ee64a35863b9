import json
import shutil

import pytest
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from conftest import REPO
from dpseg.learner import SiteLearner, ledger_entry
from dpseg.ledger import Ledger
from dpseg.simulator import SIMULATOR_JOB_ID
from dpseg.site import ENV, RETIRED
from dpseg.wire import ERROR_HEADER, error_header


def _job_learner_args(job: str) -> dict:
    """The SiteLearner arguments of a shipped job, its variables filled in as NVFlare does."""
    config = json.loads((REPO / "jobs" / job / "app" / "config" / "config_fed_client.json").read_text())
    executor = next(e["executor"] for e in config["executors"] if e["executor"]["path"] == "dpseg.learner.SiteLearner")
    return {k: config[v[1:-1]] if isinstance(v, str) and v.startswith("{") else v for k, v in executor["args"].items()}


JOB = _job_learner_args("fed_dp")  # the shipped DP job's learner arguments


def _site_task(learner: SiteLearner, root, task: str = AppConstants.TASK_TRAIN) -> Shareable:
    """``learner`` runs one task as site-1 of job job-3 in the workspace ``root``, as NVFlare calls it."""
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False)
    fl_ctx.set_prop(ReservedKey.RUN_NUM, "job-3", private=False)
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(root / "job-3" / "app_site-1"), private=False)
    return learner.execute(task, Shareable(), fl_ctx, Signal())


@pytest.fixture
def site_env(monkeypatch, tmp_path):
    """No site setting from the environment; a site workspace in tmp_path/ws with its local/ folder."""
    for var in (*ENV.values(), *RETIRED.values()):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "ws" / "local").mkdir(parents=True)
    return tmp_path / "ws"


@pytest.mark.parametrize("task", [AppConstants.TASK_TRAIN, AppConstants.TASK_VALIDATION])
def test_a_site_that_requires_dp_refuses_a_job_without_dp_before_touching_its_data(site_copy, site_env, task,
                                                                                      caplog):
    # unreadable data: a learner that looked at it first would fail on the data, not on the policy
    (site_copy / "datalist.json").write_text(json.dumps({"training": [{"image": "missing.nii.gz"}]}))
    (site_env / "local" / "dpseg_site.json").write_text(json.dumps(
        {"datalist": str(site_copy / "datalist.json"), "require_dp": True}))
    for arguments in ({"dp": False}, {"dp": False, "target_epsilon": 0.1}):  # no job argument overrides it
        caplog.clear()
        reply = _site_task(SiteLearner(**{**JOB, **arguments}), site_env, task)
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
        assert reply.get_header(ERROR_HEADER) == error_header("privacy")
        assert "site site-1 requires differential privacy" in caplog.text  # the site's log says which


def test_a_site_refuses_a_dp_job_above_its_epsilon_cap_before_touching_its_data(site_copy, site_env, monkeypatch,
                                                                                 caplog):
    (site_copy / "datalist.json").write_text("{}")
    Ledger.create(site_env / "ledger.json", 100.0)
    monkeypatch.setenv("DPSEG_DATALIST", str(site_copy / "datalist.json"))
    monkeypatch.setenv("DPSEG_LEDGER", str(site_env / "ledger.json"))
    monkeypatch.setenv("DPSEG_MAX_JOB_EPSILON", "3")
    reply = _site_task(SiteLearner(**{**JOB, "sample_rate": 0.5, "local_steps": 2}), site_env)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert reply.get_header(ERROR_HEADER) == error_header("privacy")
    assert "accepts DP jobs of target epsilon at most 3" in caplog.text
    assert Ledger.open(site_env / "ledger.json").jobs == {}


def test_a_site_whose_allow_list_lacks_dpseg_refuses_the_job_before_reading_its_settings(site_copy, site_env,
                                                                                          monkeypatch, caplog):
    # the shipped job's app has a custom/ folder, so NVFlare leaves the allow-list to the learner
    app = site_env / "job-3" / "app_site-1"
    shutil.copytree(REPO / "jobs" / "fed_dp" / "app", app)
    assert (app / "custom").is_dir()
    (site_env / "local" / "resources.json.default").write_text(json.dumps(
        {"class_allow_list": list(DEFAULT_CLASS_ALLOW_LIST)}))  # a provisioned kit, never init-workspace'd
    monkeypatch.setenv("DPSEG_TOTAL_EPSILON", "20")  # a retired setting: refused, but only once allowed to run
    reply = _site_task(SiteLearner(**{**JOB, "sample_rate": 0.5, "local_steps": 2}), site_env)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    assert reply.get_header(ERROR_HEADER) == error_header("config")
    assert "site-1 refuses this job: its class allow-list" in caplog.text
    assert f"run `dpseg init-workspace {site_env}` to allow them" in caplog.text
    assert "no longer read" not in caplog.text


def test_every_simulator_run_gets_its_own_ledger_entry():
    keys = {ledger_entry(SIMULATOR_JOB_ID, "site-1", {}) for _ in range(3)}
    assert len(keys) == 3 and all(k.startswith(SIMULATOR_JOB_ID + "-") for k in keys)
    assert ledger_entry("3f2a-job", "site-1", {}) == "3f2a-job"
    assert ledger_entry(SIMULATOR_JOB_ID, "site-1", {"site-1": "old", "site-2": "x"}) == "old"


@pytest.mark.parametrize("args, error, name", [
    ({"resume": {"site-1": "../other/ledger"}}, ValueError, "resume"),
    ({"resume": "job-1"}, ValueError, "resume"),
    ({"learning_rate": "$__import__('os').system('touch pwned')"}, TypeError, "learning_rate"),
    ({"batch_size": "16"}, TypeError, "batch_size"),
    ({"dp": "false"}, TypeError, "dp"),
    ({"accountant": "$@network_def"}, ValueError, "accountant"),
    ({"optimizer": "torch.optim.LBFGS"}, ValueError, "optimizer"),
    ({"slices_per_patient": "4"}, ValueError, "slices_per_patient"),
    ({"slices_per_patient": 0}, ValueError, "slices_per_patient"),
    ({"slices_per_patient": 2.0}, ValueError, "slices_per_patient"),
    ({"slices_per_patient": True}, ValueError, "slices_per_patient"),
    ({"train_layers": "encoder"}, ValueError, "train_layers"),
    ({"train_layers": "$@network_def"}, ValueError, "train_layers"),
    ({"canaries": -1}, ValueError, "canaries"),
    ({"canaries": "1000"}, ValueError, "canaries"),
    ({"canary_seed": 1.5}, ValueError, "canary_seed"),
    ({"dp": False, "canaries": 10}, ValueError, "audit canaries join DP steps only"),
])
def test_job_arguments_are_plain_values_never_code(args, error, name):
    with pytest.raises(error, match=name):
        SiteLearner(**{**JOB, **args})


def test_a_job_cannot_point_a_site_at_another_bundle():
    with pytest.raises(TypeError):  # no argument takes a bundle path or config: the site's installed copy only
        SiteLearner(**JOB, bundle_root="/tmp/evil_bundle")


@pytest.mark.parametrize("args", [{}, {"sample_rate": 0.25}, {"local_steps": 24}, {"local_epochs": 6.0},
                                  {"sample_rate": 1.0, "local_steps": 24}])
def test_a_dp_job_must_state_its_sample_rate_and_steps_instead_of_deriving_them_from_the_cohort(args):
    derived = {**JOB, "sample_rate": 0.0, "local_steps": 0, **args}  # 0: derive from the site's patients
    with pytest.raises(ValueError, match="add/remove-one accountant treats as private"):
        SiteLearner(**{**derived, "dp": True})
    SiteLearner(**{**derived, "dp": False})  # the non-private baseline may derive them


def test_the_privacy_settings_have_no_default_and_every_default_is_the_shipped_jobs():
    import inspect

    params = inspect.signature(SiteLearner).parameters
    required = {k for k, p in params.items() if p.default is inspect.Parameter.empty}
    assert required == {"dp", "target_epsilon", "delta", "max_grad_norm", "batch_size", "sample_rate", "local_steps",
                        "learning_rate"}
    for job in ("fed", "fed_dp"):
        args = _job_learner_args(job)
        differ = {k: (args[k], params[k].default) for k in args if k not in required and args[k] != params[k].default}
        assert not differ, (job, differ)
    with pytest.raises(TypeError, match="target_epsilon"):
        SiteLearner(dp=True)


def test_slices_per_patient_and_train_layers_are_public_training_settings_the_site_sends():
    learner = SiteLearner(**{**JOB, "sample_rate": 0.5, "local_steps": 2, "slices_per_patient": 4, "train_layers": "decoder"})
    learner.local_steps = 2
    meta = learner._training_meta()
    assert meta["slices_per_patient"] == 4 and meta["train_layers"] == "decoder"
    assert (SiteLearner(**JOB).slices_per_patient, SiteLearner(**JOB).train_layers) == (1, "all")
    for args in ({"slices_per_patient": 2}, {"train_layers": "norm"}):  # the audit assumes neither
        with pytest.raises(ValueError, match="record_batches .* needs slices_per_patient 1 and train_layers 'all'"):
            SiteLearner(**{**JOB, "sample_rate": 0.5, "local_steps": 2, **args}, record_batches=True)


@pytest.mark.parametrize("job", ["fed", "fed_dp"])
def test_the_shipped_jobs_train_every_layer_on_one_slice_per_patient(job):
    learner = SiteLearner(**_job_learner_args(job))  # as NVFlare builds it from the job's variables
    assert (learner.slices_per_patient, learner.train_layers) == (1, "all")
