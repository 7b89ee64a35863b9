"""Auditing what a curious server could reconstruct from the updates it receives.

Threat model: an honest-but-curious server sees every update, the global model it was computed
from and the public training settings; it does not see the data. Here the server only intercepts
the updates; the attack (``dpseg.inversion``) runs AT THE SITE the update came from, which scores
the reconstructions against its own images. Reconstructions and figures stay in that site's
workspace; only scalar metrics go back to the server.

- ``UpdateInterceptor`` (server component): saves the updates of the audited rounds exactly as
  the aggregator receives them (after every filter), with the global model each was computed from.
- ``AuditController`` (server workflow, after training): sends each intercepted update back to its
  site as an ``audit`` task and writes the returned metrics to ``dpseg_audit.json``.
- ``SiteAuditor`` (site executor): runs the attack, with the attacker's public image prior
  (``dpseg.prior``, built once in the site's workspace), and scores it (``audit_update``).

The scoring functions (``score``, ``audit_update``) need no NVFlare; ``dpseg audit`` uses them.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from dpseg.bundle import Bundle
from dpseg.datalist import resolve
from dpseg.inversion import AttackSettings, Reconstruction, invert
from dpseg.metrics import mse, psnr, ranking, ssim
from dpseg.prior import ImagePrior, load_prior
from dpseg.privacy import reconstruction_bound_eps_delta, reconstruction_bound_gdp
from dpseg.report import AUDIT_FILE
from dpseg.slices import Cohort

AUDIT_TASK = "audit"
INTERCEPT_DIR = "intercepted"


# ------------------------------------------------------------------------------------------ scoring
def score(reconstruction: np.ndarray, truths: np.ndarray, cohort: Cohort | None = None,
          true_indices: list[int] | None = None) -> dict:
    """Metrics of reconstructions (R, H, W) against the true images (T, H, W): for each true image
    the best-matching reconstruction's SSIM, PSNR (dB) and MSE, averaged over the true images; with
    a cohort, identification: the cohort's slices ranked by similarity to that reconstruction,
    ``slice_rank`` of the true slice and ``patient_rank`` of the true patient's first slice (1 is
    the top), and the share of true images identified (rank 1) as the slice (``identified``) or as
    the patient (``patient_identified``)."""
    out = {"ssim": [], "psnr": [], "mse": [], "identified": [], "patient_identified": [], "slice_rank": [],
           "patient_rank": []}
    for t, truth in enumerate(truths):
        scores = [ssim(r, truth) for r in reconstruction]
        best = reconstruction[int(np.argmax(scores))]
        out["ssim"].append(max(scores))
        out["psnr"].append(psnr(best, truth))
        out["mse"].append(mse(best, truth))
        if cohort is not None and true_indices is not None:
            order = ranking(best, cohort.slices)
            slice_rank = 1 + int(np.flatnonzero(order == true_indices[t])[0])
            patient_rank = 1 + int(np.flatnonzero(cohort.owners[order, 0] == cohort.owners[true_indices[t], 0])[0])
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
                 images: torch.Tensor, labels: torch.Tensor, cohort: Cohort | None = None,
                 patients: list[int] | None = None, privacy: dict | None = None,
                 out_dir: Path | None = None, progress=None, prior: ImagePrior | None = None) -> dict:
    """Attack one update and score it against the true batch (``images``, ``labels``: (T, 1, H, W),
    the slices as trained; ``patients``: their indices in the cohort's items, for identification;
    ``prior``: the attacker's public image prior when ``settings.prior`` names one). With a cohort,
    the truth is each patient's stored slice (the trained image without training's random
    intensity shift) and the reconstruction is the attack's estimate of it (its estimated shift
    removed); without one, the trained images.

    Returns scalar metrics only: the reconstruction's scores, the uninformed baselines (guesses made
    without the update: the attack's own, that is its random start or the prior's guess from public
    slices; a blank slice; the cohort's mean slice; ``baseline_ssim`` is the best of them, and the
    attack's own guess is also identified against the cohort: ``baseline_identified``,
    ``baseline_patient_identified``, ``baseline_slice_rank``, ``baseline_patient_rank``),
    identification against the cohort with its chance level, and for a DP update the theoretical
    bound on identification success. With ``out_dir`` the reconstruction, the truth and a
    side-by-side PNG are written there (the site's own folder).
    """
    if settings.label == "known":
        settings = AttackSettings(**{**asdict(settings), "batch_size": len(images)})
    shape = tuple(images.shape[-2:])
    rec: Reconstruction = invert(network, loss_fn, update, settings, shape,
                                 label=labels if settings.label == "known" else None, progress=progress, prior=prior)
    recon, truths = rec.unshifted()[:, 0].numpy(), images[:, 0].numpy()
    true_indices = None
    if cohort is not None:  # score against the patients' stored slices, without training's random shift
        true_indices = [cohort.locate(t, p) for t, p in zip(truths, patients)]
        truths = cohort.slices[true_indices]
    metrics = {"patients_in_update": len(images), "label": settings.label, "simulate": settings.simulate,
               "prior": settings.prior, "iterations": rec.iterations, "restarts": settings.restarts,
               "seconds": rec.seconds, "matching_loss": rec.matching_loss, **score(recon, truths, cohort, true_indices)}
    guess = score(rec.initial[:, 0].numpy(), truths, cohort, true_indices)
    metrics[f"baseline_ssim_{rec.initial_kind}"] = guess["ssim"]
    metrics.update({f"baseline_{k}": guess[k] for k in ("identified", "patient_identified", "slice_rank",
                                                         "patient_rank") if k in guess})
    # a blank slice (air, the window's lower bound, everywhere): most of a CT slice is air at exactly
    # that value, so SSIM rewards it; a reconstruction has to beat it to show anything
    metrics["baseline_ssim_blank"] = score(np.zeros_like(truths), truths)["ssim"]
    if cohort is not None:
        metrics["baseline_ssim_mean_image"] = score(cohort.mean_image[None], truths)["ssim"]
        metrics["cohort_slices"] = len(cohort)
        metrics["chance"] = 1.0 / len(cohort)
        metrics["cohort_patients"] = len(np.unique(cohort.owners[:, 0]))
        metrics["patient_chance"] = 1.0 / metrics["cohort_patients"]
    metrics["baseline_ssim"] = max(v for k, v in metrics.items() if k.startswith("baseline_ssim_"))
    metrics.update(privacy_bounds(privacy, metrics.get("chance"), metrics.get("patient_chance")))
    if out_dir is not None:
        save_reconstruction(Path(out_dir), recon, truths, metrics)
    return metrics


def privacy_bounds(privacy: dict | None, chance: float | None, patient_chance: float | None = None) -> dict:
    """DP facts of the audited update and, with chance levels, the bounds on identification of the
    slice (``chance``: 1 / slices) and of the patient (``patient_chance``: 1 / patients; the DP unit
    is a patient, so the same bounds hold with the patient as the thing to identify)."""
    if not privacy or not privacy.get("dp"):
        return {"dp": False}
    out = {"dp": True, "epsilon": privacy["epsilon"], "delta": privacy["delta"],
           "noise_multiplier": privacy["noise_multiplier"], "sample_rate": privacy["sample_rate"],
           "steps": privacy["steps"]}
    for unit, baseline in (("", chance), ("_patient", patient_chance)):
        if baseline is not None:
            out[f"bound{unit}_eps_delta"] = reconstruction_bound_eps_delta(privacy["epsilon"], privacy["delta"],
                                                                           baseline)
            out[f"bound{unit}_gdp"] = reconstruction_bound_gdp(privacy["noise_multiplier"], privacy["sample_rate"],
                                                               privacy["steps"], baseline)
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


# ------------------------------------------------------------------------------------------ server
class UpdateInterceptor(FLComponent):
    """Saves the audited rounds' updates as the aggregator receives them, with their global model.

    rounds / sites: which to keep (empty: all). Files: ``<server run>/intercepted/round<r>_<site>.pt``
    holding ``update`` (weight difference), ``global`` (the global weights it was computed from),
    ``meta`` (the privacy and public training settings the site sent), ``site`` and ``round``.
    """

    def __init__(self, rounds: list[int] | None = None, sites: list[str] | None = None):
        super().__init__()
        self.rounds, self.sites = set(rounds or []), set(sites or [])
        self.folder: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
            self.folder = run_dir / INTERCEPT_DIR
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._intercept(fl_ctx)

    def _intercept(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        current_round = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, "?") if result is not None else "?"
        if result is None or (self.rounds and current_round not in self.rounds) or (self.sites and site not in self.sites):
            return
        dxo = from_shareable(result)
        global_model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
        weights = global_model[ModelLearnableKey.WEIGHTS]
        record = {"site": site, "round": current_round,
                  "update": {k: torch.as_tensor(np.asarray(v)) for k, v in dxo.data.items()},
                  "global": {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()},
                  "meta": {"privacy": dxo.get_meta_prop("privacy"), "training": dxo.get_meta_prop("training")}}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.folder / f"round{current_round}_{site}.pt")
        self.log_info(fl_ctx, f"intercepted the update of {site} in round {current_round}")

    def records(self) -> list[Path]:
        return sorted(self.folder.glob("round*_*.pt"), key=lambda p: p.stat().st_mtime) if self.folder else []


class AuditController(Controller):
    """After training, sends every intercepted update back to its site as an ``audit`` task and
    writes the sites' metrics (scalars only) to ``<server run>/dpseg_audit.json``.

    ``attack``: the attack's settings as the job gives them, ``dpseg.inversion.AttackSettings``
    fields (iterations, restarts, label, simulate, prior, ...; the audit job sets every one it
    exposes, the rest take AttackSettings' defaults), except those each site sets from its own
    training (``SITE_SET``).
    """

    SITE_SET = ("local_steps", "local_lr", "batch_size", "intensity_shift")

    def __init__(self, interceptor_id: str = "interceptor", task_name: str = AUDIT_TASK, task_timeout: int = 0,
                 **attack):
        super().__init__()
        self.interceptor_id, self.task_name, self.task_timeout = interceptor_id, task_name, task_timeout
        if site_set := sorted(set(attack) & set(self.SITE_SET)):
            raise ValueError(f"{site_set}: set by each site from its training, not by the audit job")
        self.attack = dict(attack)
        AttackSettings(**self.attack)  # refuse bad settings when the job starts
        self.results: list[dict] = []
        self.lock = threading.Lock()

    def start_controller(self, fl_ctx: FLContext):
        self.interceptor = fl_ctx.get_engine().get_component(self.interceptor_id)
        if not isinstance(self.interceptor, UpdateInterceptor):
            self.system_panic(f"component '{self.interceptor_id}' is not an UpdateInterceptor", fl_ctx)
        self.run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        records = self.interceptor.records()
        self.log_info(fl_ctx, f"auditing {len(records)} intercepted updates at their sites")
        for path in records:
            record = torch.load(path, weights_only=True)
            data = {"update": {k: v.numpy() for k, v in record["update"].items()},
                    "global": {k: v.numpy() for k, v in record["global"].items()}}
            meta = {"round": record["round"], "attack": self.attack, **record["meta"]}
            task = Task(name=self.task_name, data=DXO(DataKind.COLLECTION, data=data, meta=meta).to_shareable(),
                        timeout=self.task_timeout, result_received_cb=self._received)
            self.broadcast(task=task, fl_ctx=fl_ctx, targets=[record["site"]], min_responses=1)
        while self.get_num_standing_tasks():
            if abort_signal.triggered:
                return
            time.sleep(0.5)
        self._save()
        self.log_info(fl_ctx, f"audit results written to {self.run_dir / AUDIT_FILE}")

    def _received(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        result, site = client_task.result, client_task.client.name
        record = {"site": site, "round": from_shareable(client_task.task.data).get_meta_prop("round")}
        if result.get_return_code() != ReturnCode.OK:
            record["error"] = str(result.get_header("dpseg_error") or result.get_return_code())
        else:
            record.update({k: v for k, v in from_shareable(result).data.items() if _is_scalar(v)})
        self.log_info(fl_ctx, f"audit result from {site}, round {record['round']}: "
                              + ", ".join(f"{k} {record[k]:.3f}" for k in ("ssim", "psnr") if k in record))
        with self.lock:
            self.results.append(record)
        client_task.result = None

    def _save(self) -> None:
        rows = sorted(self.results, key=lambda r: (r["round"], r["site"]))
        (self.run_dir / AUDIT_FILE).write_text(json.dumps({"attack": self.attack, "updates": rows}, indent=1) + "\n")

    def stop_controller(self, fl_ctx: FLContext):
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str,
                                       result: Shareable, fl_ctx: FLContext):
        self.log_warning(fl_ctx, f"ignored a late result of task '{task_name}' from {client.name}")


def _is_scalar(value) -> bool:
    return isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and math.isnan(value))


# ------------------------------------------------------------------------------------------ site
class SiteAuditor(Executor):
    """The site's side of an audit: attack the update it sent, score against its own images.

    Needs the site's training batches of the audited round, kept by the learner
    (``record_batches``) in the site's job folder. Returns scalar metrics only.
    """

    def __init__(self, task_name: str = AUDIT_TASK):
        super().__init__()
        self.task_name = task_name
        self.cohort: Cohort | None = None
        self.priors: dict[tuple, ImagePrior | None] = {}

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        from dpseg.learner import ERROR_HEADER

        if task_name != self.task_name:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        try:
            return self._execute(shareable, fl_ctx)
        except Exception as err:  # the server learns that, and why, the audit failed; never the data
            self.log_exception(fl_ctx, "audit failed")
            reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
            reply.set_header(ERROR_HEADER, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            return reply

    def _execute(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        from dpseg.learner import ERROR_HEADER, batches_path, site_folders
        from dpseg.site import SiteConfigError, load_site_settings

        site = fl_ctx.get_identity_name()
        app_dir, root = site_folders(fl_ctx)
        dxo = from_shareable(shareable)
        current_round = int(dxo.get_meta_prop("round"))
        try:
            batches = torch.load(batches_path(app_dir, current_round), weights_only=True)
        except FileNotFoundError:
            reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
            reply.set_header(ERROR_HEADER, f"{site} kept no training batches for round {current_round} "
                                           "(the learner needs record_batches)")
            return reply
        bundle = Bundle()
        if self.cohort is None:
            try:
                settings = load_site_settings(site, root, None, require_ledger=False)
            except SiteConfigError as err:
                reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
                reply.set_header(ERROR_HEADER, str(err))
                return reply
            self.log_info(fl_ctx, "loading the site's training slices for identification")
            self.cohort = Cohort(resolve(settings.datalist, "training"), bundle.volume_transforms())
        attack = dxo.get_meta_prop("attack") or {}
        key = (attack.get("prior", "none"), attack.get("prior_components", AttackSettings.prior_components))
        if key not in self.priors:  # built once per site workspace (kept in <site root>/audit_prior)
            self.priors[key] = load_prior(key[0], root / "audit_prior", bundle.volume_transforms(), key[1],
                                          progress=lambda m: self.log_info(fl_ctx, m))
        metrics = self._audit(dxo, attack, batches, bundle, app_dir / "audit" / f"round{current_round}", fl_ctx,
                              self.priors[key])
        return DXO(DataKind.METRICS, data=metrics).to_shareable()

    def _audit(self, dxo: DXO, attack: dict, batches: list[dict], bundle: Bundle, out_dir: Path, fl_ctx: FLContext,
               prior: ImagePrior | None) -> dict:
        """Attack the update in ``dxo`` with the job's ``attack`` settings and score it against the
        first of the round's ``batches``; scalar metrics."""
        training, privacy = dxo.get_meta_prop("training") or {}, dxo.get_meta_prop("privacy")
        if len(batches) != 1:
            self.log_warning(fl_ctx, f"{len(batches)} local steps in the audited round: scoring the first batch")
        batch = batches[0]
        if not batch["patients"]:
            self.log_info(fl_ctx, "no patient in the audited update (empty Poisson sample): nothing to reconstruct")
            return {"patients_in_update": 0, **privacy_bounds(privacy, None)}
        settings = attack_settings(training, **attack, intensity_shift=bundle.intensity_shift())
        network = bundle.network()
        network.load_state_dict({k: torch.as_tensor(v) for k, v in dxo.data["global"].items()}, strict=True)
        update = {k: torch.as_tensor(v) for k, v in dxo.data["update"].items()}
        metrics = audit_update(network, bundle.loss(), update, settings, batch["images"], batch["labels"], self.cohort,
                               batch["patients"], privacy, out_dir, progress=lambda m: self.log_info(fl_ctx, m),
                               prior=prior)
        self.log_info(fl_ctx, f"audit: SSIM {metrics['ssim']:.3f} (baseline {metrics['baseline_ssim']:.3f}), "
                              f"identified {metrics['identified']:.2f} (true slice ranked {metrics['slice_rank']:.0f} "
                              f"of {metrics['cohort_slices']}), {metrics['seconds']:.0f} s; "
                              f"reconstruction and figure in {out_dir}")
        return metrics
