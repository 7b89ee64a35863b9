"""The one-run privacy audit inside a real job: the audit copy of jobs/fed_dp in the NVFlare
simulator with canaries at every site, scored against what the server received (tiny cohort)."""

import json

import numpy as np

from conftest import REPO
from dpseg.bundle import Bundle
from dpseg.canaries import trained_parameters
from dpseg.jobs import SERVER_CONFIG
from dpseg.tools.onerun import fl_one_run
from dpseg.updatesums import load_update_sums
from dpseg.wire import UPDATE_SUMS_FILE


def test_the_one_run_audit_scores_canaries_against_the_updates_the_server_received(cohort, tmp_path):
    work = tmp_path / "work"
    results = fl_one_run(tmp_path / "out", work, cohort, REPO / "jobs" / "fed_dp", canaries=60, canary_seed=11,
                         rounds=2, client_args={"batch_size": 2, "sample_rate": 0.5, "local_steps": 2},
                         progress=lambda m: None)
    assert results["claimed_epsilon"] == 8.0 and results["canary_seed"] == 11 and results["rounds"] == 2
    assert set(results["sites"]) == {"site-1", "site-2"}
    for site, r in results["sites"].items():
        assert r["rounds"] == 2 and r["one_run_canaries"] == 60 and 0 < r["one_run_in"] < 60
        assert 0.0 <= r["epsilon_lower_bound_one_run"] <= 8.0  # a few canaries cannot confirm much
    assert results["pooled"]["one_run_canaries"] == 120 and not results["caught"]
    saved = json.loads((tmp_path / "out" / "privacy_audit_fl.json").read_text())
    assert saved["pooled"] == results["pooled"]
    assert "| all sites |" in (tmp_path / "out" / "privacy_audit_fl.md").read_text()
    # the audit copy names the server's update sums; the shipped job does not
    names = [c["path"] for c in json.loads((work / "job" / SERVER_CONFIG).read_text())["components"]]
    assert "dpseg.updatesums.UpdateSums" in names
    assert "UpdateSums" not in (REPO / "jobs" / "fed_dp" / SERVER_CONFIG).read_text()
    # the sums cover every trained parameter, and every site logged that canaries joined its steps
    sums = load_update_sums(next((work / "ws").rglob(UPDATE_SUMS_FILE)))
    named = trained_parameters(Bundle().network())
    for site in ("site-1", "site-2"):
        rounds, arrays = sums[site]
        assert rounds == 2 and all(arrays[n].shape == tuple(p.shape) for n, p in named)
        assert np.isfinite(np.concatenate([arrays[n].reshape(-1) for n, _ in named])).all()
    log = (work / "simulator.log").read_text()
    assert log.count("PRIVACY AUDIT JOB: 60 audit canaries") == 2
