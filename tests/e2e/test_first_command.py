"""The README's first command as a new user types it, `nvflare simulator JOB -w WS -n N -t N`, on a new
workspace WS that nothing prepared: only the two site settings (DPSEG_DATA_ROOT, DPSEG_LEDGER) are set."""

import json

import pytest

from dpseg.jobs import site_ledgers
from dpseg.tools.simulation import run_simulator
from dpseg.report import build_report
from dpseg.site import ENV, RETIRED
from dpseg.workspace import component_paths
from test_simulator import prepare_job

SITES = ["site-1", "site-2"]


@pytest.fixture
def new_user(monkeypatch):
    """No dpseg site setting in the environment but those a test gives the simulator."""
    for var in (*ENV.values(), *RETIRED.values()):
        monkeypatch.delenv(var, raising=False)


def bare_simulator(job, ws, env):
    """``nvflare simulator JOB -w WS -n 2 -t 2`` with ``env`` added, on ``ws`` as it is."""
    return run_simulator(job, ws, env, SITES, timeout=600, prepare=False)


def test_the_bare_simulator_command_completes_on_a_new_workspace(cohort, tmp_path, new_user):
    job = prepare_job("fed_dp", tmp_path, rounds=1, batch_size=2, sample_rate=0.5, local_steps=2)
    ws = tmp_path / "WS"
    env = {"DPSEG_DATA_ROOT": str(cohort), "DPSEG_LEDGER": site_ledgers(tmp_path / "ledgers", SITES, 20)}
    result = bare_simulator(job, ws, env)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "ComponentNotAuthorized" not in result.stdout and "Traceback" not in result.stdout
    assert not list((ws / "local").iterdir())  # nothing prepared the workspace (NVFlare made local/, empty)
    report = build_report(ws)
    assert {s: e["rounds"] for s, e in report["sites"].items()} == {"site-1": 1, "site-2": 1}
    assert all(e["privacy"]["dp"] and 0 < e["privacy"]["epsilon"] <= 8.0 for e in report["sites"].values())
    assert list(ws.rglob("FL_global_model.pt"))  # the aggregated global model
    # no site's job log goes to the server: no site has site-level components (NVFlare's SiteLogStreamer
    # comes from a kit's resources file) and the job names no log streamer or receiver
    for site in ("server", *SITES):
        assert not list((ws / site / "local").glob("resources.json*"))
    configs = [json.loads(p.read_text()) for p in (job / "app" / "config").glob("config_fed_*.json")]
    assert not [p for c in configs for p in component_paths(c) if "nvflare.app_common.logging" in p]


def test_a_site_without_data_says_in_its_first_error_line_which_setting_to_set(cohort, tmp_path, new_user):
    job = prepare_job("fed_dp", tmp_path, rounds=1, batch_size=2, sample_rate=0.5, local_steps=2)
    env = {"DPSEG_LEDGER": site_ledgers(tmp_path / "ledgers", SITES, 20)}  # the ledgers, but no data
    ws = tmp_path / "WS"
    result = bare_simulator(job, ws, env)
    assert result.returncode != 0
    lines = result.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if " - ERROR - " in line or "Traceback" in line)
    assert "Traceback" not in "\n".join(lines[:first + 1])
    message = lines[first].split(" - ERROR - ", 1)[1]
    assert message.startswith(("site site-1 has no data configured: set DPSEG_DATALIST or DPSEG_DATA_ROOT",
                               "site site-2 has no data configured: set DPSEG_DATALIST or DPSEG_DATA_ROOT"))
    assert message.endswith(f"'datalist' in {ws / 'local' / 'dpseg_site.json'}")  # the file the simulator copies
