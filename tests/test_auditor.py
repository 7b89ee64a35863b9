"""Scoring an audit (no NVFlare): cohort slices, locating the true slice, identification and ranks,
the CLI with and without the attacker's prior."""

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from dpseg.auditor import score
from dpseg.datalist import resolve
from dpseg.dptrain import LocalTrainer, PatientSlices, seeded_slices
from dpseg.metrics import ssim
from dpseg.slices import Cohort


def test_cohort_locates_the_trained_slice_and_identification_scores(bundle, cohort):
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    slices = Cohort(items, bundle.volume_transforms())
    assert slices.slices.shape[1:] == (128, 128) and len(slices) == len(slices.owners)
    data = seeded_slices(items, bundle.train_transforms(), 0)
    x, _ = data.batch([2])
    index = slices.locate(x[0, 0].numpy(), 2)
    assert slices.owners[index, 0] == 2
    assert np.abs((slices.slices[index] - slices.slices[index].mean()) - (x[0, 0].numpy() - x[0, 0].numpy().mean())).max() < 1e-4
    perfect = score(x[:, 0].numpy(), x[:, 0].numpy(), slices, [index])
    assert perfect["ssim"] > 0.99 and perfect["identified"] == 1.0 and perfect["patient_identified"] == 1.0
    assert perfect["slice_rank"] == 1 and perfect["patient_rank"] == 1
    blank = score(np.zeros((1, 128, 128), np.float32), x[:, 0].numpy(), slices, [index])
    assert blank["ssim"] < 0.9 and blank["psnr"] < perfect["psnr"]
    assert 1 <= blank["patient_rank"] <= blank["slice_rank"] <= len(slices)
    other = index + 1 if slices.owners[index + 1, 0] == 2 else index - 1  # a neighbouring slice of the same patient
    near = score(slices.slices[other][None], x[:, 0].numpy(), slices, [index])
    assert near["slice_rank"] == 2 and near["patient_rank"] == 1 and near["identified"] == 0.0


def test_audit_cli_on_a_saved_update(bundle, cohort, tmp_path):
    datalist = cohort / "site-1" / "datalist.json"
    net = bundle.network()
    global_state = {k: v.clone() for k, v in net.state_dict().items()}
    trainer = LocalTrainer(net, bundle.loss(), PatientSlices(resolve(datalist, "training"), bundle.train_transforms()),
                           0.01, 1, None, seed=0, optimizer="sgd", sampling="fixed", record=True)
    trainer.run(1)
    update = {k: net.state_dict()[k] - global_state[k] for k, _ in net.named_parameters()}
    torch.save(update, tmp_path / "update.pt")
    torch.save(global_state, tmp_path / "model.pt")
    torch.save(trainer.batches, tmp_path / "batches.pt")
    common = ["--update", str(tmp_path / "update.pt"), "--model", str(tmp_path / "model.pt"), "--data",
              str(tmp_path / "batches.pt"), "--datalist", str(datalist), "--local-lr", "0.01"]
    out = tmp_path / "audit"
    result = run_cli("audit", *common, "--out", str(out), "--iterations", "4", "--restarts", "1", "--prior", "none",
                     "--json", str(tmp_path / "m.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["iterations"] == 4 and metrics["patients_in_update"] == 1 and metrics["dp"] is False
    assert -1 <= metrics["ssim"] <= 1 and metrics["chance"] == 1 / metrics["cohort_slices"]
    assert metrics["patient_chance"] == 1 / metrics["cohort_patients"] and metrics["cohort_patients"] >= 2
    assert 1 <= metrics["slice_rank"] <= metrics["cohort_slices"] and metrics["prior"] == "none"
    baselines = {k: v for k, v in metrics.items() if k.startswith("baseline_ssim_")}
    assert set(baselines) == {"baseline_ssim_random", "baseline_ssim_blank", "baseline_ssim_mean_image"}
    assert metrics["baseline_ssim"] == max(baselines.values())
    truth = np.load(out / "truth.npy")
    assert metrics["baseline_ssim_blank"] == pytest.approx(ssim(np.zeros_like(truth[0]), truth[0]))
    # the truth is the patient's stored slice (training's random intensity shift removed)
    stored = Cohort(resolve(datalist, "training"), bundle.volume_transforms()).slices
    assert any(np.array_equal(truth[0], s) for s in stored)
    assert (out / "comparison.png").stat().st_size > 0 and np.load(out / "reconstruction.npy").shape == (1, 128, 128)
    # with a prior from public slices: here the other site's patients stand in for public CT
    public = cohort / "site-2" / "datalist.json"
    result = run_cli("audit", *common, "--iterations", "4", "--restarts", "2", "--prior", str(public),
                     "--prior-components", "16", "--prior-candidates", "5", "--refine-iterations", "3", "--noise", "0",
                     "--json", str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "p.json").read_text())
    assert metrics["prior"] == str(public) and metrics["iterations"] == 4 * 2 + 3
    assert {"baseline_ssim_prior", "baseline_identified", "baseline_slice_rank"} <= set(metrics)
    assert metrics["baseline_ssim"] >= metrics["baseline_ssim_prior"] > 0.2  # a public CT slice, not noise
    assert 1 <= metrics["baseline_patient_rank"] <= metrics["baseline_slice_rank"] <= metrics["cohort_slices"]
    bad = run_cli("audit", *common, "--prior", str(tmp_path / "no_such.json"))
    assert bad.returncode == 2 and "no_such.json" in bad.stderr
    missing = run_cli("audit", "--update", str(tmp_path / "update.pt"), "--data", str(tmp_path / "batches.pt"))
    assert missing.returncode == 2 and "--model" in missing.stderr


def test_privacy_bounds_for_the_slice_and_for_the_patient():
    from dpseg.auditor import privacy_bounds
    from dpseg.privacy import reconstruction_bound_eps_delta

    assert privacy_bounds({"dp": False}, 1e-3, 0.1) == {"dp": False}
    dp = {"dp": True, "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.5, "sample_rate": 0.05, "steps": 100}
    bounds = privacy_bounds(dp, 1e-3, 0.1)
    assert bounds["bound_eps_delta"] == reconstruction_bound_eps_delta(1.0, 1e-5, 1e-3)
    assert bounds["bound_patient_eps_delta"] == pytest.approx(2.718281828 * 0.1 + 1e-5)
    assert bounds["bound_gdp"] < bounds["bound_patient_gdp"] < 1
    assert "bound_patient_eps_delta" not in privacy_bounds(dp, 1e-3)  # no patient count, no patient bound


def test_the_audit_workflow_takes_the_jobs_attack_and_refuses_what_sites_set():
    from dpseg.auditor import AuditController
    from dpseg.jobs import job_attack

    assert AuditController(**job_attack()).attack == job_attack()
    with pytest.raises(ValueError, match="batch_size.*set by each site"):
        AuditController(iterations=5, batch_size=2)
    with pytest.raises(TypeError, match="iteratons"):
        AuditController(iteratons=5)
    with pytest.raises(ValueError, match="warp_grid 0 or >= 2"):
        AuditController(warp_grid=1)
