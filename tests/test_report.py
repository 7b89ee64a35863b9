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


def test_the_servers_audit_file_says_the_results_are_at_the_sites_and_marks_released_means(tmp_path):
    from dpseg.auditresults import KEPT_NOTE, acknowledgement, received
    from dpseg.report import format_report

    run = tmp_path / "server" / "simulate_job"
    run.mkdir(parents=True)
    site = {"privacy": {"dp": False, "unit": "patient"}, "metrics": {"val_dice": 0.5}, "steps": 2}
    (run / "dpseg_rounds.json").write_text(json.dumps([{"round": 0, "sites": {"site-1": site, "site-2": site}}]))
    released = received(acknowledgement("aggregate", {"ssim": 0.41, "identified": 0.5}))
    audit = {"attack": {"iterations": 300, "restarts": 1, "label": "known", "simulate": "single", "prior": "synthetic"},
             "results": KEPT_NOTE, "sites": [{"site": "site-1", "rounds": [0], **received(acknowledgement("none", None))},
                                             {"site": "site-2", "rounds": [0], **released}]}
    (run / "dpseg_audit.json").write_text(json.dumps(audit))
    report = build_report(tmp_path)
    assert report["audit"]["released"] == {"site-2": released["released"]} and report["site_audit"] is None
    text = format_report(report)
    assert "results kept at the sites" in text and "site-1     rounds 0: kept at the site, release none" in text
    released_line = next(line for line in text.splitlines() if line.startswith("released audit metrics"))
    assert "NOT DP-protected" in released_line and "0.410" in text
