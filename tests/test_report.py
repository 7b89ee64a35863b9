"""The report from a server run folder: missing contributions per round."""

import json

from dpseg.report import build_report, format_report


def test_rounds_without_a_sites_contribution_are_listed(tmp_path):
    run = tmp_path / "server" / "simulate_job"
    run.mkdir(parents=True)
    site = {"privacy": {"dp": False, "unit": "patient"}, "metrics": {"val_dice": 0.5}, "steps": 2}
    rounds = [{"round": 0, "sites": {"site-1": site, "site-2": site}, "seconds": 3.0},
              {"round": 1, "sites": {"site-1": site}, "seconds": 4.0}]
    (run / "dpseg_rounds.json").write_text(json.dumps(rounds))
    report = build_report(tmp_path)
    assert report["missing_contributions"] == [{"round": 1, "sites": ["site-2"]}]
    assert report["sites"]["site-2"]["rounds"] == 1
    assert "round 1: no contribution from site-2" in format_report(report)
