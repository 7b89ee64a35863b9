import json

import pytest
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from conftest import REPO, run_cli
from dpseg.workspace import allow_dpseg, allow_list_refusal, component_paths, init_workspace


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


def _kit(tmp_path, resources: dict | None, name: str = "site-1"):
    """A site's workspace root with ``resources`` as its local/resources.json.default (None: no file)."""
    kit = tmp_path / name
    (kit / "local").mkdir(parents=True)
    (kit / "startup").mkdir()
    if resources is not None:
        (kit / "local" / "resources.json.default").write_text(json.dumps(resources))
    return kit


JOB_CONFIGS = [REPO / "jobs" / job / "app" / "config" / f"config_fed_{side}.json"
               for job in ("fed", "fed_dp", "fed_dp_audit") for side in ("client", "server")]


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda p: f"{p.parents[2].name}-{p.stem}")
def test_a_kit_whose_allow_list_lacks_dpseg_refuses_the_shipped_jobs_until_init_workspace(tmp_path, config):
    kit = _kit(tmp_path, {"format_version": 2, "class_allow_list": list(DEFAULT_CLASS_ALLOW_LIST)})
    refusal = allow_list_refusal("site-1", kit, config, "4f6d-job")
    assert refusal.startswith("site-1 refuses this job: its class allow-list")
    assert str(kit / "local" / "resources.json.default") in refusal
    assert f"run `dpseg init-workspace {kit}` to allow them" in refusal and "\n" not in refusal
    init_workspace(kit)
    assert allow_list_refusal("site-1", kit, config, "4f6d-job") is None


def test_the_allow_list_is_applied_to_every_component_of_the_job_with_nvflares_rules(tmp_path):
    config = REPO / "jobs" / "fed_dp" / "app" / "config" / "config_fed_client.json"
    tb_writer = "nvflare.app_opt.tracking.tb.tb_writer.TBWriter"
    assert tb_writer in component_paths(json.loads(config.read_text()))
    narrow = _kit(tmp_path / "a", {"class_allow_list": ["dpseg.", "nvflare.app_common."]})
    refusal = allow_list_refusal("site-1", narrow, config, "job")
    assert f"does not allow {tb_writer}; add it to class_allow_list in {narrow}/local/resources.json" in refusal
    # NVFlare's own escape hatches count as they do for NVFlare: '*', and the warn mode
    assert allow_list_refusal("site-1", _kit(tmp_path / "b", {"class_allow_list": ["*"]}), config, "job") is None
    warn = _kit(tmp_path / "c", {"class_allow_list": ["dpseg."], "class_list_enforcement_mode": "warn"})
    assert allow_list_refusal("site-1", warn, config, "job") is None
    broken = _kit(tmp_path / "d", {"class_allow_list": "dpseg."})
    assert "cannot read its class allow-list" in allow_list_refusal("site-1", broken, config, "job")


def test_only_a_simulator_workspace_without_any_resources_file_runs_the_job_as_it_is(tmp_path):
    config = REPO / "jobs" / "fed_dp" / "app" / "config" / "config_fed_server.json"
    ws = tmp_path / "WS"
    bare = _kit(ws, None, name="server")  # what `nvflare simulator -w WS` makes of a new WS
    assert allow_list_refusal("the server", bare, config, "simulate_job") is None
    # outside the simulator a missing file is no licence: NVFlare's default list applies
    assert "does not allow dpseg's components" in allow_list_refusal("the server", bare, config, "4f6d-job")
    # a simulator workspace with a policy of its own keeps it; the fix is for the simulator workspace WS
    (bare / "local" / "resources.json").write_text(json.dumps({"class_allow_list": list(DEFAULT_CLASS_ALLOW_LIST)}))
    assert f"run `dpseg init-workspace {ws}` to allow them" in allow_list_refusal("the server", bare, config,
                                                                                   "simulate_job")
