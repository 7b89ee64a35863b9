import json

import pytest

from dpseg.ledger import Ledger
from dpseg.site import ENV, RETIRED, JobRefused, SiteConfigError, SiteSettings, check_job_policy, load_site_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in (*ENV.values(), *RETIRED.values()):
        monkeypatch.delenv(var, raising=False)


def test_no_data_configured_names_the_settings(tmp_path):
    with pytest.raises(SiteConfigError, match="site-1 has no data configured: set DPSEG_DATALIST or DPSEG_DATA_ROOT"):
        load_site_settings("site-1", tmp_path)


def test_in_the_simulator_the_messages_name_the_settings_file_of_the_simulator_workspace(tmp_path):
    site_root = tmp_path / "WS" / "site-1"  # NVFlare copies WS/local/ into it at every run
    with pytest.raises(SiteConfigError) as err:
        load_site_settings("site-1", site_root, edited_in=tmp_path / "WS")
    assert str(err.value).endswith(f"or 'datalist' in {tmp_path / 'WS' / 'local' / 'dpseg_site.json'}")


def test_data_root_and_ledger_from_environment(cohort, monkeypatch, tmp_path):
    Ledger.create(tmp_path / "ledgers" / "site-2.json", 12.5)
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    monkeypatch.setenv("DPSEG_LEDGER", str(tmp_path / "ledgers" / "{site}.json"))
    s = load_site_settings("site-2", tmp_path)
    assert s.datalist == cohort / "site-2" / "datalist.json"
    assert s.ledger == tmp_path / "ledgers" / "site-2.json"
    assert (s.require_dp, s.max_job_epsilon) == (False, None)


def test_site_file_in_the_startup_kit(cohort, tmp_path):
    Ledger.create(tmp_path / "l.json", 9.0)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps(
        {"datalist": str(cohort / "{site}" / "datalist.json"), "ledger": str(tmp_path / "l.json"),
         "require_dp": True, "max_job_epsilon": 4}))
    s = load_site_settings("site-1", tmp_path)
    assert s.datalist == cohort / "site-1" / "datalist.json" and s.ledger == tmp_path / "l.json"
    assert (s.require_dp, s.max_job_epsilon) == (True, 4.0)


def test_a_dp_job_needs_a_configured_ledger_that_exists_and_no_default_beside_the_data(cohort, monkeypatch, tmp_path):
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    with pytest.raises(SiteConfigError, match="no privacy ledger configured.*set DPSEG_LEDGER / 'ledger' in "):
        load_site_settings("site-1", tmp_path)
    assert load_site_settings("site-1", tmp_path, require_ledger=False).ledger is None  # a job without DP
    monkeypatch.setenv("DPSEG_LEDGER", str(tmp_path / "{site}.json"))
    missing = tmp_path / "site-1.json"
    with pytest.raises(SiteConfigError, match=f"privacy ledger {missing} .*does not exist; create it once with "
                                              f"`dpseg ledger init {missing} --total-epsilon E"):
        load_site_settings("site-1", tmp_path)
    assert not missing.exists()
    with pytest.raises(SiteConfigError, match="does not exist"):
        load_site_settings("site-9", tmp_path)


def test_the_retired_total_epsilon_setting_fails_loudly_wherever_it_is_set(cohort, monkeypatch, tmp_path):
    Ledger.create(tmp_path / "l.json", 9.0)
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    monkeypatch.setenv("DPSEG_LEDGER", str(tmp_path / "l.json"))
    monkeypatch.setenv("DPSEG_TOTAL_EPSILON", "20")
    for dp in (True, False):
        with pytest.raises(SiteConfigError, match="DPSEG_TOTAL_EPSILON is no longer read: the site's budget now "
                                                  "lives in its privacy ledger \\(`dpseg ledger init"):
            load_site_settings("site-1", tmp_path, require_ledger=dp)
    monkeypatch.delenv("DPSEG_TOTAL_EPSILON")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps({"total_epsilon": 20}))
    with pytest.raises(SiteConfigError, match="'total_epsilon' in .*dpseg_site.json is no longer read"):
        load_site_settings("site-1", tmp_path)


@pytest.mark.parametrize("name, value", [("require_dp", "maybe"), ("require_dp", 2), ("max_job_epsilon", "lots"),
                                         ("max_job_epsilon", -1), ("max_job_epsilon", True)])
def test_a_malformed_policy_setting_is_an_error_naming_it(cohort, monkeypatch, tmp_path, name, value):
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps({name: value}))
    with pytest.raises(SiteConfigError, match=f"{ENV[name]} / '{name}' in .*dpseg_site.json"):
        load_site_settings("site-1", tmp_path, require_ledger=False)


def test_policy_from_the_environment_comes_before_the_site_file(cohort, monkeypatch, tmp_path):
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps({"require_dp": False, "max_job_epsilon": 8}))
    monkeypatch.setenv("DPSEG_REQUIRE_DP", "1")
    monkeypatch.setenv("DPSEG_MAX_JOB_EPSILON", "2.5")
    s = load_site_settings("site-1", tmp_path, require_ledger=False)
    assert (s.require_dp, s.max_job_epsilon) == (True, 2.5)


def test_a_site_that_requires_dp_refuses_a_job_without_dp(tmp_path):
    strict = SiteSettings("site-1", tmp_path / "d.json", tmp_path / "l.json", require_dp=True)
    with pytest.raises(JobRefused, match="site site-1 requires differential privacy"):
        check_job_policy(strict, dp=False, target_epsilon=8.0)
    check_job_policy(strict, dp=True, target_epsilon=8.0)
    check_job_policy(SiteSettings("site-1", tmp_path / "d.json", None), dp=False, target_epsilon=8.0)


def test_a_site_refuses_a_dp_job_above_its_epsilon_cap(tmp_path):
    capped = SiteSettings("site-1", tmp_path / "d.json", tmp_path / "l.json", max_job_epsilon=3.0)
    with pytest.raises(JobRefused, match="at most 3 .*DPSEG_MAX_JOB_EPSILON.*this job asks for 8: refused"):
        check_job_policy(capped, dp=True, target_epsilon=8.0)
    check_job_policy(capped, dp=True, target_epsilon=3.0)


def test_audit_release_is_none_unless_the_site_chooses_aggregate(tmp_path, monkeypatch):
    from dpseg.site import audit_release

    monkeypatch.delenv("DPSEG_AUDIT_RELEASE", raising=False)
    assert audit_release(tmp_path) == "none" and audit_release(None) == "none"
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps({"audit_release": "aggregate"}))
    assert audit_release(tmp_path) == "aggregate"
    monkeypatch.setenv("DPSEG_AUDIT_RELEASE", "none")  # the environment comes first
    assert audit_release(tmp_path) == "none"
    monkeypatch.setenv("DPSEG_AUDIT_RELEASE", "all")
    with pytest.raises(SiteConfigError, match="DPSEG_AUDIT_RELEASE='all': must be one of none, aggregate"):
        audit_release(tmp_path)
    monkeypatch.delenv("DPSEG_AUDIT_RELEASE")
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps({"audit_release": True}))
    with pytest.raises(SiteConfigError, match="'audit_release' in .*dpseg_site.json=True"):
        audit_release(tmp_path)


def test_the_audit_prior_folder_is_the_workspaces_unless_the_site_names_one(tmp_path, monkeypatch):
    from dpseg.site import AUDIT_PRIOR_ENV, SITE_FILE, audit_prior_dir

    monkeypatch.delenv(AUDIT_PRIOR_ENV, raising=False)
    assert audit_prior_dir(tmp_path) == tmp_path / "audit_prior"
    (tmp_path / SITE_FILE).parent.mkdir(parents=True)
    (tmp_path / SITE_FILE).write_text(json.dumps({"audit_prior_dir": str(tmp_path / "shared")}))
    assert audit_prior_dir(tmp_path) == tmp_path / "shared"
    monkeypatch.setenv(AUDIT_PRIOR_ENV, str(tmp_path / "env"))
    assert audit_prior_dir(tmp_path) == tmp_path / "env"  # the environment first, as for every site setting
