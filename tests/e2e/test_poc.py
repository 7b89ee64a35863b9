"""POC mode through poc/: prepare (2 sites), start, submit jobs/fed_dp as the admin, report, stop.
The server and sites are real NVFlare processes talking gRPC over loopback."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from test_provisioned import leftover_pids
from test_simulator import prepare_job


def test_poc_scripts_run_fed_dp_with_two_sites(cohort, tmp_path):
    poc = tmp_path / "poc"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HOME": str(tmp_path / "home"), "NVFLARE_POC_WORKSPACE": str(poc), "DPSEG_DATA_ROOT": str(cohort),
           "DPSEG_TOTAL_EPSILON": "20", "DPSEG_LEDGER": str(tmp_path / "ledgers" / "{site}.json")}

    def run(*cmd, timeout=300):
        done = subprocess.run([str(c) for c in cmd], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    job = prepare_job("fed_dp", tmp_path / "jobs", rounds=2, batch_size=2, local_epochs=1.0)
    run("bash", REPO / "poc" / "prepare.sh", "2")
    settings = json.loads(next(poc.glob("*/prod_00/site-1/local/dpseg_site.json")).read_text())
    assert settings["data_root"] == str(cohort) and settings["total_epsilon"] == 20
    try:
        run("bash", REPO / "poc" / "start.sh")
        out = run(sys.executable, REPO / "poc" / "submit.py", job, "--out", tmp_path / "result", "--timeout", "900",
                  timeout=1000)
        assert "FINISHED:COMPLETED" in out and "mean test Dice of the best global model" in out
    finally:
        subprocess.run(["bash", str(REPO / "poc" / "stop.sh")], cwd=REPO, env=env, capture_output=True, timeout=120)
        for pid in leftover_pids(str(poc)):
            os.kill(pid, 9)
    report = json.loads(next((tmp_path / "result").glob("*/dpseg_report.json")).read_text())
    for site in ("site-1", "site-2"):
        p = report["sites"][site]["privacy"]
        assert p["dp"] is True and 0 < p["epsilon"] <= 8.0 and p["steps"] == 4 and p["unit"] == "patient"
        assert (tmp_path / "ledgers" / f"{site}.json").exists()
    assert not leftover_pids(str(poc))
