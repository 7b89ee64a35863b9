import json

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from conftest import run_cli
from dpseg.workspace import allow_dpseg


def test_allow_list_adds_dpseg_and_keeps_the_rest(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "resources.json.default").write_text(json.dumps({"format_version": 2, "components": []}))
    path = allow_dpseg(tmp_path)
    data = json.loads(path.read_text())
    assert data["format_version"] == 2 and data["components"] == []
    assert "dpseg." in data["class_allow_list"]
    assert set(DEFAULT_CLASS_ALLOW_LIST) <= set(data["class_allow_list"])
    allow_dpseg(tmp_path)  # idempotent
    assert json.loads(path.read_text())["class_allow_list"].count("dpseg.") == 1


def test_init_workspace_writes_the_sites_own_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("DPSEG_TOTAL_EPSILON", raising=False)
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "dpseg_site.json").write_text(json.dumps({"ledger": "/secure/l.json", "max_job_epsilon": 5}))
    result = run_cli("init-workspace", str(kit), "--data-root", "data", "--require-dp", "--max-job-epsilon", "4",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    settings = json.loads((kit / "local" / "dpseg_site.json").read_text())
    assert settings == {"ledger": "/secure/l.json", "max_job_epsilon": 4.0, "require_dp": True,
                        "data_root": str(tmp_path / "data")}
    from dpseg.site import load_site_settings

    (tmp_path / "data" / "site-1").mkdir(parents=True)
    (tmp_path / "data" / "site-1" / "datalist.json").write_text("{}")
    loaded = load_site_settings("site-1", kit, require_ledger=False)
    assert loaded.datalist == tmp_path / "data" / "site-1" / "datalist.json" and loaded.require_dp


def test_init_workspace_refuses_a_site_file_with_the_retired_total_epsilon(tmp_path, monkeypatch):
    monkeypatch.delenv("DPSEG_TOTAL_EPSILON", raising=False)
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "dpseg_site.json").write_text(json.dumps({"total_epsilon": 20}))
    result = run_cli("init-workspace", str(kit), "--ledger", "l.json", cwd=tmp_path)
    assert result.returncode == 2 and "'total_epsilon' in" in result.stderr and "no longer read" in result.stderr


def test_init_workspace_turns_nvflare_job_log_streaming_off_as_nvflare_reads_it(tmp_path):
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.app_common.logging.constants import is_log_streaming_allowed

    kit = tmp_path / "site-1"  # a provisioned site's kit: startup/, and local/ with NVFlare's defaults
    (kit / "startup").mkdir(parents=True)
    (kit / "local").mkdir()
    (kit / "local" / "resources.json.default").write_text(json.dumps({"allow_log_streaming": True, "components": [
        {"id": "site_log_streamer", "path": "nvflare.app_common.logging.site_log_streamer.SiteLogStreamer"}]}))
    fl_ctx = FLContext()  # what NVFlare's JobLogStreamer / SiteLogStreamer look at in the site's process
    fl_ctx.set_prop(FLContextKey.WORKSPACE_ROOT, str(kit), private=False)
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False)
    assert is_log_streaming_allowed(fl_ctx)
    assert run_cli("init-workspace", str(kit)).returncode == 0
    assert json.loads((kit / "local" / "resources.json").read_text())["allow_log_streaming"] is False
    assert not is_log_streaming_allowed(fl_ctx)
