import json

import pytest

from dpseg.site import SiteConfigError, load_site_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in ("DPSEG_DATALIST", "DPSEG_DATA_ROOT", "DPSEG_LEDGER", "DPSEG_TOTAL_EPSILON"):
        monkeypatch.delenv(var, raising=False)


def test_no_data_configured_names_the_settings(tmp_path):
    with pytest.raises(SiteConfigError, match="site-1 has no data configured: set DPSEG_DATALIST or DPSEG_DATA_ROOT"):
        load_site_settings("site-1", tmp_path)


def test_data_root_and_budget_from_environment(cohort, monkeypatch, tmp_path):
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    monkeypatch.setenv("DPSEG_TOTAL_EPSILON", "12.5")
    s = load_site_settings("site-2", tmp_path)
    assert s.datalist == cohort / "site-2" / "datalist.json"
    assert s.ledger == cohort / "site-2" / "privacy_ledger.json"
    assert s.total_epsilon == 12.5


def test_site_file_in_the_startup_kit(cohort, tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "dpseg_site.json").write_text(json.dumps(
        {"datalist": str(cohort / "{site}" / "datalist.json"), "ledger": str(tmp_path / "l.json"), "total_epsilon": 9}))
    s = load_site_settings("site-1", tmp_path)
    assert s.datalist == cohort / "site-1" / "datalist.json" and s.ledger == tmp_path / "l.json"
    assert s.total_epsilon == 9.0


def test_missing_budget_and_missing_datalist_fail_loudly(cohort, monkeypatch, tmp_path):
    monkeypatch.setenv("DPSEG_DATA_ROOT", str(cohort))
    with pytest.raises(SiteConfigError, match="no privacy budget: set DPSEG_TOTAL_EPSILON"):
        load_site_settings("site-1", tmp_path)
    assert load_site_settings("site-1", tmp_path, require_budget=False).total_epsilon is None
    monkeypatch.setenv("DPSEG_TOTAL_EPSILON", "lots")
    with pytest.raises(SiteConfigError, match="not a number"):
        load_site_settings("site-1", tmp_path)
    with pytest.raises(SiteConfigError, match="does not exist"):
        load_site_settings("site-9", tmp_path)


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
