"""`dpseg.study` on a tiny grid: one FL+DP training run and the audit with and without DP, in the
real simulator; the results page and figures are written."""

import json

from dpseg.study import Grid, Study, run_study


def test_tiny_study_trains_scores_audits_and_writes_the_results(cohort, tmp_path):
    grid = Grid("tiny", [6, 6], rounds=1, local_epochs=1.0, batch_size=2, epsilons=[8.0], seeds=[0],
                audit_rounds=1, attack_iterations=10, attack_restarts=1, minutes_per_run=1, minutes_per_audit=1)
    messages = []
    study = Study(grid, cohort, tmp_path / "work", tmp_path / "out", progress=messages.append)
    results = run_study(study, only={"fed_dp"})
    assert messages[0].startswith("study 'tiny': 1 training runs and 2 audits; estimated 3 min")
    assert any(m.startswith("[1/1] FL+DP eps 8, seed 0: mean test Dice") for m in messages)
    (run,) = results["runs"]
    assert run["arm"] == "FL+DP eps 8" and 0 < run["epsilon_spent"] <= 8.0
    assert set(run["dice_per_site"]) == {"site-1", "site-2"} and all(0 <= d <= 1 for d in run["dice_per_site"].values())
    assert [a["level"] for a in results["audits"]] == ["no DP", "eps 8"]
    no_dp = results["audits"][0]
    assert no_dp["summary"]["scored"] == 2 and no_dp["examples"]  # one update per site, reconstructions kept
    md = (tmp_path / "out" / "results_tiny.md").read_text()
    assert "| FL+DP eps 8 |" in md and "| no DP | 2 |" in md and "| eps 8 |" in md
    assert (tmp_path / "out" / "figures" / "tiny_privacy_utility.png").exists()
    assert (tmp_path / "out" / "figures" / "tiny_reconstructions.png").exists()
    assert json.loads((tmp_path / "out" / "study_tiny.json").read_text())["summary"][0]["arm"] == "FL+DP eps 8"
