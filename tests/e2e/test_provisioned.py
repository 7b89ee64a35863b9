"""A provisioned deployment on loopback: `nvflare provision` with provision/project.yml, the server
and two hospital sites started from their startup kits as separate processes (mutual TLS over
gRPC), jobs/fed_dp submitted by the project admin through the Flare API, the result downloaded
and reported. Every process started here is stopped, also when the test fails."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO
from dpseg.tools.labelserver import stop_process_group
from dpseg.report import build_report
from dpseg.jobs import site_ledgers
from dpseg.workspace import init_workspace
from test_simulator import prepare_job

ADMIN = "admin@consortium.example.org"
SITES = ("site-1", "site-2")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def provision(tmp_path: Path, port: int) -> Path:
    """Provision the project for host localhost on ``port``; returns the prod_00 folder of kits."""
    text = (REPO / "provision" / "project.yml").read_text()
    assert "fed_learn_port: 8002" in text and "name: fl-server.example.org" in text
    project = tmp_path / "project.yml"
    project.write_text(text.replace("fl-server.example.org", "localhost").replace("8002", str(port)))
    nvflare = Path(sys.executable).parent / "nvflare"
    done = subprocess.run([str(nvflare), "provision", "-p", str(project), "-w", str(tmp_path / "prov"), "--force"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return next((tmp_path / "prov").glob("*/prod_00"))


class Processes:
    """Started kit processes, each in its own session; ``stop`` kills them and their children."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, kit: Path, log: Path) -> None:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        self.procs.append(subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"], cwd=kit,
                                           stdout=log.open("w"), stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True))

    def stop(self, marker: str) -> None:
        for proc in self.procs:
            stop_process_group(proc, grace=10)
        for pid in leftover_pids(marker):  # job processes the server or a site spawned
            os.kill(pid, signal.SIGKILL)


def leftover_pids(marker: str) -> list[int]:
    """Processes whose command line mentions ``marker`` (the temporary kit folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def wait_for_clients(session, names: tuple[str, ...], timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        connected = {c.name for c in session.get_system_info().client_info}
        if set(names) <= connected:
            return
        time.sleep(2)
    raise AssertionError(f"sites {names} did not connect within {timeout} s (connected: {connected})")


def test_provisioned_server_and_two_sites_run_fed_dp(cohort, tmp_path):
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    kits = provision(tmp_path, free_port())
    server_kit = kits / "localhost"
    for kit in (server_kit, *(kits / s for s in SITES)):
        init_workspace(kit)
    site_ledgers(tmp_path / "ledgers", SITES, total_epsilon=20)  # each hospital's budget, in its ledger
    for site in SITES:  # each hospital's own settings: its data and its privacy ledger
        (kits / site / "local" / "dpseg_site.json").write_text(json.dumps({
            "datalist": str(cohort / site / "datalist.json"), "ledger": str(tmp_path / "ledgers" / f"{site}.json")}))
    processes, session = Processes(), None
    try:
        processes.start(server_kit, tmp_path / "server.log")
        time.sleep(5)
        for site in SITES:
            processes.start(kits / site, tmp_path / f"{site}.log")
        session = new_secure_session(ADMIN, str(kits / ADMIN), timeout=90)
        wait_for_clients(session, SITES, timeout=120)
        job = prepare_job("fed_dp", tmp_path / "jobs", rounds=2, batch_size=2, sample_rate=0.5, local_steps=2)
        job_id = session.submit_job(str(job))
        _, meta = session.monitor_job_and_return_job_meta(job_id, timeout=900)
        assert meta and meta.get("status") == "FINISHED:COMPLETED", meta
        result = Path(session.download_job_result(job_id, destination=str(tmp_path / "result")))
        report = build_report(result)
        assert set(report["sites"]) == set(SITES)
        for site in SITES:
            entry = report["sites"][site]
            p = entry["privacy"]
            assert entry["rounds"] == 2 and p["dp"] is True and p["unit"] == "patient"
            assert 0 < p["epsilon"] <= p["target_epsilon"] == 8.0 and p["steps"] == 4
            assert 0.0 <= entry["test_dice_best"] <= 1.0
            ledger = json.loads((tmp_path / "ledgers" / f"{site}.json").read_text())
            assert ledger["jobs"][job_id]["spent_epsilon"] == pytest.approx(p["epsilon"])
        assert report["best_model_bundle"] is not None
    finally:
        if session is not None:
            try:
                session.close()
            except Exception:
                pass
        processes.stop(str(tmp_path))
    assert not leftover_pids(str(tmp_path))
