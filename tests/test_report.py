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


def test_audit_table_with_ranks_and_the_attacks_prior(tmp_path):
    from dpseg.report import format_audit, summarize_audit

    scored = {"site": "site-1", "round": 0, "dp": False, "ssim": 0.7, "baseline_ssim": 0.65, "identified": 0.0,
              "slice_rank": 12.0, "baseline_slice_rank": 300.0, "patient_rank": 4.0, "chance": 1e-3, "seconds": 60.0}
    audit = summarize_audit({"attack": {"iterations": 300, "restarts": 3, "label": "known", "simulate": "single",
                                        "prior": "synthetic"},
                             "updates": [scored, {**scored, "site": "site-2", "slice_rank": 2.0, "identified": 0.0},
                                         {"site": "site-1", "round": 1, "error": "RuntimeError: boom"}]})
    assert audit["scored"] == 2 and audit["failed"] == 1
    assert audit["mean"]["slice_rank"] == 7.0 and audit["mean"]["baseline_slice_rank"] == 300.0
    text = "\n".join(format_audit(audit))
    assert "prior synthetic" in text and "b.rank" in text and "failed: RuntimeError: boom" in text
    mean_row = next(line for line in text.splitlines() if line.startswith("mean"))
    assert " 7 " in mean_row and " 300 " in mean_row
