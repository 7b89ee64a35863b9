"""`dpseg.tools.study` on a tiny grid, in the real simulator: one FL+DP training run and the audit job
(`jobs/fed_dp_audit`) with and without DP. The study's results page and figures, and the audit
job itself (interception, audit tasks at the sites, every score kept at the sites and only
acknowledgements at the server, report)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from dpseg.report import build_report
from dpseg.tools.study import Grid, Study, run_study

pytestmark = pytest.mark.xdist_group("tiny_study")  # one worker runs the tiny study, once
GRID = Grid("tiny", [6, 6], rounds=1, local_epochs=1.0, batch_size=2, sample_rate=0.5, local_steps=2,
            epsilons=[8.0], seeds=[0],
            audit_rounds=1, attack_iterations=10, attack_restarts=1, attack_refine_iterations=10, minutes_per_run=1, minutes_per_audit=1,
            privacy_audit_runs=1, privacy_audit_canaries=100, minutes_per_privacy_audit=1)
REPORT_KEYS = {"ssim", "ssim_aligned", "psnr", "mse", "identified", "patient_identified", "baseline_ssim", "chance",
               "chance_mask", "patient_chance_mask", "informed_identified", "informed_slice_rank",
               "informed_patient_identified", "seconds"}


@pytest.fixture(scope="session")
def tiny_study(cohort, tmp_path_factory):
    """The tiny grid run once: (study, results, progress messages)."""
    root = tmp_path_factory.mktemp("tiny_study")
    messages = []
    study = Study(GRID, cohort, root / "work", root / "out", progress=messages.append)
    return study, run_study(study, only={"fed_dp"}), messages


def test_tiny_study_trains_scores_audits_and_writes_the_results(tiny_study, cohort):
    study, results, messages = tiny_study
    assert messages[0].startswith("study 'tiny': 1 training runs and 2 audits (and 1 canary audits of the DP step); "
                                  "estimated 4 min to go")
    assert any(m.startswith("[1/1] FL+DP eps 8, seed 0: mean test Dice") for m in messages)
    (run,) = results["runs"]
    assert run["arm"] == "FL+DP eps 8" and 0 < run["epsilon_spent"] <= 8.0
    assert set(run["dice_per_site"]) == {"site-1", "site-2"} and all(0 <= d <= 1 for d in run["dice_per_site"].values())
    assert [a["level"] for a in results["audits"]] == ["no DP", "eps 8"]
    no_dp = results["audits"][0]
    assert no_dp["summary"]["scored"] == 2 and no_dp["examples"]  # one update per site, reconstructions kept
    md = (study.out / "results_tiny.md").read_text()
    assert "| FL+DP eps 8 |" in md and "| no DP | 2 |" in md and "| eps 8 |" in md
    assert (study.out / "figures" / "tiny_privacy_utility.png").exists()
    # the canary audit of the DP step at the grid's epsilon, through the same FL+DP settings
    (canary,) = results["privacy_audits"]
    assert canary["claimed_epsilon"] == 8.0 and canary["mechanism"]["local_steps"] == 2
    assert len(canary["results"]) == 6 and canary["results"][0]["variant"] == "shipped"
    assert "## Empirical epsilon (canary audit of the DP step)" in md and "| noise off | yes |" in md
    assert (study.work / "privacy_audit" / "eps_8" / "privacy_audit.json").exists()
    assert (study.out / "figures" / "tiny_reconstructions.png").exists()
    assert json.loads((study.out / "study_tiny.json").read_text())["summary"][0]["arm"] == "FL+DP eps 8"

    # run again on the same work folder: every run and audit is kept, nothing trains again
    again = []
    second = run_study(Study(GRID, cohort, study.work, study.out.parent / "out2", progress=again.append),
                       only={"fed_dp"})
    assert again[0].startswith("study 'tiny': 1 training runs and 2 audits (and 1 canary audits of the DP step), 1 runs "
                               "and 2 audits kept from earlier; estimated 0 min to go")
    assert any(m.startswith("[1/1] FL+DP eps 8, seed 0: finished earlier") for m in again)
    assert second["runs"] == results["runs"] and second["audits"] == results["audits"]
    assert second["privacy_audits"] == results["privacy_audits"]
    # and on a copy of it elsewhere: the kept audits find their reconstructions in the copy
    moved = study.out.parent / "moved_work"
    shutil.copytree(study.work, moved)
    third = run_study(Study(GRID, cohort, moved, study.out.parent / "out3", progress=again.append), only={"fed_dp"})
    examples = [Path(e) for a in third["audits"] for e in a["examples"]]
    assert examples and all(e.is_relative_to(moved) and (e / "reconstruction.npy").exists() for e in examples)


def test_the_audits_alone_keep_the_published_training_runs(tiny_study, cohort, monkeypatch):
    study, results, _ = tiny_study
    messages = []
    alone = run_study(Study(GRID, cohort, study.work, study.out, progress=messages.append), audits_only=True)
    assert messages[0].startswith("study 'tiny': the 2 audits alone, 2 kept from earlier (training runs: the 1 of "
                                  f"{study.out / 'study_tiny.json'}); estimated 0 min to go")
    assert not any(m.startswith("[1/") for m in messages)  # nothing trained
    assert alone["runs"] == results["runs"] and alone["audits"] == results["audits"]
    # runs of other training settings, or no published study, are refused before anything starts
    before = len(messages)
    other = Grid(**{**GRID.__dict__, "rounds": 2})
    with pytest.raises(ValueError, match="other training settings"):
        run_study(Study(other, cohort, study.work, study.out, progress=messages.append), audits_only=True)
    with pytest.raises(FileNotFoundError, match="study_tiny.json is missing"):
        run_study(Study(GRID, cohort, study.work, study.out.parent / "empty", progress=messages.append),
                  audits_only=True)
    # a kept audit of another attack than the audit job's now is refused too
    from dpseg import jobs

    now = jobs.job_attack()
    monkeypatch.setattr(jobs, "job_attack", lambda: {**now, "warp_grid": 4})
    with pytest.raises(ValueError, match="an audit with another attack"):
        run_study(Study(GRID, cohort, study.work, study.out, progress=messages.append), audits_only=True)
    assert len(messages) == before  # the refused ones wrote nothing


NEVER_AT_THE_SERVER = REPORT_KEYS | {"slice_rank", "informed_seconds", "patient_rank", "baseline_ssim", "baseline_slice_rank",
                                     "patients_in_update", "cohort_slices", "cohort_patients", "patient_chance",
                                     "batch_size", "matching_loss", "released"}


def _keys(value) -> set[str]:
    """Every key at any depth of a JSON value."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


@pytest.mark.parametrize("level", ["no_DP", "eps_8"])
def test_the_audit_job_keeps_every_score_at_the_sites_and_the_server_gets_acknowledgements_only(tiny_study, level):
    study, _, _ = tiny_study
    dp = level != "no_DP"
    ws = max((study.work / "audit" / level).glob("ws*"))  # ws, or ws_rerun if the study ran it again
    attack = {"iterations": 10, "restarts": 1, "label": "known", "simulate": "single", "prior": "synthetic",
              "prior_components": 256, "prior_candidates": 20, "noise": 0.03, "noise_draws": 4,
              "refine_iterations": 10, "warp_grid": 6, "warp_step": 0.01}
    # the server: the attack, where the results are, and per site a data-free acknowledgement
    server_file = json.loads(next((ws / "server").rglob("dpseg_audit.json")).read_text())
    assert server_file["attack"] == attack and "kept at the sites" in server_file["results"]
    assert [(s["site"], s["rounds"]) for s in server_file["sites"]] == [("site-1", [0]), ("site-2", [0])]
    assert all(s == {"site": s["site"], "rounds": [0], "status": "kept at the site", "release": "none"}
               for s in server_file["sites"]), server_file["sites"]
    assert not _keys(server_file) & NEVER_AT_THE_SERVER
    server = ws / "server"  # reconstructions and figures stay at the sites; the server's run folder holds none
    assert not list(server.rglob("*.npy")) and not list(server.rglob("*.png")) and not list(server.rglob("*.npz"))
    # the sites: every score, in their own workspace (the study read them there)
    audit = build_report(ws)["site_audit"]
    assert audit["attack"] == attack and audit["failed"] == 0
    rows = audit["updates"]
    assert sorted((r["site"], r["round"]) for r in rows) == [("site-1", 0), ("site-2", 0)]
    for row in rows:
        assert all(isinstance(v, (bool, int, float, str)) for v in row.values()), row
        assert row["dp"] is dp
        if row["patients_in_update"] == 0:
            assert dp  # an empty Poisson sample; without DP the audit job samples exactly one patient
            continue
        assert REPORT_KEYS <= set(row)
        assert 0 <= row["identified"] <= 1 and row["chance"] == pytest.approx(1 / row["cohort_slices"])
        assert 1 <= row["slice_rank"] <= row["cohort_slices"] and 1 <= row["baseline_slice_rank"] <= row["cohort_slices"]
        assert row["prior"] == "synthetic" and row["baseline_ssim"] >= row["baseline_ssim_prior"]
        assert row["patient_chance"] == pytest.approx(1 / row["cohort_patients"]) and row["cohort_patients"] >= 2
        assert row["chance"] <= row["chance_mask"] <= 1 and 0 <= row["ssim_aligned"] <= 1
        if dp:
            assert 0 < row["epsilon"] <= 8.0 and 0 <= row["bound_eps_delta"] <= 1
            # the tight bound is no looser than e^eps x chance + delta (up to its discretisation margin)
            assert row["chance"] <= row["bound"] <= 1.02 * row["bound_eps_delta"] + 1e-6
            # identifying the patient is easier by chance, and so with the mask given: no lower bounds
            assert row["bound_eps_delta"] <= row["bound_patient_eps_delta"] <= 1
            assert row["bound"] <= row["bound_patient"] <= 1 and row["bound"] <= row["bound_mask"] <= 1
        else:  # without DP the informed attacker names the true slice (one slice per update)
            assert row["informed_identified"] == 1.0 and row["informed_slice_rank"] == 1.0
    # the study built the attacker's public prior once, before the audits; no site built its own
    assert len(list((study.work / "audit_prior").glob("prior_*.npz"))) == 1
    assert not any((ws / site / "audit_prior").exists() for site in {r["site"] for r in rows})
    scored = [r for r in rows if r["patients_in_update"]]
    for row in scored:
        folder = ws / row["site"] / "dpseg_audit" / "simulate_job" / f"round{row['round']}"
        assert (folder / "comparison.png").stat().st_size > 0
        assert np.load(folder / "reconstruction.npy").shape[-2:] == (128, 128)
    text = run_cli("report", str(ws))
    assert text.returncode == 0 and "results kept at the sites" in text.stdout and "pat.id" in text.stdout
    saved = json.loads((ws / "dpseg_report.json").read_text())
    assert saved["site_audit"]["scored"] == len(scored) and "released" not in saved["audit"]["sites"][0]
    site = run_cli("report", str(ws / "site-1"))  # at a site: its own results only
    assert site.returncode == 0 and "site-1: released nothing to the server" in site.stdout
    assert "site-2" not in site.stdout
