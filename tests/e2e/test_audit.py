"""The audit job in the real NVFlare simulator: interception, audit tasks at the sites, report."""

import json

import numpy as np
import pytest

from conftest import run_cli
from dpseg.report import build_report
from test_simulator import prepare_job, simulate_on_cohort

REPORT_KEYS = {"ssim", "psnr", "mse", "identified", "patient_identified", "baseline_ssim", "chance", "seconds"}


@pytest.mark.parametrize("dp", [False, True])
def test_audit_job_scores_at_the_sites_and_only_metrics_reach_the_server(cohort, tmp_path, dp):
    job = prepare_job("fed_dp_audit", tmp_path, rounds=2, dp=dp, sampling="poisson" if dp else "fixed",
                      server_args={"attack_iterations": 8, "attack_restarts": 1, "dp": dp})
    ws = simulate_on_cohort(job, cohort, tmp_path)
    report = build_report(ws)
    audit = report["audit"]
    assert audit["attack"] == {"iterations": 8, "restarts": 1, "label": "known", "simulate": "single"}
    rows = audit["updates"]
    assert sorted((r["site"], r["round"]) for r in rows) == [(s, r) for s in ("site-1", "site-2") for r in (0, 1)]
    assert audit["failed"] == 0
    for row in rows:  # only scalars came back: no image, no reconstruction
        assert all(isinstance(v, (bool, int, float, str)) for v in row.values()), row
        assert row["dp"] is dp
        if row["patients_in_update"] == 0:
            assert dp  # an empty Poisson sample; without DP the audit job samples exactly one patient
            continue
        assert REPORT_KEYS <= set(row)
        assert 0 <= row["identified"] <= 1 and row["chance"] == pytest.approx(1 / row["cohort_slices"])
        if dp:
            assert 0 < row["epsilon"] <= 8.0 and 0 <= row["bound_gdp"] <= 1 and 0 <= row["bound_eps_delta"] <= 1
    # reconstructions and figures stay at the sites; the server's run folder holds none
    server = ws / "server"
    assert not list(server.rglob("*.npy")) and not list(server.rglob("*.png"))
    scored = [r for r in rows if r["patients_in_update"]]
    for row in scored:
        folder = next(ws.glob(f"{row['site']}/simulate_job/app_{row['site']}/audit/round{row['round']}"))
        assert (folder / "comparison.png").stat().st_size > 0
        assert np.load(folder / "reconstruction.npy").shape[-2:] == (128, 128)
    text = run_cli("report", str(ws))
    assert text.returncode == 0 and "audit" in text.stdout and "SSIM" in text.stdout
    saved = json.loads((ws / "dpseg_report.json").read_text())
    assert saved["audit"]["scored"] == len(scored)
