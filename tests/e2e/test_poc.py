"""POC mode through poc/: prepare, start, submit jobs/fed_dp as the admin, report, stop. The
server and sites are real NVFlare processes talking gRPC over loopback."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from test_provisioned import leftover_pids
from test_simulator import prepare_job


class Poc:
    """A POC deployment in ``tmp_path/poc`` with site settings from the environment."""

    def __init__(self, tmp_path: Path, data_root: Path):
        self.folder = tmp_path / "poc"
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "HOME": str(tmp_path / "home"), "NVFLARE_POC_WORKSPACE": str(self.folder),
                    "DPSEG_DATA_ROOT": str(data_root), "DPSEG_TOTAL_EPSILON": "20",
                    "DPSEG_LEDGER": str(tmp_path / "ledgers" / "{site}.json")}

    def run(self, *cmd, timeout=300) -> str:
        done = subprocess.run([str(c) for c in cmd], cwd=REPO, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
        return done.stdout

    def kit(self, name: str) -> Path:
        return next(self.folder.glob(f"*/prod_00/{name}"))

    def stop(self) -> None:
        subprocess.run(["bash", str(REPO / "poc" / "stop.sh")], cwd=REPO, env=self.env, capture_output=True,
                       timeout=120)
        for pid in leftover_pids(str(self.folder)):
            os.kill(pid, signal.SIGKILL)


def test_poc_scripts_run_fed_dp_with_two_sites(cohort, tmp_path):
    poc = Poc(tmp_path, cohort)
    job = prepare_job("fed_dp", tmp_path / "jobs", rounds=2, batch_size=2, local_epochs=1.0)
    poc.run("bash", REPO / "poc" / "prepare.sh", "2")
    settings = json.loads((poc.kit("site-1") / "local" / "dpseg_site.json").read_text())
    assert settings["data_root"] == str(cohort) and settings["total_epsilon"] == 20
    try:
        poc.run("bash", REPO / "poc" / "start.sh")
        out = poc.run(sys.executable, REPO / "poc" / "submit.py", job, "--out", tmp_path / "result",
                      "--timeout", "900", timeout=1000)
        assert "FINISHED:COMPLETED" in out and "mean test Dice of the best global model" in out
    finally:
        poc.stop()
    report = json.loads(next((tmp_path / "result").glob("*/dpseg_report.json")).read_text())
    for site in ("site-1", "site-2"):
        p = report["sites"][site]["privacy"]
        assert p["dp"] is True and 0 < p["epsilon"] <= 8.0 and p["steps"] == 4 and p["unit"] == "patient"
        assert (tmp_path / "ledgers" / f"{site}.json").exists()
    assert not leftover_pids(str(poc.folder))

