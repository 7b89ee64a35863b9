"""Auditing, at a site, what a curious server could reconstruct from the updates it receives.

Threat model: an honest-but-curious server sees every update, the global model it was computed
from and the public training settings; it does not see the data. Here the server only intercepts
the updates; the attack (``dpseg.inversion``) runs AT THE SITE the update came from, which scores
the reconstructions against its own training slices. Everything that scoring yields stays at that
site (``dpseg.auditresults``: ``<site workspace>/dpseg_audit/<job id>/``): reconstructions,
per-update scores, ranks, cohort sizes, realised batch sizes. None of it is DP-protected or counted
in the site's ledger, so the server gets an acknowledgement only, unless the site itself chooses
to release aggregate means (its ``audit_release`` setting), which are marked NOT DP-protected.

The server side (``UpdateInterceptor``, ``AuditController``, the task) is ``dpseg.auditjob``.

- ``SiteAuditor`` (site executor): runs the attack, with the attacker's public image prior
  (``dpseg.prior``: a built-in one the job names, built once in the site's workspace), scores it
  (``audit_update``) and keeps the results.

The scoring functions (``score``, ``audit_update``) need no NVFlare; ``dpseg audit`` uses them.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import JobConstants, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal

from dpseg.auditjob import check_job_attack, round_key, task_updates
from dpseg.auditresults import (RELEASE_AGGREGATE, RELEASE_NONE, SITE_RESULTS_FILE, acknowledgement,
                                released_means, site_audit_folder, write_site_results)
from dpseg.bundle import Bundle
from dpseg.datalist import resolve
from dpseg.identification import candidate_scores, identification
from dpseg.inversion import AttackSettings, Reconstruction, invert, observed_descent
from dpseg.metrics import mse, psnr, ranking, ssim, ssim_aligned
from dpseg.prior import ImagePrior, load_prior
from dpseg.privacy import reconstruction_bound_eps_delta, reconstruction_bounds
from dpseg.slices import SliceSet
from dpseg.wire import AUDIT_TASK, ERROR_HEADER, PrivacyMeta, error_header
from dpseg.workspace import allow_list_refusal

AUDIT_LOG = "audit.log"  # in the site's audit folder


# ------------------------------------------------------------------------------------------ scoring
def score(reconstruction: np.ndarray, truths: np.ndarray, site_slices: SliceSet | None = None,
          true_indices: list[int] | None = None) -> dict:
    """Metrics of reconstructions (R, H, W) against the true images (T, H, W): for each true image
    the best-matching reconstruction's SSIM, PSNR (dB) and MSE, and the best SSIM after a
    least-squares intensity alignment (``ssim_aligned``), averaged over the true images; with
    ``site_slices`` (the site's training slices), identification: its slices ranked by similarity to that reconstruction,
    ``slice_rank`` of the true slice and ``patient_rank`` of the true patient's first slice (1 is
    the top), and the share of true images identified (rank 1) as the slice (``identified``) or as
    the patient (``patient_identified``)."""
    out = {"ssim": [], "ssim_aligned": [], "psnr": [], "mse": [], "identified": [], "patient_identified": [],
           "slice_rank": [], "patient_rank": []}
    for t, truth in enumerate(truths):
        scores = [ssim(r, truth) for r in reconstruction]
        best = reconstruction[int(np.argmax(scores))]
        out["ssim"].append(max(scores))
        out["ssim_aligned"].append(max(ssim_aligned(r, truth) for r in reconstruction))
        out["psnr"].append(psnr(best, truth))
        out["mse"].append(mse(best, truth))
        if site_slices is not None and true_indices is not None:
            order = ranking(best, site_slices.slices)
            slice_rank = 1 + int(np.flatnonzero(order == true_indices[t])[0])
            patient_rank = 1 + int(np.flatnonzero(site_slices.owners[order, 0] == site_slices.owners[true_indices[t], 0])[0])
            out["slice_rank"].append(slice_rank)
            out["patient_rank"].append(patient_rank)
            out["identified"].append(slice_rank == 1)
            out["patient_identified"].append(patient_rank == 1)
    return {k: float(np.mean(v)) for k, v in out.items() if v}


def attack_settings(training: dict, **attack) -> AttackSettings:
    """The attack (``attack``: iterations, restarts, label, simulate, seed, prior, ...) with the
    site's public local-training settings (``training``: local_steps, learning_rate, batch_size)."""
    return AttackSettings(**attack, local_steps=int(training.get("local_steps", 1)),
                          local_lr=float(training.get("learning_rate", 1.0)),
                          batch_size=max(1, round(float(training.get("batch_size", 1)))))


def audit_update(network: torch.nn.Module, loss_fn: torch.nn.Module, update: dict, settings: AttackSettings,
                 images: torch.Tensor, labels: torch.Tensor, site_slices: SliceSet | None = None,
                 patients: list[int] | None = None, privacy: dict | None = None,
                 out_dir: Path | None = None, progress=None, prior: ImagePrior | None = None) -> dict:
    """Attack one update and score it against the true batch (``images``, ``labels``: (T, 1, H, W),
    the slices as trained; ``patients``: their indices in ``site_slices``' patients, for identification;
    ``prior``: the attacker's public image prior when ``settings.prior`` names one). With ``site_slices``,
    the truth is each patient's stored slice (the trained image without training's random
    intensity shift) and the reconstruction is the attack's estimate of it (its estimated shift
    removed); without one, the trained images.

    Returns scalar metrics only (about the site's training slices: the site keeps them,
    ``dpseg.auditresults``): the reconstruction's scores, the uninformed baselines (guesses made
    without the update: the attack's own, that is its random start or the prior's guess from public
    slices; a blank slice; the mean of ``site_slices``; ``baseline_ssim`` is the best of them, and the
    attack's own guess is also identified against ``site_slices``: ``baseline_identified``,
    ``baseline_patient_identified``, ``baseline_slice_rank``, ``baseline_patient_rank``),
    identification against ``site_slices`` with its chance levels (``chance``: 1 / slices; with the
    mask given, ``chance_mask``: ``SliceSet.mask_chances``), the informed adversary's identification
    where ``site_slices`` holds the masks (``informed_attack``), and for a DP update the bounds on
    identification success (``privacy_bounds``). With ``out_dir`` the reconstruction, the truth and a
    side-by-side PNG are written there (the site's own folder).
    """
    if settings.label == "known":
        settings = AttackSettings(**{**asdict(settings), "batch_size": len(images)})
    shape = tuple(images.shape[-2:])
    truths, true_indices, informed = images[:, 0].numpy(), None, {}
    if site_slices is not None:  # the patients' stored slices, without training's random shift
        true_indices = [site_slices.locate(t, p) for t, p in zip(truths, patients)]
        if site_slices.labels is not None:  # before the inversion, on the global weights
            informed = informed_attack(network, loss_fn, update, site_slices, true_indices, privacy, settings.local_lr)
    rec: Reconstruction = invert(network, loss_fn, update, settings, shape,
                                 label=labels if settings.label == "known" else None, progress=progress, prior=prior)
    recon = rec.unshifted()[:, 0].numpy()
    if true_indices is not None:  # score against the patients' stored slices
        truths = site_slices.slices[true_indices]
    metrics = {"patients_in_update": len(images), "label": settings.label, "simulate": settings.simulate,
               "prior": settings.prior, "iterations": rec.iterations, "restarts": settings.restarts,
               "seconds": rec.seconds, "matching_loss": rec.matching_loss, **score(recon, truths, site_slices, true_indices),
               **informed}
    guess = score(rec.initial[:, 0].numpy(), truths, site_slices, true_indices)
    metrics[f"baseline_ssim_{rec.initial_kind}"] = guess["ssim"]
    metrics.update({f"baseline_{k}": guess[k] for k in ("identified", "patient_identified", "slice_rank",
                                                         "patient_rank") if k in guess})
    # a blank slice (air, the window's lower bound, everywhere): most of a CT slice is air at exactly
    # that value, so SSIM rewards it; a reconstruction has to beat it to show anything
    metrics["baseline_ssim_blank"] = score(np.zeros_like(truths), truths)["ssim"]
    if site_slices is not None:
        metrics["baseline_ssim_mean_image"] = score(site_slices.mean_image[None], truths)["ssim"]
        metrics["cohort_slices"] = len(site_slices)
        metrics["chance"] = 1.0 / len(site_slices)
        metrics["cohort_patients"] = len(np.unique(site_slices.owners[:, 0]))
        metrics["patient_chance"] = 1.0 / metrics["cohort_patients"]
        given = np.array([site_slices.mask_chances(i) for i in true_indices])
        metrics["chance_mask"], metrics["patient_chance_mask"] = (float(v) for v in given.mean(axis=0))
    metrics["baseline_ssim"] = max(v for k, v in metrics.items() if k.startswith("baseline_ssim_"))
    metrics.update(privacy_bounds(privacy, {k: metrics[k] for k in CHANCES if k in metrics}))
    if out_dir is not None:
        save_reconstruction(Path(out_dir), recon, truths, metrics)
    return metrics


def informed_attack(network: torch.nn.Module, loss_fn, update: dict, site_slices: SliceSet, true_indices: list[int],
                    privacy: dict | None, learning_rate: float) -> dict:
    """The informed adversary's identification (``dpseg.identification``) of the update's slices
    among ``site_slices`` (with their masks), and its time (``informed_seconds``)."""
    started = time.perf_counter()
    names = [n for n, p in network.named_parameters() if p.requires_grad]
    images = torch.from_numpy(site_slices.slices[:, None])
    labels = torch.from_numpy(site_slices.labels[:, None].astype(np.float32))
    meta = PrivacyMeta.from_dict(privacy) if privacy else None
    scores = candidate_scores(network, loss_fn, observed_descent(update, names), names, images, labels, meta,
                              learning_rate)
    return {**identification(scores, true_indices, site_slices.owners),
            "informed_seconds": time.perf_counter() - started}


# the chance levels of the audit's attackers: key of the chance -> suffix of its bounds' keys
CHANCES = {"chance": "", "patient_chance": "_patient", "chance_mask": "_mask", "patient_chance_mask": "_patient_mask"}


def privacy_bounds(privacy: dict | None, chances: dict[str, float]) -> dict:
    """DP facts of the audited update and, for each chance level in ``chances`` (keys of ``CHANCES``:
    the slice, 1 / slices, and the patient, 1 / patients, for an attacker not given the mask; the
    same with the mask given, ``SliceSet.mask_chances``), bounds on identification: ``bound<unit>``
    the tight one on the job's privacy profile over all its planned steps (``reconstruction_bound``),
    ``bound<unit>_eps_delta`` the looser e^eps * chance + delta at the epsilon spent so far. The DP
    unit is a patient, so they hold for the patient too."""
    meta = PrivacyMeta.from_dict(privacy) if privacy else None
    if meta is None or not meta.dp:
        return {"dp": False}
    out = {"dp": True, "epsilon": meta.epsilon, "delta": meta.delta, "noise_multiplier": meta.noise_multiplier,
           "sample_rate": meta.sample_rate, "steps": meta.steps}
    # the job's whole profile (every step of every round: what the server sees by the job's end)
    history = [(meta.noise_multiplier, meta.sample_rate, meta.planned_steps or meta.steps)]
    keys = [key for key in CHANCES if key in chances]
    for key, bound in zip(keys, reconstruction_bounds(history, [chances[k] for k in keys])):
        out[f"bound{CHANCES[key]}"] = bound
        out[f"bound{CHANCES[key]}_eps_delta"] = reconstruction_bound_eps_delta(meta.epsilon, meta.delta, chances[key])
    return out


def save_reconstruction(out_dir: Path, recon: np.ndarray, truths: np.ndarray, metrics: dict) -> Path:
    """Write reconstruction.npy, truth.npy and comparison.png (truth | reconstruction) into out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "reconstruction.npy", recon)
    np.save(out_dir / "truth.npy", truths)
    rows = max(len(truths), len(recon))
    fig, axes = plt.subplots(rows, 2, figsize=(5, 2.6 * rows), squeeze=False)
    for i in range(rows):
        for j, (name, stack) in enumerate((("truth", truths), ("reconstruction", recon))):
            ax = axes[i, j]
            ax.axis("off")
            if i < len(stack):
                ax.imshow(stack[i].T, cmap="gray", vmin=0, vmax=1, origin="lower")
                ax.set_title(name if j == 0 else f"{name}, SSIM {metrics.get('ssim', float('nan')):.2f}", fontsize=8)
    fig.tight_layout()
    path = out_dir / "comparison.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ site
class SiteAuditor(Executor):
    """The site's side of an audit: attack the updates it sent, score them against its own images,
    keep everything at the site.

    Needs the site's training batches of the audited rounds, kept by the learner
    (``record_batches``) in the site's job folder. Results, reconstructions and the attack's
    progress go to ``<site workspace>/dpseg_audit/<job id>/`` (``dpseg.auditresults``); the job's
    log gets no data-dependent value (NVFlare can stream a job's log to the server). The reply is
    ``dpseg.auditresults.acknowledgement``: nothing about the training slices unless the site's
    own ``audit_release`` setting (``dpseg.site.audit_release``) releases aggregate means.
    The attack's settings come from the job (``check_job_attack``: plain values, a built-in prior);
    everything read from disk is the site's: its settings, its batches, its installed bundle.
    """

    def __init__(self, task_name: str = AUDIT_TASK):
        super().__init__()
        self.task_name = task_name
        self.site_slices: SliceSet | None = None
        self.priors: dict[tuple, ImagePrior | None] = {}

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != self.task_name:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        from dpseg.learner import site_folders

        app_dir, root = site_folders(fl_ctx)
        refusal = allow_list_refusal(fl_ctx.get_identity_name(), root,
                                     app_dir / "config" / JobConstants.CLIENT_JOB_CONFIG, str(fl_ctx.get_job_id()))
        if refusal:  # before anything else: the site's allow-list does not allow this job
            self.log_error(fl_ctx, refusal)
            return _error_reply(error_header("config"))
        try:
            attack = check_job_attack(from_shareable(shareable).get_meta_prop("attack") or {})
        except (TypeError, ValueError) as err:  # about the job's settings only: the server may know why
            self.log_error(fl_ctx, f"audit refused: {err}")
            return _error_reply(f"audit refused: {err}")
        try:
            return self._execute(shareable, attack, fl_ctx)
        except Exception:  # the server learns that the audit failed; the why stays at the site
            self.log_exception(fl_ctx, "audit failed")
            return _error_reply(error_header("audit"))

    def _execute(self, shareable: Shareable, attack: dict, fl_ctx: FLContext) -> Shareable:
        from dpseg.learner import site_folders
        from dpseg.simulator import SIMULATOR_JOB_ID
        from dpseg.site import audit_prior_dir, audit_release, load_site_settings

        site = fl_ctx.get_identity_name()
        app_dir, root = site_folders(fl_ctx)
        job_id = app_dir.parent.name
        release = audit_release(root)
        folder = site_audit_folder(root, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        log = _audit_log(folder)
        updates = task_updates(from_shareable(shareable))
        bundle = Bundle()
        if self.site_slices is None:
            settings = load_site_settings(site, root, None, require_ledger=False,
                                          edited_in=root.parent if job_id == SIMULATOR_JOB_ID else None)
            self.log_info(fl_ctx, "loading the site's training slices for identification")
            self.site_slices = SliceSet(resolve(settings.datalist, "training"), bundle.volume_transforms(),
                                        with_labels=True)
        key = (attack.get("prior", "none"), attack.get("prior_components", AttackSettings.prior_components))
        if key not in self.priors:  # built once, kept in the site's audit_prior_dir
            self.priors[key] = load_prior(key[0], audit_prior_dir(root), bundle.volume_transforms(), key[1],
                                          progress=lambda m: self.log_info(fl_ctx, m))
        rows: list[dict] = []
        for update in updates:
            self.log_info(fl_ctx, f"auditing round {update['round']}; results kept in {folder}")
            rows.append({"site": site, "round": update["round"],
                         **self._audit_round(update, app_dir, attack, bundle, folder, log, self.priors[key])})
            write_site_results(folder, site, job_id, attack, release, rows)
        released = released_means(rows) if release == RELEASE_AGGREGATE else None
        write_site_results(folder, site, job_id, attack, release, rows, released)
        if failed := [r["round"] for r in rows if "error" in r]:
            self.log_error(fl_ctx, f"audit of round(s) {failed} failed; see {folder / SITE_RESULTS_FILE}")
            return _error_reply(error_header("audit"))
        self.log_info(fl_ctx, f"audit done: results kept in {folder}; release to the server: {release}"
                              + ("" if release == RELEASE_NONE else
                                 f" ({'aggregate means' if released else 'nothing: too few scored updates'})"))
        return DXO(DataKind.METRICS, data=acknowledgement(release, released)).to_shareable()

    def _audit_round(self, update: dict, app_dir: Path, attack: dict, bundle: Bundle, folder: Path, log,
                     prior: ImagePrior | None) -> dict:
        """One update's metrics (``audit_update``), or ``error`` with the reason; never raises."""
        from dpseg.learner import batches_path

        current_round = update["round"]
        try:
            batches = torch.load(batches_path(app_dir, current_round), weights_only=True)
        except FileNotFoundError:
            return {"error": f"no training batches kept for round {current_round} (the learner needs record_batches)"}
        try:
            return self._audit(update, attack, batches, bundle, folder / round_key(current_round), log, prior)
        except Exception as err:
            log(f"round {current_round} failed:\n{traceback.format_exc()}")
            return {"error": f"{type(err).__name__}: {err}"}

    def _audit(self, update: dict, attack: dict, batches: list[dict], bundle: Bundle, out_dir: Path, log,
               prior: ImagePrior | None) -> dict:
        """Attack ``update`` (``task_updates``) with the job's ``attack`` settings and score it
        against the first of the round's ``batches``; scalar metrics, figures in ``out_dir``."""
        training, privacy = update["training"], update["privacy"]
        if len(batches) != 1:
            log(f"round {update['round']}: {len(batches)} local steps in the audited round: scoring the first batch")
        batch = batches[0]
        if not batch["patients"]:
            log(f"round {update['round']}: no patient in the audited update (empty Poisson sample)")
            return {"patients_in_update": 0, **privacy_bounds(privacy, {})}
        settings = attack_settings(training, **attack, intensity_shift=bundle.intensity_shift())
        network = bundle.network()
        network.load_state_dict(update["global"], strict=True)
        metrics = audit_update(network, bundle.loss(), update["update"], settings, batch["images"], batch["labels"],
                               self.site_slices, batch["patients"], privacy, out_dir, progress=log, prior=prior)
        log(f"round {update['round']}: SSIM {metrics['ssim']:.3f} (baseline {metrics['baseline_ssim']:.3f}), "
            f"identified {metrics['identified']:.2f} (true slice ranked {metrics['slice_rank']:.0f} of "
            f"{metrics['cohort_slices']}), {metrics['seconds']:.0f} s")
        return metrics


def _error_reply(message: str) -> Shareable:
    reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
    reply.set_header(ERROR_HEADER, message)
    return reply


def _audit_log(folder: Path):
    """A function that appends a time-stamped line to ``folder/audit.log`` (the site's own log of
    its audits: the attack's progress and scores, which stay out of the job's log)."""
    path = Path(folder) / AUDIT_LOG

    def log(message: str) -> None:
        with open(path, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
    return log
