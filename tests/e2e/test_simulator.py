"""Short end-to-end runs of the real NVFlare simulator: 2 sites, 2 rounds, tiny cohort."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli
from dpseg.bundle import Bundle
from dpseg.jobs import configure_job, site_ledgers
from dpseg.tools.simulation import run_simulator as simulate
from dpseg.ledger import Ledger
from dpseg.report import build_report
from dpseg.wire import RESUME_FILE


def prepare_job(name: str, dest: Path, rounds: int, server_args: dict | None = None, **client_args) -> Path:
    """A copy of jobs/<name> in dest/<name> with fewer rounds and other server / client arguments."""
    return configure_job(REPO / "jobs" / name, dest / name, {"num_rounds": rounds, **(server_args or {})}, client_args)


def run_simulator(job: Path, workspace: Path, env: dict, sites: int = 2) -> subprocess.CompletedProcess:
    """The simulator with sites site-1 .. site-<sites>, one process each."""
    return simulate(job, workspace, env, [f"site-{i + 1}" for i in range(sites)], timeout=600)


def simulate_on_cohort(job: Path, cohort: Path, tmp_path: Path) -> Path:
    """Run ``job`` (2 sites) on the tiny cohort with site settings from the environment (new
    ledgers of total epsilon 20 under tmp_path/ledgers); asserts success and returns the workspace."""
    ws = tmp_path / "ws"
    env = {"DPSEG_DATA_ROOT": str(cohort),
           "DPSEG_LEDGER": site_ledgers(tmp_path / "ledgers", ["site-1", "site-2"], total_epsilon=20)}
    result = run_simulator(job, ws, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return ws


@pytest.mark.parametrize("name", ["fed_dp", "fed"])
def test_two_sites_two_rounds_report_and_bundle(cohort, tmp_path, name):
    # the DP job also averages its global models (the fed job does not): its output is the average
    averaging = {"average_decay": 0.5} if name == "fed_dp" else {}
    job = prepare_job(name, tmp_path, rounds=2, server_args=averaging, batch_size=2, sample_rate=0.5, local_steps=2)
    ws = simulate_on_cohort(job, cohort, tmp_path)
    report = build_report(ws)
    assert report["rounds"] == 2 and len(report["round_seconds"]) == 2
    assert set(report["sites"]) == {"site-1", "site-2"}
    for site, entry in report["sites"].items():
        assert entry["rounds"] == 2
        assert 0.0 <= entry["test_dice_best"] <= 1.0 and entry["test_patients"] == 1
        p = entry["privacy"]
        assert p["unit"] == "patient"
        if name == "fed":
            assert p["dp"] is False
            assert Ledger.open(tmp_path / "ledgers" / f"{site}.json").jobs == {}  # a job without DP spends nothing
            continue
        assert p["dp"] is True and p["accountant"] == "prv" and p["delta"] == 1e-5
        assert p["steps"] == p["planned_steps"] == 2 * 2  # 2 rounds x ceil(4 patients / 2)
        assert 0 < p["epsilon"] <= p["target_epsilon"] == 8.0
        assert p["noise_multiplier"] > 0 and p["sample_rate"] == pytest.approx(2 / 4)
        ledger = json.loads((tmp_path / "ledgers" / f"{site}.json").read_text())
        (job_entry,) = ledger["jobs"].values()
        assert job_entry["spent_epsilon"] == pytest.approx(p["epsilon"]) and job_entry["steps"] == 4
    # the best global model, written back as a bundle with plain state-dict keys
    bundle_dir = Path(report["best_model_bundle"])
    state = torch.load(bundle_dir / "models" / "model.pt", weights_only=True)
    assert not any(k.startswith("_module.") for k in state)
    bundle = Bundle(bundle_dir)
    bundle.load_weights(bundle.network())
    point = torch.load(next(ws.rglob(RESUME_FILE)), weights_only=True)
    final = global_model(ws)
    if averaging:  # the bundle and the final model (tested by every site) are the average, not the last model
        assert all(torch.equal(state[k], point["average"][k]) and torch.equal(final[k], point["average"][k]) for k in state)
        assert any(not torch.equal(state[k], point["model"][k]) for k in state)
        assert all(0.0 <= e["test_dice_final"] <= 1.0 for e in report["sites"].values())
    else:
        assert "average" not in point and all(torch.equal(final[k], point["model"][k]) for k in final)
    text = run_cli("report", str(ws))
    assert text.returncode == 0 and "epsilon" in text.stdout and "site-2" in text.stdout
    assert json.loads((ws / "dpseg_report.json").read_text())["rounds"] == 2
    assert str(cohort) not in (ws / "dpseg_report.json").read_text()  # no site paths in the report
    if name == "fed":
        assert_a_second_run_gives_the_same_model(ws, cohort, tmp_path)


def global_model(ws: Path) -> dict:
    saved = torch.load(next(ws.rglob("FL_global_model.pt")), weights_only=True)
    return saved.get("model", saved)


def assert_a_second_run_gives_the_same_model(ws: Path, cohort: Path, tmp_path: Path) -> None:
    """Determinism without DP: the same job with the same seed, run again, ends with the very same
    global model (seeded initial model and slice draws, one torch thread per site), and training
    changed it."""
    job = prepare_job("fed", tmp_path / "again", rounds=2, batch_size=2, sample_rate=0.5, local_steps=2)
    first, second = global_model(ws), global_model(simulate_on_cohort(job, cohort, tmp_path / "again"))
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    from dpseg.server import BundlePersistor

    initial = BundlePersistor().model.state_dict()  # the job's seeded initial global model
    assert any(not torch.equal(first[k], v) for k, v in initial.items())  # the rounds changed it


def test_fed_and_fed_dp_differ_only_in_dp():
    def configs(name):
        base = REPO / "jobs" / name / "app" / "config"
        return (json.loads((base / "config_fed_server.json").read_text()),
                json.loads((base / "config_fed_client.json").read_text()))
    (s_dp, c_dp), (s, c) = configs("fed_dp"), configs("fed")
    assert {k: v for k, v in s_dp.items() if k != "dp"} == {k: v for k, v in s.items() if k != "dp"}
    # the server validates updates against the same DP setting and target as the sites use
    for server, client in ((s_dp, c_dp), (s, c), configs("fed_dp_audit")):
        assert server["dp"] == client["dp"] and server["target_epsilon"] == client["target_epsilon"]
    assert c_dp["dp"] is True and c["dp"] is False
    assert {k: v for k, v in c_dp.items() if k != "dp"} == {k: v for k, v in c.items() if k != "dp"}
