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
from dpseg.slices import SliceSet


def test_cohort_locates_the_trained_slice_and_identification_scores(bundle, cohort):
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    slices = SliceSet(items, bundle.volume_transforms())
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
                     "--refine-iterations", "2", "--json", str(tmp_path / "m.json"))
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
    stored = SliceSet(resolve(datalist, "training"), bundle.volume_transforms()).slices
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


def test_privacy_bounds_for_the_slice_and_the_patient_with_and_without_the_mask():
    from dpseg.auditor import privacy_bounds
    from dpseg.privacy import reconstruction_bound, reconstruction_bound_eps_delta

    chances = {"chance": 1e-3, "patient_chance": 0.1, "chance_mask": 0.5, "patient_chance_mask": 1.0}
    assert privacy_bounds({"dp": False}, chances) == {"dp": False}
    dp = {"dp": True, "epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.5, "sample_rate": 0.05, "steps": 10,
          "planned_steps": 100}
    bounds = privacy_bounds(dp, chances)
    assert bounds["bound_eps_delta"] == reconstruction_bound_eps_delta(1.0, 1e-5, 1e-3)
    assert bounds["bound_patient_eps_delta"] == pytest.approx(2.718281828 * 0.1 + 1e-5)
    # the tight bound is on the job's whole profile (its planned steps, not the 10 so far)
    assert bounds["bound"] == reconstruction_bound([(1.5, 0.05, 100)], 1e-3) > reconstruction_bound([(1.5, 0.05, 10)], 1e-3)
    assert bounds["bound"] < bounds["bound_patient"] < bounds["bound_mask"] < bounds["bound_patient_mask"] == 1.0
    assert "bound_patient" not in privacy_bounds(dp, {"chance": 1e-3})  # no patient count, no patient bound


def test_the_audit_workflow_takes_the_jobs_attack_and_refuses_what_sites_set():
    from dpseg.auditjob import AuditController
    from dpseg.jobs import job_attack

    assert AuditController(**job_attack()).attack == job_attack()
    with pytest.raises(ValueError, match="batch_size.*set by each site"):
        AuditController(iterations=5, batch_size=2)
    with pytest.raises(TypeError, match="iteratons"):
        AuditController(iteratons=5)
    with pytest.raises(ValueError, match="warp_grid 0 or >= 2"):
        AuditController(warp_grid=1)


# ------------------------------------------------------------------ the audit task at a site (SiteAuditor)
TINY_ATTACK = {"iterations": 2, "restarts": 1, "label": "known", "simulate": "single", "prior": "none"}
NEVER_SENT = {"slice_rank", "patient_rank", "baseline_slice_rank", "patients_in_update", "cohort_slices",
              "cohort_patients", "chance", "patient_chance", "batch_size", "seconds", "matching_loss"}


def _site_with_two_audited_rounds(bundle, cohort, root, release: str | None = None) -> tuple:
    """A site's workspace ``root`` (its settings in local/dpseg_site.json) with the job folder
    ``job1/app_site-1`` holding two rounds of training batches (one patient each, as the audit job
    trains), and the server's records of the two updates. Returns (FL context, records)."""
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext

    from dpseg.learner import save_batches

    datalist = cohort / "site-1" / "datalist.json"
    (root / "local").mkdir(parents=True)
    settings = {"datalist": str(datalist), **({"audit_release": release} if release else {})}
    (root / "local" / "dpseg_site.json").write_text(json.dumps(settings))
    app_dir = root / "job1" / "app_site-1"
    records = []
    for current_round in (0, 1):
        net = bundle.network()
        global_state = {k: v.clone() for k, v in net.state_dict().items()}
        trainer = LocalTrainer(net, bundle.loss(), PatientSlices(resolve(datalist, "training"), bundle.train_transforms()),
                               0.01, 1, None, seed=current_round, optimizer="sgd", sampling="fixed", record=True)
        trainer.run(1)
        save_batches(app_dir, current_round, trainer.batches)
        update = {k: net.state_dict()[k] - global_state[k] for k, _ in net.named_parameters()}
        records.append({"site": "site-1", "round": current_round, "update": update, "global": global_state,
                        "meta": {"privacy": {"dp": False}, "training": {"local_steps": 1, "learning_rate": 0.01,
                                                                         "batch_size": 1}}})
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-1", private=False, sticky=True)
    fl_ctx.set_prop(FLContextKey.APP_ROOT, str(app_dir), private=True, sticky=False)
    return fl_ctx, records


def _run_audit_task(fl_ctx, records, attack=TINY_ATTACK):
    from nvflare.apis.signal import Signal

    from dpseg.auditjob import audit_task
    from dpseg.auditor import SiteAuditor

    return SiteAuditor().execute("audit", audit_task(records, attack), fl_ctx, Signal())


@pytest.fixture
def no_site_env(monkeypatch):
    for var in ("DPSEG_DATALIST", "DPSEG_DATA_ROOT", "DPSEG_LEDGER", "DPSEG_TOTAL_EPSILON", "DPSEG_AUDIT_RELEASE"):
        monkeypatch.delenv(var, raising=False)


def test_by_default_the_audit_reply_holds_nothing_about_the_training_slices(bundle, cohort, tmp_path, no_site_env):
    from nvflare.apis.dxo import from_shareable
    from nvflare.apis.fl_constant import ReturnCode

    from dpseg.auditresults import SITE_RESULTS_FILE, acknowledgement

    fl_ctx, records = _site_with_two_audited_rounds(bundle, cohort, tmp_path)
    reply = _run_audit_task(fl_ctx, records)
    assert reply.get_return_code() == ReturnCode.OK
    assert from_shareable(reply).data == acknowledgement("none", None) == {"status": "kept at the site",
                                                                          "release": "none"}
    # everything stays in the site's folder of this job, readable there
    folder = tmp_path / "dpseg_audit" / "job1"
    kept = json.loads((folder / SITE_RESULTS_FILE).read_text())
    assert kept["release"] == "none" and kept["released"] is None and kept["attack"] == TINY_ATTACK
    assert [(r["site"], r["round"]) for r in kept["updates"]] == [("site-1", 0), ("site-1", 1)]
    assert all({"ssim", "slice_rank", "patients_in_update", "cohort_slices"} <= set(r) for r in kept["updates"])
    assert all((folder / f"round{r}" / "reconstruction.npy").exists() for r in (0, 1))
    assert "SSIM" in (folder / "audit.log").read_text()  # the scores go to the site's audit log, not the job's
    report = run_cli("report", str(tmp_path))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "kept at the sites" in report.stdout and "site-1: released nothing" in report.stdout


def test_a_site_that_releases_aggregates_sends_only_means_marked_not_dp_protected(bundle, cohort, tmp_path,
                                                                                   no_site_env):
    from nvflare.apis.dxo import from_shareable

    from dpseg.auditresults import RELEASED_KEYS, received

    fl_ctx, records = _site_with_two_audited_rounds(bundle, cohort, tmp_path, release="aggregate")
    data = from_shareable(_run_audit_task(fl_ctx, records)).data
    assert set(data) == {"status", "release", "released"} and data["release"] == "aggregate"
    released = data["released"]
    assert released["dp_protected"] is False and "NOT DP-protected" in released["note"]
    assert set(released["means"]) == set(RELEASED_KEYS) and not NEVER_SENT & (set(data) | set(released["means"]))
    kept = json.loads((tmp_path / "dpseg_audit" / "job1" / "audit_results.json").read_text())
    ssims = [r["ssim"] for r in kept["updates"]]
    assert released["means"]["ssim"] == pytest.approx(sum(ssims) / 2)  # the mean over the two updates, not either
    assert received(data) == data  # the server keeps it as sent, marked
    # with one update only, the "mean" would be one slice's values: nothing is released
    fl_ctx, records = _site_with_two_audited_rounds(bundle, cohort, tmp_path / "one", release="aggregate")
    assert "released" not in from_shareable(_run_audit_task(fl_ctx, records[:1])).data
    report = run_cli("report", str(tmp_path / "dpseg_audit" / "job1"))
    assert report.returncode == 0 and "NOT DP-protected" in report.stdout


def test_a_job_naming_a_prior_file_is_refused_before_the_site_reads_it(bundle, cohort, tmp_path, no_site_env):
    from nvflare.apis.fl_constant import ReturnCode

    from dpseg.auditjob import AuditController
    from dpseg.wire import ERROR_HEADER

    public = cohort / "site-2" / "datalist.json"  # a real datalist: the site must not read it for the job
    fl_ctx, records = _site_with_two_audited_rounds(bundle, cohort, tmp_path)
    for attack in ({**TINY_ATTACK, "prior": str(public)}, {**TINY_ATTACK, "prior": "synthetic",
                                                           "prior_components": "1/../../x"}):
        reply = _run_audit_task(fl_ctx, records, attack)
        assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
        assert "audit refused: attack_prior" in reply.get_header(ERROR_HEADER)
    assert not (tmp_path / "dpseg_audit").exists() and not (tmp_path / "audit_prior").exists()  # nothing read or built
    with pytest.raises(ValueError, match="attack_prior in the audit job's config_fed_server.json must name a built-in"):
        AuditController(prior=str(public))
    with pytest.raises(TypeError, match="attack_prior_components .* must be a plain int"):
        AuditController(prior_components="1/../x")


def test_the_audit_jobs_attack_is_the_attacks_defaults_and_dpseg_audit_adds_none_of_its_own():
    from dataclasses import fields

    from dpseg.auditjob import SITE_SET
    from dpseg.cli import AUDIT_OPTIONS, build_parser
    from dpseg.inversion import AttackSettings
    from dpseg.jobs import job_attack

    defaults = {f.name: f.default for f in fields(AttackSettings)}
    job = job_attack()
    assert job == {k: defaults[k] for k in job}, {k: (v, defaults[k]) for k, v in job.items() if v != defaults[k]}
    assert {"iterations", "prior", "noise", "refine_iterations", "warp_grid"} <= set(job)
    # dpseg audit: every attack option it offers is a field, and none has a default of its own
    args = build_parser().parse_args(["audit", "--update", "u.pt", "--data", "d.pt"])
    assert set(AUDIT_OPTIONS) <= set(defaults) - set(SITE_SET)
    assert all(getattr(args, k) is None for k in AUDIT_OPTIONS)
