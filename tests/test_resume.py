import json

import pytest
import torch

from conftest import REPO
from dpseg.resume import RESUME_AVERAGE, RESUME_MODEL, ResumeError, resume_job
from dpseg.wire import RESUME_FILE, ROUNDS_FILE


def _stopped_run(root, completed_round, end_round=5, average=None):
    app = root / "server" / "simulate_job" / "app_server"
    app.mkdir(parents=True)
    point = {"completed_round": completed_round, "end_round": end_round, "model": {"w": torch.ones(2)}}
    torch.save(point if average is None else {**point, "average": average}, app / RESUME_FILE)
    facts = {"dp": True, "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 2}
    rounds = [{"round": 0, "sites": {"site-1": {"privacy": {**facts, "ledger_entry": "simulate_job-a"}},
                                     "site-2": {"privacy": {**facts, "ledger_entry": "simulate_job-b"}}}}]
    (app.parent / ROUNDS_FILE).write_text(json.dumps(rounds))
    return root


def test_resumed_job_starts_after_the_last_completed_round(tmp_path):
    run = _stopped_run(tmp_path / "ws", completed_round=1)
    summary = resume_job(run, REPO / "jobs" / "fed_dp", tmp_path / "resumed")
    assert summary["next_round"] == 2 and summary["rounds_left"] == 3
    server = json.loads((tmp_path / "resumed/app/config/config_fed_server.json").read_text())
    workflow = next(w for w in server["workflows"] if "ScatterAndGather" in w["path"])
    assert workflow["args"]["start_round"] == 2 and server["num_rounds"] == 3
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["resume_model"] == RESUME_MODEL and "resume_average" not in persistor["args"]
    assert torch.equal(torch.load(tmp_path / "resumed/app" / RESUME_MODEL)["w"], torch.ones(2))
    client = json.loads((tmp_path / "resumed/app/config/config_fed_client.json").read_text())
    learner = next(e["executor"] for e in client["executors"] if "SiteLearner" in e["executor"]["path"])
    assert learner["args"]["resume"] == {"site-1": "simulate_job-a", "site-2": "simulate_job-b"}
    # the original job is untouched
    assert "resume" not in (REPO / "jobs/fed_dp/app/config/config_fed_client.json").read_text()


def test_a_job_that_averages_its_global_models_resumes_its_average_too(tmp_path):
    run = _stopped_run(tmp_path / "ws", completed_round=1, average={"w": torch.full((2,), 0.5)})
    resume_job(run, REPO / "jobs" / "fed_dp", tmp_path / "resumed")
    server = json.loads((tmp_path / "resumed/app/config/config_fed_server.json").read_text())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    assert persistor["args"]["resume_average"] == RESUME_AVERAGE
    assert torch.equal(torch.load(tmp_path / "resumed/app" / RESUME_AVERAGE)["w"], torch.full((2,), 0.5))


def test_nothing_to_resume_is_an_error_naming_the_file(tmp_path):
    run = _stopped_run(tmp_path / "ws", completed_round=4)
    with pytest.raises(ResumeError, match="completed all its rounds"):
        resume_job(run, REPO / "jobs" / "fed_dp", tmp_path / "resumed")
    with pytest.raises(ResumeError, match="no dpseg_resume.pt under"):
        resume_job(tmp_path / "empty", REPO / "jobs" / "fed_dp", tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()
