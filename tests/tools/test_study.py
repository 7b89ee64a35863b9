import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from dpseg.tools.study import GRIDS, Study, summarize
from dpseg.tools.studyreport import write_figures, write_markdown


def _run(arm, kind, seed, dice, eps=None):
    return {"arm": arm, "kind": kind, "epsilon": eps, "seed": seed, "wall_seconds": 60.0 + seed,
            "train_seconds": 30.0, "epsilon_spent": eps and eps - 0.01,
            "dice_per_site": {"site-1": dice, "site-2": dice - 0.1}, "mean_dice": dice - 0.05}


def test_arms_cover_the_public_model_local_pooled_fl_every_epsilon_and_the_random_start(cohort, tmp_path):
    study = Study(GRIDS["quick"], cohort, tmp_path / "work", tmp_path / "out")
    assert study.sites == ["site-1", "site-2"]
    names = [a.name for a in study.arms()]
    assert names == ["public model alone", "local site-1", "local site-2", "pooled", "FL", "FL+DP eps 8",
                     "FL+DP eps 3", "FL+DP eps 1", "FL+DP eps 8 (random start)"]
    assert len({a.slug for a in study.arms()}) == len(names)
    assert [a.start for a in study.arms()].count("random") == 1  # every other arm starts from the bundle
    assert study.arms(seed=0) == study.arms()  # the quick grid has no ablation


def test_the_ablation_turns_on_each_technique_alone_for_the_first_seed_only(cohort, tmp_path):
    study = Study(GRIDS["full"], cohort, tmp_path / "work", tmp_path / "out")
    first, later = study.arms(seed=0), study.arms(seed=1)
    extra = first[len(later):]
    assert first[:len(later)] == later and [a.name for a in extra] == [
        "FL+DP eps 8, 4 slices per patient", "FL+DP eps 8, decoder layers only", "FL+DP eps 8, averaged (decay 0.8)"]
    assert [(a.slices_per_patient, a.train_layers, a.average_decay) for a in extra] == [
        (4, "all", 0.0), (1, "decoder", 0.0), (1, "all", 0.8)]
    assert not any(a.ablation for a in later) and all(a.start == "bundle" for a in extra)
    assert len({a.slug for a in first}) == len(first) and all(a.slug.isascii() and " " not in a.slug for a in first)
    assert GRIDS["full"].run_minutes("fed_dp", 4) == 4 * GRIDS["full"].run_minutes("fed_dp")
    with pytest.raises(FileNotFoundError, match="no site-"):
        Study(GRIDS["quick"], tmp_path, tmp_path / "w", tmp_path / "o")


def test_relative_folders_reach_the_simulator_as_absolute_paths(cohort, tmp_path, monkeypatch):
    monkeypatch.chdir(cohort.parent)  # as `make study-quick` runs: folders relative to the checkout
    study = Study(GRIDS["quick"], Path(cohort.name), Path("work"), Path("out"))
    assert study.work == cohort.parent / "work" and study.out == cohort.parent / "out"
    env = study.env(study.work / "run", ["site-1"])
    assert Path(env["DPSEG_DATA_ROOT"]).is_absolute() and Path(env["DPSEG_DATA_ROOT"]) == cohort.resolve()
    assert Path(env["DPSEG_LEDGER"]).is_absolute()
    assert Path(env["DPSEG_LEDGER"].replace("{site}", "site-1")).is_file()  # a new ledger per run and site


def test_summary_gives_mean_and_spread_over_seeds():
    runs = [_run("FL", "fed", s, d) for s, d in enumerate([0.90, 0.94, 0.92])] + [_run("FL+DP eps 8", "fed_dp", 0, 0.8, 8.0)]
    fl, dp = summarize(runs)
    assert fl["seeds"] == 3 and fl["mean_dice"] == pytest.approx(0.87) and fl["sd_dice"] == pytest.approx(0.02)
    assert (fl["min_dice"], fl["max_dice"]) == (pytest.approx(0.85), pytest.approx(0.89))
    assert fl["dice_per_site"]["site-2"] == pytest.approx(0.82) and fl["wall_seconds"] == 61.0
    assert dp["seeds"] == 1 and dp["sd_dice"] is None and dp["epsilon_spent"] == pytest.approx(7.99)


def test_results_page_and_figures(tmp_path):
    example = tmp_path / "ex"
    example.mkdir()
    np.save(example / "truth.npy", np.zeros((1, 8, 8)))
    np.save(example / "reconstruction.npy", np.ones((1, 8, 8)) * 0.5)
    runs = [_run("FL", "fed", 0, 0.9), _run("pooled", "pooled", 0, 0.95), _run("local site-1", "local", 0, 0.7),
            _run("FL+DP eps 8", "fed_dp", 0, 0.8, 8.0), _run("FL+DP eps 1", "fed_dp", 0, 0.6, 1.0),
            {**_run("FL+DP eps 8, decoder layers only", "fed_dp", 0, 0.82, 8.0), "ablation": "decoder layers only"}]
    audit = {"level": "no DP", "epsilon": None, "wall_seconds": 10.0, "examples": [str(example)],
             "summary": {"attack": {"iterations": 20, "restarts": 1, "label": "known", "prior": "synthetic"},
                         "scored": 2, "mean": {"ssim": 0.3, "baseline_ssim": 0.5, "identified": 0.5, "psnr": 12.0,
                                               "slice_rank": 3.5, "baseline_slice_rank": 250.0,
                                               "patient_identified": 1.0, "patient_chance": 0.1,
                                               "ssim_aligned": 0.4, "informed_identified": 1.0, "chance_mask": 0.5}}}
    results = {"grid": {**GRIDS["quick"].__dict__}, "date": "2026-01-01 00:00 UTC", "machine": "test CPU",
               "sites": ["site-1", "site-2"], "total_minutes": 3.0, "runs": runs, "summary": summarize(runs),
               "audits": [audit]}
    figures = write_figures(results, tmp_path / "figures")
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in figures.values()) and set(figures) == {
        "privacy_utility", "reconstructions"}
    md = write_markdown(results, {k: p.relative_to(tmp_path) for k, p in figures.items()})
    assert "| FL+DP eps 8 | 0.750 | 1 seed | 0.800 | 0.700 | 7.99 | 60 |" in md
    assert "Dice gap, FL without DP minus FL with DP: eps 8: +0.100, eps 1: +0.300." in md  # no ablation arm
    assert "| FL+DP eps 8, decoder layers only | 0 | 0.770 | 0.750 | +0.020 | 60 | 60 |" in md
    assert ("| no DP | 2 | 0.300 | 0.400 | 0.500 | 12.0 | 0.50 | 4 | 250 | 1.00 | - | - | 0.50 | - | 1.00 | 0.100 "
            "| - | - | - |") in md
    assert "GDP" not in md  # the central-limit approximation is gone: at 1-2 steps it is wrong both ways
    assert "Empirical epsilon" not in md  # no canary audit in these results
    row = {"runs": 2, "canaries": 800, "epsilon_lower_bound": 1.5, "epsilon_lower_bound_gdp": 7.1, "caught": False}
    results["privacy_audits"] = [{"claimed_epsilon": e, "results": [
        {**row, "variant": "shipped", "broken": False},
        {**row, "variant": "noise off", "broken": True, "epsilon_lower_bound_gdp": 40.0, "caught": True}]} for e in (8.0, 1.0)]
    canary_md = write_markdown(results, {})
    assert "2 runs x 400 canaries per variant" in canary_md
    assert "| variant | broken | claimed 8 | claimed 1 | caught |" in canary_md
    assert "| shipped | no | 1.50 / 7.10 | 1.50 / 7.10 | no, no |" in canary_md
    assert "| noise off | yes | 1.50 / 40.00 | 1.50 / 40.00 | yes, yes |" in canary_md
    del results["privacy_audits"]
    assert "the true label mask given to the attacker" in md and "prior synthetic" in md
    assert "![Privacy and utility](figures/quick_privacy_utility.png)" in md
    json.dumps(results)  # the results are plain JSON


def test_a_finished_run_is_kept_an_unfinished_one_starts_again(tmp_path):
    from dpseg.tools.study import finished, keep

    grid, run = GRIDS["quick"], tmp_path / "seed0" / "FL"
    assert finished(run, grid) is None and run.is_dir()
    (run / "half_done.log").write_text("killed")
    assert finished(run, grid) is None and not (run / "half_done.log").exists()  # emptied: starts again
    kept = keep(run, grid, {"arm": "FL", "mean_dice": 0.9})
    assert kept["finished"].endswith("UTC") and finished(run, grid) == kept
    assert finished(run, replace(grid, minutes_per_run={"fed": 99.0})) == kept  # estimates are not settings
    with pytest.raises(ValueError, match="other study settings"):
        finished(run, GRIDS["full"])
    # another attack keeps the training runs but not the audits
    stronger = replace(grid, attack_iterations=grid.attack_iterations + 1)
    assert finished(run, stronger) == kept
    audit = tmp_path / "audit" / "no_DP"
    assert finished(audit, grid, audit=True) is None
    keep(audit, grid, {"level": "no DP", "summary": {"attack": grid.attack()}})
    assert finished(audit, grid, audit=True)["level"] == "no DP"
    with pytest.raises(ValueError, match="other study settings"):
        finished(audit, stronger, audit=True)
    # the attack the audit ran (the audit job's arguments, which the grid does not hold) must be today's
    keep(audit, grid, {"level": "no DP", "summary": {"attack": {**grid.attack(), "warp_grid": 4}}})
    with pytest.raises(ValueError, match="an audit with another attack"):
        finished(audit, grid, audit=True)


def test_a_study_refuses_kept_audits_of_another_attack_before_it_starts(tmp_path, cohort):
    from dpseg.tools.study import audit_folder, keep, run_study

    grid, messages = GRIDS["quick"], []
    study = Study(grid, cohort, tmp_path / "work", tmp_path / "out", progress=messages.append)
    audit_folder(study, None).mkdir(parents=True)
    keep(audit_folder(study, None), replace(grid, attack_iterations=grid.attack_iterations + 1), {"level": "no DP"})
    with pytest.raises(ValueError, match="no_DP/result.json was written with other study settings"):
        run_study(study)
    assert messages == [] and not (tmp_path / "work" / "seed0").exists()  # nothing announced, nothing trained


def test_the_estimate_is_per_arm_kind_where_measured():
    full = GRIDS["full"]
    assert full.run_minutes("pooled") > full.run_minutes("local")
    assert replace(full, minutes_per_run=2).run_minutes("fed_dp") == 2.0
    assert replace(full, minutes_per_run={"fed": 3.0}).run_minutes("local") == 3.0  # unknown kind: the largest


def test_the_study_command_refuses_audits_alone_without_published_runs(cohort, tmp_path):
    from conftest import run_cli

    mixed = run_cli("study", "--quick", "--audits-only", "--only", "fed", cwd=tmp_path)
    assert mixed.returncode == 2 and "--audits-only trains nothing" in mixed.stderr
    assert not (tmp_path / "study_quick").exists()  # refused before writing a cohort
    missing = run_cli("study", "--quick", "--audits-only", "--data", str(cohort), "--work", str(tmp_path / "work"),
                      "--out", str(tmp_path / "out"))
    assert missing.returncode == 2 and "study_quick.json is missing" in missing.stderr, missing.stderr
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())  # nothing started


def test_a_stopped_study_goes_on_from_its_published_results_without_its_work_folder(cohort, tmp_path):
    from dpseg.tools.study import run_study

    grid, out, messages = replace(GRIDS["quick"], seeds=[0, 1]), tmp_path / "out", []

    def stop_at_the_second_run(message: str) -> None:
        messages.append(message)
        if message.startswith("[2/2]"):
            raise KeyboardInterrupt  # the study is stopped while its second run starts

    with pytest.raises(KeyboardInterrupt):
        run_study(Study(grid, cohort, tmp_path / "work", out, progress=stop_at_the_second_run), only={"public"},
                  audit=False)
    partial = json.loads((out / "study_quick.json").read_text())
    assert partial["complete"] is False and partial["planned"] == {"runs": 2, "audits": 0, "privacy_audits": 0}
    assert [(r["arm"], r["seed"]) for r in partial["runs"]] == [("public model alone", 0)]
    page = (out / "results_quick.md").read_text()
    assert "**Not complete**: 1 of 2 training runs, 0 of 0 audits and 0 of 0 canary audits so far" in page
    (out / "results_quick.md").write_text(page + "\n## Notes kept by hand\n\nwritten by a person\n")

    # on another machine: no work folder, the out folder's results only
    again = []
    results = run_study(Study(grid, cohort, tmp_path / "other_work", out, progress=again.append), only={"public"},
                        audit=False)
    assert again[0].startswith("study 'quick': 2 training runs and 0 audits, 1 runs and 0 audits kept from earlier")
    assert any(m.startswith("[1/2] public model alone, seed 0: finished earlier") for m in again)
    assert results["complete"] is True and results["runs"][0] == partial["runs"][0]
    assert [(r["arm"], r["seed"]) for r in results["runs"]] == [("public model alone", 0), ("public model alone", 1)]
    page = (out / "results_quick.md").read_text()
    assert "Not complete" not in page and page.endswith("## Notes kept by hand\n\nwritten by a person\n")

    # results of other training settings keep nothing: they are replaced
    other, last = replace(grid, rounds=grid.rounds + 1, seeds=[0]), []
    replaced = run_study(Study(other, cohort, tmp_path / "third_work", out, progress=last.append), only={"public"},
                         audit=False)
    assert "none of its runs is kept" in last[0] and not any("finished earlier" in m for m in last)
    assert json.loads((out / "study_quick.json").read_text())["grid"]["rounds"] == other.rounds
    assert replaced["complete"] is True
