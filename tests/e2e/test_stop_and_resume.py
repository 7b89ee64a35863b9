"""A job stopped in the middle (the simulator killed) and resumed with `dpseg resume-job`."""

import json
from pathlib import Path

import torch

from conftest import run_cli
from dpseg.tools.simulation import run_simulator as simulate
from dpseg.ledger import Ledger
from dpseg.report import build_report
from dpseg.resume import RESUME_MODEL
from dpseg.wire import RESUME_FILE
from test_failures import env_for
from test_simulator import prepare_job, run_simulator


def run_until_round_done(job: Path, ws: Path, env: dict, completed_round: int, timeout: float = 600) -> dict:
    """Start the simulator, SIGKILL it once the server has persisted the global model after
    ``completed_round``; returns that resume point."""
    point_file = ws / "server" / "simulate_job" / "app_server" / RESUME_FILE
    points = []

    def round_done() -> bool:
        if point_file.exists():
            point = torch.load(point_file, weights_only=True)
            if point["completed_round"] >= completed_round:
                points.append(point)
        return bool(points)

    log = ws.parent / "stopped_run.log"
    simulate(job, ws, env, ["site-1", "site-2"], timeout=timeout, log=log, watch=round_done)
    assert points, f"round {completed_round} never completed:\n" + log.read_text()[-3000:]
    return points[0]


def test_a_stopped_job_resumes_from_its_last_round_and_the_accountant_continues(cohort, tmp_path):
    job = prepare_job("fed_dp", tmp_path, rounds=2, batch_size=2, sample_rate=0.5, local_steps=2)
    env = env_for(cohort, tmp_path)
    point = run_until_round_done(job, tmp_path / "ws", env, completed_round=0)
    assert point["completed_round"] == 0 and point["end_round"] == 2
    ledgers = {s: Ledger.open(tmp_path / "ledgers" / f"{s}.json") for s in ("site-1", "site-2")}
    before = {s: next(iter(l.jobs.items())) for s, l in ledgers.items()}
    assert all(e["steps"] >= 2 and e["spent_epsilon"] > 0 for _, e in before.values())

    resumed = tmp_path / "resumed_job"
    out = run_cli("resume-job", str(tmp_path / "ws"), "--job", str(job), "--out", str(resumed))
    assert out.returncode == 0, out.stderr
    assert "rounds 1..1 (1 left)" in out.stdout
    saved = torch.load(resumed / "app" / RESUME_MODEL, weights_only=True)
    assert all(torch.equal(saved[k], point["model"][k]) for k in point["model"])

    result = run_simulator(resumed, tmp_path / "ws2", env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming from the global model in " + RESUME_MODEL in (tmp_path / "ws2/server/log.txt").read_text()
    rounds = json.loads(next((tmp_path / "ws2" / "server").rglob("dpseg_rounds.json")).read_text())
    assert [r["round"] for r in rounds] == [1]
    for site, (entry, old) in before.items():
        ledger = Ledger.open(tmp_path / "ledgers" / f"{site}.json")
        assert list(ledger.jobs) == [entry]  # one job, counted once: the resumed run continued it
        now = ledger.jobs[entry]
        assert now["continued_by"] == ["simulate_job"]
        # the resumed round trained (2 steps) on top of what the stopped run spent; epsilon within target
        assert now["steps"] == old["steps"] + 2 and old["spent_epsilon"] < now["spent_epsilon"] <= 8.0
        first = rounds[0]["sites"][site]["privacy"]  # epsilon did not restart at zero
        assert first["ledger_entry"] == entry and first["steps"] == old["steps"] + 2
        assert first["epsilon"] > old["spent_epsilon"]
    assert build_report(tmp_path / "ws2")["rounds"] == 1
