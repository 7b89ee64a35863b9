"""POC mode through poc/: prepare, start, submit jobs/fed_dp as the admin, report, resume, stop.
The server and sites are real NVFlare processes talking gRPC over loopback."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import REPO, run_cli
from dpseg.ledger import Ledger
from dpseg.synthetic import write_cohort
from test_provisioned import leftover_pids
from test_simulator import prepare_job


class Poc:
    """A POC deployment in ``tmp_path/poc`` with site settings from the environment."""

    def __init__(self, tmp_path: Path, data_root: Path):
        self.folder = tmp_path / "poc"
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "HOME": str(tmp_path / "home"), "NVFLARE_POC_WORKSPACE": str(self.folder),
                    "DPSEG_DATA_ROOT": str(data_root), "DPSEG_LEDGER": str(tmp_path / "ledgers" / "{site}.json")}

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
        deadline = time.time() + 15
        while leftover_pids(str(self.folder)) and time.time() < deadline:  # killed processes take a moment to go
            for pid in leftover_pids(str(self.folder)):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def kill_job_process_in_round(poc: Poc, site: str, round_: int, timeout: float = 600) -> None:
    """Once the server has assigned ``site`` its train task of ``round_`` (0-based), SIGKILL the
    site's job process (the site's client stays up)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        logs = "".join(p.read_text() for p in poc.folder.glob("*/prod_00/server/*/log.txt"))
        if logs.count(f"assigned task to client {site}: name=train") > round_:
            listing = subprocess.run(["pgrep", "-af", "worker_process"], capture_output=True, text=True).stdout
            # this deployment's site only: other deployments (a provisioned test beside it) have a site-2 too
            pids = [int(line.split()[0]) for line in listing.splitlines() if f"{poc.folder}/" in line
                    and f"prod_00/{site} " in line]
            assert len(pids) == 1, listing
            os.kill(pids[0], signal.SIGKILL)
            return
        time.sleep(0.1)
    raise AssertionError(f"{site} never got its round-{round_} task")


def test_poc_site_killed_mid_round_fails_the_job_which_resumes_with_the_site_back(tmp_path):
    data = tmp_path / "data"
    write_cohort(data, n_sites=2, patients=[6, 6], seed=7)
    poc = Poc(tmp_path, data)
    job = prepare_job("fed_dp", tmp_path / "jobs", rounds=2, batch_size=2, sample_rate=0.5, local_steps=2)
    poc.run("bash", REPO / "poc" / "prepare.sh", "2")
    settings = json.loads((poc.kit("site-1") / "local" / "dpseg_site.json").read_text())
    assert settings["data_root"] == str(data) and settings["ledger"] == str(tmp_path / "ledgers" / "{site}.json")
    assert Ledger.open(tmp_path / "ledgers" / "site-1.json").total_epsilon == 20  # created by prepare.sh
    submit = [sys.executable, REPO / "poc" / "submit.py"]
    try:
        poc.run("bash", REPO / "poc" / "start.sh")
        killer = threading.Thread(target=kill_job_process_in_round, args=(poc, "site-2", 1))
        killer.start()
        stopped = subprocess.run([str(c) for c in submit + [job, "--out", tmp_path / "stopped", "--timeout", "600"]],
                                 cwd=REPO, env=poc.env, capture_output=True, text=True, timeout=700)
        killer.join()
        # NVFlare fails the whole job when a site's job process dies; nothing is lost: the resume point
        assert stopped.returncode == 1 and "FINISHED:EXECUTION_EXCEPTION" in stopped.stdout, stopped.stdout[-3000:]
        result = next((tmp_path / "stopped").iterdir())
        resumed = tmp_path / "resumed"
        out = run_cli("resume-job", str(result), "--job", str(job), "--out", str(resumed))
        assert out.returncode == 0 and "rounds 1..1 (1 left)" in out.stdout, out.stdout + out.stderr
        again = poc.run(*submit, resumed, "--out", tmp_path / "again", "--timeout", "600", timeout=700)
        assert "FINISHED:COMPLETED" in again and "mean test Dice of the best global model" in again
    finally:
        poc.stop()
    report = json.loads(next((tmp_path / "again").glob("*/dpseg_report.json")).read_text())
    assert report["rounds"] == 1 and not report["missing_contributions"]  # site-2 is back
    new_job = next((tmp_path / "again").iterdir()).name
    for site in ("site-1", "site-2"):
        ledger = Ledger.open(tmp_path / "ledgers" / f"{site}.json")
        (entry, record), = ledger.jobs.items()  # one entry: the resumed job continued the stopped one
        assert entry == result.name and record["continued_by"] == [new_job]
        p = report["sites"][site]["privacy"]
        assert p["ledger_entry"] == entry and p["dp"] is True and p["unit"] == "patient" and 0 < p["epsilon"] <= 8.0
        assert record["steps"] >= 2 + 2 and record["spent_epsilon"] <= 8.0
    assert not leftover_pids(str(poc.folder))
