"""Failure modes in the real NVFlare simulator: a site with bad data, updates the server rejects."""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from conftest import datalist_items
from dpseg.jobs import site_ledgers
from dpseg.tools.simulation import run_simulator as simulate
from dpseg.ledger import Ledger
from dpseg.report import build_report, format_report
from dpseg.wire import error_header
from test_simulator import prepare_job, run_simulator


def three_site_root(cohort, tmp_path, damage: bool = True):
    """site-1 and site-2 of the tiny cohort, and a site-3 (a copy of site-1), with a truncated image
    if ``damage``; returns (root, the damaged file or None)."""
    root = tmp_path / "data"
    root.mkdir()
    for site in ("site-1", "site-2"):
        os.symlink(cohort / site, root / site)
    shutil.copytree(cohort / "site-1", root / "site-3")
    if not damage:
        return root, None
    victim = root / "site-3" / datalist_items(root / "site-3" / "datalist.json")[0]["image"]
    victim.write_bytes(victim.read_bytes()[:300])
    return root, victim


def env_for(root, tmp_path):
    """The sites' settings: data under ``root``, and new ledgers (total epsilon 20) for site-1 to
    site-3 under tmp_path/ledgers."""
    ledgers = site_ledgers(tmp_path / "ledgers", ["site-1", "site-2", "site-3"], total_epsilon=20)
    return {"DPSEG_DATA_ROOT": str(root), "DPSEG_LEDGER": ledgers}


def test_a_site_with_bad_data_fails_alone_and_the_job_goes_on(cohort, tmp_path):
    root, victim = three_site_root(cohort, tmp_path)
    job = prepare_job("fed_dp", tmp_path, rounds=2, batch_size=2, sample_rate=0.5, local_steps=2)
    ws = tmp_path / "ws"
    result = run_simulator(job, ws, env_for(root, tmp_path), sites=3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = build_report(ws)
    assert {s for s, e in report["sites"].items() if e["rounds"] == 2} == {"site-1", "site-2"}
    failures = [p for p in report["problems"] if p["site"] == "site-3"]
    assert [p["round"] for p in failures if p["kind"] == "site failed"][:2] == [0, 1]
    # the server learns a code and a fixed sentence; file names, HU, label values stay in the site's log
    assert failures[0]["reason"] == error_header("data")
    assert victim.name not in json.dumps(report["problems"]) and "truncated" not in json.dumps(report["problems"])
    site_log = (ws / "site-3" / "log.txt").read_text()
    assert str(victim) in site_log and "truncated NIfTI" in site_log  # the site's own log names the file
    assert Ledger.open(tmp_path / "ledgers" / "site-3.json").jobs == {}  # it never reached training
    assert "site-3 site failed" in format_report(report)


def test_updates_above_the_jobs_epsilon_are_rejected_and_never_aggregated(cohort, tmp_path):
    # the server's stated target (4) is below what the sites calibrate for (8): every update is refused
    job = prepare_job("fed_dp", tmp_path, rounds=1, server_args={"target_epsilon": 4.0}, batch_size=2,
                      sample_rate=0.5, local_steps=2)
    ws = tmp_path / "ws"
    run_simulator(job, ws, env_for(cohort, tmp_path))
    report = build_report(ws)
    rejected = [p for p in report["problems"] if p["kind"] == "update rejected"]
    assert rejected and all("above the job's target 4.0" in p["reason"] for p in rejected)
    # with min_clients 2 of 2 sites, the first rejection ends the job, with a clear message
    assert "Cannot reach min_responses" in (ws / "server" / "log.txt").read_text()
    assert report["best_model_bundle"] is None  # nothing aggregated, nothing written as the bundle's model
    assert all(e["rounds"] == 0 for e in report["sites"].values())


def test_a_site_that_requires_dp_refuses_a_job_without_dp_and_nothing_is_trained(cohort, tmp_path):
    job = prepare_job("fed", tmp_path, rounds=1, batch_size=2, sample_rate=0.5, local_steps=2)
    ws = tmp_path / "ws"
    run_simulator(job, ws, {**env_for(cohort, tmp_path), "DPSEG_REQUIRE_DP": "1"})
    report = build_report(ws)
    # with min_clients 2 of 2 sites, the first refusal ends the job: the other site may never get a task
    # the server learns the code and fixed sentence of a privacy refusal; the site's log says which
    refusals = [p for p in report["problems"] if p["kind"] == "site failed"]
    assert refusals and all(p["reason"] == error_header("privacy") for p in refusals)
    site = refusals[0]["site"]
    assert f"site {site} requires differential privacy" in (ws / site / "log.txt").read_text()
    assert all(e["rounds"] == 0 for e in report["sites"].values()) and report["best_model_bundle"] is None


def simulator_worker(ws: Path, site: str) -> int:
    """PID of the worker process that runs ``site`` in the simulator workspace ``ws`` (other
    simulator runs on the machine have their own workspaces)."""
    listing = subprocess.run(["pgrep", "-af", f"simulator_worker.*--client {site} "], capture_output=True, text=True)
    pids = [int(line.split()[0]) for line in listing.stdout.splitlines()
            if "simulator_worker" in line and f" -o {ws}/{site} " in line]
    assert len(pids) == 1, listing.stdout
    return pids[0]


def test_a_site_killed_in_the_middle_of_a_round_is_missing_and_rejoins_the_next_job(cohort, tmp_path):
    root, _ = three_site_root(cohort, tmp_path, damage=False)
    env = env_for(root, tmp_path)
    job = prepare_job("fed_dp", tmp_path, rounds=2, server_args={"round_wait_seconds": 5,
                      "validation_timeout_seconds": 10}, batch_size=2, sample_rate=0.5, local_steps=2)
    ws = tmp_path / "ws"
    server_log = ws / "server" / "log.txt"
    killed = []

    def kill_site_3_in_round_1() -> bool:
        """SIGKILL site-3's worker once it holds its round-1 task (it has sent round 0)."""
        if not killed and server_log.exists() and \
                server_log.read_text().count("assigned task to client site-3: name=train") >= 2:
            os.kill(simulator_worker(ws, "site-3"), signal.SIGKILL)
            killed.append(True)
        return False

    result = simulate(job, ws, env, ["site-1", "site-2", "site-3"], timeout=600, watch=kill_site_3_in_round_1)
    assert killed, "site-3 never got its round-1 task"
    assert result.returncode == 0, result.stdout[-3000:]
    report = build_report(ws)
    assert {s: e["rounds"] for s, e in report["sites"].items()} == {"site-1": 2, "site-2": 2, "site-3": 1}
    assert [(m["round"], m["sites"]) for m in report["missing_contributions"]] == [(1, ["site-3"])]
    assert report["best_model_bundle"] is not None  # the job finished with the two others
    killed = Ledger.open(tmp_path / "ledgers" / "site-3.json")
    assert len(killed.jobs) == 1 and next(iter(killed.jobs.values()))["steps"] >= 2  # what it spent is kept

    # the site rejoins: the next job trains at all three sites, and its ledger adds the two jobs up
    (tmp_path / "next").mkdir()
    again = prepare_job("fed_dp", tmp_path / "next", rounds=1, batch_size=2, sample_rate=0.5, local_steps=2)
    result = run_simulator(again, tmp_path / "ws_next", env, sites=3)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert build_report(tmp_path / "ws_next")["sites"]["site-3"]["rounds"] == 1
    assert Ledger.open(tmp_path / "ledgers" / "site-3.json").committed() == 16.0
