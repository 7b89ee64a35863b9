"""The site's NVFlare executor: DP-SGD training rounds, validation, and cross-site evaluation.

Tasks:
- ``train``: receive the global weights, validate them on the site's validation patients, train
  ``local_steps`` Poisson-sampled steps (DP-SGD when ``dp`` is true), send the weight difference
  with the privacy meta (epsilon spent so far in this job, delta, noise multiplier, sample rate,
  steps, accountant) and the validation Dice.
- ``validate``: Dice of the given weights on the site's test patients, whole 3D volumes.

What leaves the site: weight differences (DP-protected, patient level, add/remove one patient);
the job's public settings (sample rate, steps per round, expected batch size, noise multiplier,
accountant) and the epsilon spent, all computed from public settings; the Dice / loss on
validation and test patients, which are NOT covered by the DP guarantee (it protects the training
patients); error codes with a fixed sentence. Nothing sent depends on the number of training
patients: with DP the sample rate and the steps per round are the job's (``sample_rate``,
``local_steps``), never derived from the cohort. The training loss, the realised batch sizes, the
round's time and memory stay in the site's log.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, JobConstants, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from dpseg.bundle import Bundle
from dpseg.canaries import CanaryInjector, CanarySet, trained_parameters
from dpseg.checks import check_datalist
from dpseg.datalist import resolve
from dpseg.dptrain import (OPTIMIZERS, SAMPLINGS, TRAIN_LAYERS, LocalTrainer, compact, expanded, secure_slices,
                           seeded_slices)
from dpseg.evaluate import evaluate
from dpseg.files import write_whole
from dpseg.simulator import SIMULATOR_JOB_ID, check_simulator_worker
from dpseg.jobprivacy import JobPrivacy
from dpseg.metrics import dice, predicted_labels
from dpseg.privacy import PrivacyError
from dpseg.processmemory import peak_rss_mb, returned_when_freed
from dpseg.securerandom import SecureRandom
from dpseg.site import JobRefused, SiteConfigError, check_job_policy, load_site_settings, torch_threads
from dpseg.wire import ERROR_HEADER, PRIVACY_META, SITE_ROUNDS_FILE, TRAINING_META, PrivacyMeta, error_header
from dpseg.workspace import allow_list_refusal

AUDIT_DIR = "audit"
LEDGER_ENTRY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")




CHOICES = {"accountant": ("prv", "rdp"), "optimizer": tuple(OPTIMIZERS), "sampling": SAMPLINGS,
           "train_layers": TRAIN_LAYERS}
COUNTS = ("slices_per_patient",)  # integers >= 1
NATURALS = ("canaries", "canary_seed")  # integers >= 0


def check_job_arguments(**args) -> None:
    """The job's arguments are plain values of the expected kind, never code or paths: flags are
    booleans, settings in CHOICES one of their values, COUNTS integers >= 1, NATURALS integers
    >= 0, everything else a number. Raises TypeError or ValueError naming the argument (the site
    builds nothing from a job's strings)."""
    for name, value in args.items():
        if name == "resume":
            if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) and LEDGER_ENTRY.match(v) for k, v in value.items()):
                raise ValueError(f"job argument resume must map site names to ledger entries "
                                 f"(letters, digits, '_', '.', '-'), got {value!r}")
        elif name in ("dp", "record_batches"):
            if not isinstance(value, bool):
                raise TypeError(f"job argument {name} must be true or false, got {value!r}")
        elif name in CHOICES:
            if value not in CHOICES[name]:
                raise ValueError(f"job argument {name} must be one of {CHOICES[name]}, got {value!r}")
        elif name in COUNTS or name in NATURALS:
            least = 1 if name in COUNTS else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"job argument {name} must be an integer >= {least}, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"job argument {name} must be a number, got {value!r}")


def site_folders(fl_ctx: FLContext) -> tuple[Path, Path]:
    """(this site's app folder of the running job, the site's workspace root). From the task's FL
    context (APP_ROOT): in the simulator, ``engine.get_workspace()`` could give another site's
    workspace when several sites share a process. The root is two levels up
    (``<root>/<job id>/app_<site>``)."""
    app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
    if app_root:
        app_dir = Path(app_root)
    else:
        app_dir = Path(fl_ctx.get_engine().get_workspace().get_app_dir(str(fl_ctx.get_job_id())))
    return app_dir, app_dir.parents[1]


def ledger_entry(job_id: str, site: str, resume: dict) -> str:
    """The key of this job in the site's ledger: the entry of the stopped job it continues
    (``resume[site]``), else the job id; the simulator gives every job the same id, so there a
    fresh, unique entry (``simulate_job-<UTC time>-<random>``)."""
    if site in resume:
        return resume[site]
    if job_id == SIMULATOR_JOB_ID:
        return f"{SIMULATOR_JOB_ID}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
    return job_id


def batches_path(app_dir: Path, current_round: int) -> Path:
    """Where a site keeps the training batches of one round (for its own audit; never sent)."""
    return Path(app_dir) / AUDIT_DIR / f"batches_round{current_round}.pt"


def save_batches(app_dir: Path, current_round: int, batches: list[dict]) -> None:
    path = batches_path(app_dir, current_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(batches, path)


class DataError(RuntimeError):
    """The site's data failed validation; the message lists each problem with its file."""


class SiteLearner(Executor):
    """One site's training. Arguments are the job's (public) training and privacy settings: the
    privacy settings and the learning rate have no default here (the job states them; every default
    below is the shipped jobs' value, which a test pins).

    dp: train with DP-SGD (False: the non-private baseline, same sampling and optimiser);
    target_epsilon, delta: the job's patient-level budget at this site over ALL rounds;
    max_grad_norm: per-sample L2 clip; batch_size: the expected batch (patients) the summed
    gradient is divided by (with DP a public constant; without DP also the Poisson batch);
    sample_rate: the Poisson rate per patient; local_steps: steps per round. With DP both are
    required (public: deriving them from the site's number of patients would release it); without
    DP, 0 means batch_size / patients and local_epochs passes over the patients per round.
    accountant: "prv" or "rdp"; data_source: "site" (the site's configured data) or "synthetic"
    (a synthetic cohort generated in the site's workspace; only where a job asks for it).
    optimizer: "adam" or "sgd";
    sampling: "poisson" or "fixed" (fixed only without DP); slices_per_patient: slices per sampled
    patient per step (their gradients averaged, then clipped once: same sensitivity and accounting);
    train_layers: "all", "decoder" or "norm" (``dpseg.dptrain.set_trained_layers``; the rest stays
    as the global model has it); record_batches: keep each round's training batches in the site's
    job folder (``audit/``) for the site's own audit (one slice per patient, all layers trained);
    resume: {site name: ledger entry} of a stopped job that this job continues (written by
    ``dpseg resume-job``): the site's accountant continues from the state saved in its ledger.
    canaries, canary_seed: only in the audit copy of a DP job (``dpseg privacy-audit --fl``): this
    many audit canaries join the site's DP steps (``dpseg.canaries``); 0 (every shipped job) none.
    """

    def __init__(self, *, dp: bool, target_epsilon: float, delta: float, max_grad_norm: float, batch_size: int,
                 sample_rate: float, local_steps: int, learning_rate: float, local_epochs: float = 1.0,
                 accountant: str = "prv", data_source: str = "site", seed: int = 0, optimizer: str = "adam",
                 sampling: str = "poisson", slices_per_patient: int = 1, train_layers: str = "all",
                 record_batches: bool = False, resume: dict | None = None, canaries: int = 0, canary_seed: int = 0,
                 train_task: str = AppConstants.TASK_TRAIN,
                 validate_task: str = AppConstants.TASK_VALIDATION, log_writer_id: str = "log_writer"):
        super().__init__()
        check_job_arguments(dp=dp, record_batches=record_batches, target_epsilon=target_epsilon, delta=delta,
                            max_grad_norm=max_grad_norm, batch_size=batch_size, local_epochs=local_epochs,
                            learning_rate=learning_rate, seed=seed, local_steps=local_steps, sample_rate=sample_rate,
                            accountant=accountant, optimizer=optimizer, sampling=sampling,
                            slices_per_patient=slices_per_patient, train_layers=train_layers, resume=resume or {},
                            canaries=canaries, canary_seed=canary_seed)
        if canaries and not dp:
            raise ValueError(f"canaries={canaries}: audit canaries join DP steps only (this job has dp false)")
        if data_source not in ("site", "synthetic"):
            raise ValueError(f"data_source must be 'site' or 'synthetic', got {data_source!r}")
        if dp and sampling != "poisson":
            raise ValueError(f"a DP job needs sampling 'poisson' (what the accountant assumes), got {sampling!r}")
        if dp and not (local_steps > 0 and 0 < sample_rate < 1):
            raise ValueError("a DP job must set local_steps (> 0) and sample_rate (between 0 and 1): derived from "
                             "the site's number of training patients they would release it, which the "
                             f"add/remove-one accountant treats as private; got local_steps={local_steps}, "
                             f"sample_rate={sample_rate}")
        if record_batches and (slices_per_patient != 1 or train_layers != "all"):
            raise ValueError("record_batches (the site's own audit) attacks updates of one slice per patient with "
                             "every layer trained: it needs slices_per_patient 1 and train_layers 'all', got "
                             f"slices_per_patient={slices_per_patient}, train_layers={train_layers!r}")
        self.sample_rate = float(sample_rate) or None
        self.slices_per_patient, self.train_layers = slices_per_patient, train_layers
        self.fixed_steps, self.optimizer_name, self.sampling = int(local_steps), optimizer, sampling
        self.record_batches, self.resume = record_batches, dict(resume or {})
        self.dp, self.target_epsilon, self.delta = dp, target_epsilon, delta
        self.max_grad_norm, self.batch_size, self.local_epochs = max_grad_norm, batch_size, local_epochs
        self.learning_rate, self.accountant_name, self.data_source = learning_rate, accountant, data_source
        self.seed, self.train_task, self.validate_task = seed, train_task, validate_task
        self.log_writer_id = log_writer_id
        self.canaries, self.canary_seed = canaries, canary_seed
        self.ready = False
        self.privacy: JobPrivacy | None = None  # with DP: the job's privacy at this site
        self.trainer: LocalTrainer | None = None

    # ----------------------------------------------------------------------------- set-up
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            check_simulator_worker(fl_ctx.get_identity_name())
            self.log_writer = fl_ctx.get_engine().get_component(self.log_writer_id)
        elif event_type == EventType.END_RUN and self.trainer is not None:
            self.trainer.close()

    def _setup(self, fl_ctx: FLContext) -> None:
        if self.ready:
            return
        self.site = fl_ctx.get_identity_name()
        self.job_id = str(fl_ctx.get_job_id())
        self.app_dir, root = site_folders(fl_ctx)
        refusal = allow_list_refusal(self.site, root, self.app_dir / "config" / JobConstants.CLIENT_JOB_CONFIG,
                                     self.job_id)
        if refusal:
            raise SiteConfigError(refusal)
        self.ledger_entry = ledger_entry(self.job_id, self.site, self.resume)
        threads = torch_threads(self.job_id)
        if threads:
            torch.set_num_threads(threads)
        self.log_info(fl_ctx, f"torch uses {torch.get_num_threads()} CPU threads at {self.site}")
        synthetic_root = self._synthetic_cohort(root, fl_ctx) if self.data_source == "synthetic" else None
        # in the simulator each site's local/ is a copy of the simulator workspace's: the one to edit
        edited_in = root.parent if self.job_id == SIMULATOR_JOB_ID else None
        self.settings = load_site_settings(self.site, root, synthetic_root, require_ledger=self.dp, edited_in=edited_in)
        check_job_policy(self.settings, self.dp, self.target_epsilon)
        if self.dp:
            self.privacy = JobPrivacy(self.site, self.settings.ledger, self.ledger_entry, self.job_id,
                                      self.site in self.resume, self.target_epsilon, self.delta, self.max_grad_norm,
                                      self.batch_size, self.sample_rate, self.accountant_name)
        started = time.perf_counter()
        self.log_info(fl_ctx, f"{self.site}: checking its data (every volume of its datalist)")
        report = check_datalist(self.settings.datalist)
        if not report.ok:  # for the site's log; the server gets the "data" code only
            raise DataError(f"site {self.site}: data check failed, no training: {len(report.problems)} "
                            "problem(s):\n" + "\n".join(report.problems))
        self.log_info(fl_ctx, report.summary())
        counts = report.patients
        self.log_info(fl_ctx, f"{self.site}: data checked in {time.perf_counter() - started:.0f} s; caching "
                              f"{counts.get('training', 0)} training and {counts.get('validation', 0)} validation "
                              "patients (the bundle's transforms, once per job)")
        self.bundle = Bundle()
        self.network = self.bundle.network()
        self.loss_fn = self.bundle.loss()
        self.train_items = resolve(self.settings.datalist, "training")
        # without DP the same seed gives the same run; with DP no party can predict a draw
        transforms = self.bundle.train_transforms()
        with returned_when_freed():  # the caches' intermediate arrays leave no holes in the heap
            self.data = secure_slices(self.train_items, transforms, SecureRandom()) if self.dp else \
                seeded_slices(self.train_items, transforms, self.seed)
            volume = self.bundle.volume_transforms()
            self.val_data = [compact(volume(item)) for item in resolve(self.settings.datalist, "validation")]
        self.n_patients = len(self.data)  # never sent (see the module docstring)
        self.local_steps = self.fixed_steps if self.fixed_steps > 0 else \
            max(1, math.ceil(self.local_epochs * self.n_patients / self.batch_size))
        self.inferer = self.bundle.inferer()
        self.log_info(fl_ctx, f"{self.site}: data ready in {time.perf_counter() - started:.0f} s")
        self.ready = True

    def _synthetic_cohort(self, root: Path, fl_ctx: FLContext) -> Path:
        from dpseg.synthetic import site_profiles, write_site

        out = root / "synthetic"
        if not (out / self.site / "datalist.json").exists():
            try:
                index = int(self.site.rsplit("-", 1)[1])
            except (IndexError, ValueError):
                raise SiteConfigError(f"synthetic data needs sites named site-N, got {self.site}") from None
            self.log_info(fl_ctx, f"job asked for synthetic data: writing {self.site}'s cohort under {out}")
            write_site(out, site_profiles(index)[index - 1], self.seed)
        return out

    # ----------------------------------------------------------------------------- tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        try:
            self._setup(fl_ctx)
            if task_name == self.train_task:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task:
                return self._validate(shareable, fl_ctx)
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except (PrivacyError, SiteConfigError, DataError) as err:
            self.log_error(fl_ctx, str(err))  # the details stay in the site's log
            code = "privacy" if isinstance(err, (PrivacyError, JobRefused)) else \
                "data" if isinstance(err, DataError) else "config"
            reply = make_reply(ReturnCode.EXECUTION_EXCEPTION)
            reply.set_header(ERROR_HEADER, error_header(code))
            return reply

    def _load(self, weights: dict) -> None:
        state = {k: torch.as_tensor(np.asarray(v)) for k, v in weights.items()}
        self.network.load_state_dict(state, strict=True)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        dxo = from_shareable(shareable)
        current_round = int(shareable.get_header(AppConstants.CURRENT_ROUND) or 0)
        num_rounds = int(shareable.get_header(AppConstants.NUM_ROUNDS) or 1)
        global_state = {k: torch.as_tensor(np.asarray(v)).clone() for k, v in dxo.data.items()}
        self._load(global_state)
        started = time.perf_counter()
        val = self._validation_metrics()
        validation_seconds = time.perf_counter() - started
        if self.dp:
            if not self.privacy.started:  # once per job: calibrate (or continue) for all its rounds
                if not self.privacy.resumes:
                    self.log_info(fl_ctx, f"{self.site}: calibrating the noise for epsilon {self.target_epsilon} at "
                                          f"delta {self.delta} over {num_rounds * self.local_steps} steps (once per job)")
                self.log_info(fl_ctx, self.privacy.start(num_rounds * self.local_steps, self.n_patients))
            self.privacy.check_round(dxo.get_meta_prop(PRIVACY_META), self.local_steps, current_round)
        start = time.perf_counter()
        if self.trainer is None:  # one local optimiser per job: its state carries across rounds
            self.trainer = LocalTrainer(self.network, self.loss_fn, self.data, self.learning_rate, self.batch_size,
                                        self.privacy.accountant if self.dp else None, seed=self.seed,
                                        optimizer=self.optimizer_name, sampling=self.sampling,
                                        record=self.record_batches, sample_rate=self.sample_rate,
                                        slices_per_patient=self.slices_per_patient, train_layers=self.train_layers)
            if self.canaries:
                self.trainer.per_sample_hook = self._canary_injector(fl_ctx)
            self.log_info(fl_ctx, f"{self.site}: training {self.trainer.trained_parameters} of "
                                  f"{sum(p.numel() for p in self.network.parameters())} parameters (train_layers "
                                  f"{self.train_layers!r}), {self.slices_per_patient} slice(s) per patient")
        try:
            stats = self.trainer.run(self.local_steps, abort=lambda: abort_signal.triggered)
        finally:
            if self.dp:
                self.privacy.record()
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        seconds = time.perf_counter() - start
        if self.record_batches:
            save_batches(self.app_dir, current_round, self.trainer.batches)
        new_state = self.network.state_dict()
        diff = {k: (new_state[k] - global_state[k]).numpy() for k in global_state}
        # every value here is public by design or about validation patients (see the module docstring);
        # the round's time, memory, realised batch sizes and training loss stay in the site's log
        meta = {MetaKey.NUM_STEPS_CURRENT_ROUND: self.local_steps, MetaKey.INITIAL_METRICS: val,
                PRIVACY_META: self.privacy.meta() if self.dp else PrivacyMeta(dp=False).to_dict(), TRAINING_META: self._training_meta()}
        spent = f"epsilon {meta[PRIVACY_META]['epsilon']:.3f}" if self.dp else "no DP"
        peak_mb = peak_rss_mb()
        self.log_info(fl_ctx, f"{self.site}: round {current_round}: {stats.steps} steps in {seconds:.1f} s, peak "
                              f"memory {peak_mb:.0f} MB (kept at the site), val Dice {val['val_dice']:.4f}, {spent}")
        self.log_debug(fl_ctx, f"{self.site}: round {current_round}: local train loss {stats.mean_loss:.4f}, "
                               f"{stats.samples} patients in {stats.steps} steps (kept at the site)")
        self._keep_round_record(current_round, seconds, peak_mb, validation_seconds)
        self._track(current_round, val, meta[PRIVACY_META])
        return DXO(DataKind.WEIGHT_DIFF, data=diff, meta=meta).to_shareable()

    def _keep_round_record(self, current_round: int, seconds: float, peak_mb: float, validation_seconds: float) -> None:
        """Append this round's training and validation times (s) and peak memory (MB) to the site's
        own record (SITE_ROUNDS_FILE in its job folder, which ``dpseg report`` and the benchmarks read
        where they can; never sent)."""
        path = self.app_dir / SITE_ROUNDS_FILE
        records = json.loads(path.read_text()) if path.exists() else []
        records.append({"site": self.site, "round": current_round, "train_seconds": seconds,
                        "validation_seconds": validation_seconds, "peak_rss_mb": peak_mb})
        write_whole(path, lambda tmp: tmp.write_text(json.dumps(records, indent=1) + "\n"))

    def _canary_injector(self, fl_ctx: FLContext) -> CanaryInjector:
        """The audit canaries' hook into this site's DP steps (an audit job only)."""
        named = trained_parameters(self.network)
        canaries = CanarySet(self.canaries, self.canary_seed, self.site, [p.numel() for _, p in named])
        self.log_warning(fl_ctx, f"{self.site}: PRIVACY AUDIT JOB: {self.canaries} audit canaries "
                                 f"({int(canaries.member.sum())} in) join this site's DP steps (seed {self.canary_seed})")
        return CanaryInjector(canaries, [p for _, p in named], self.max_grad_norm, self.trainer.poisson)

    def _training_meta(self) -> dict:
        """The job's public local-training settings (what an auditor's attacker may assume)."""
        return {"learning_rate": self.learning_rate, "local_steps": self.local_steps, "batch_size": self.batch_size,
                "optimizer": self.optimizer_name, "sampling": self.sampling,
                "slices_per_patient": self.slices_per_patient, "train_layers": self.train_layers,
                **({"canaries": self.canaries, "canary_seed": self.canary_seed} if self.canaries else {})}

    @torch.no_grad()
    def _validation_metrics(self) -> dict:
        """Mean Dice and loss over the validation patients (preprocessed grid, whole volumes)."""
        self.network.eval()
        dices, losses = [], []
        for item in self.val_data:
            item = expanded(item)
            image, label = item["image"].unsqueeze(0), item["label"].unsqueeze(0)
            logits = self.inferer(image, self.network)
            losses.append(float(self.loss_fn(logits, label)))
            dices.append(dice(predicted_labels(logits), label[:, 0].numpy()))
        return {"val_dice": float(np.mean(dices)), "val_loss": float(np.mean(losses))}

    def _validate(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        dxo = from_shareable(shareable)
        network = self.bundle.network()
        network.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in dxo.data.items()}, strict=True)
        result = evaluate(self.settings.datalist, self.bundle, network, "test")
        metrics = {"test_dice": result["mean_dice"], "test_patients": result["patients"]}
        self.log_info(fl_ctx, f"{self.site}: test Dice of model from {shareable.get_header(AppConstants.MODEL_OWNER)}: "
                              f"{result['mean_dice']:.4f}")
        return DXO(DataKind.METRICS, data=metrics).to_shareable()

    def _track(self, current_round: int, val: dict, privacy: dict) -> None:
        if not getattr(self, "log_writer", None):
            return
        self.log_writer.add_scalar("val_dice", val["val_dice"], current_round)
        self.log_writer.add_scalar("val_loss", val["val_loss"], current_round)
        if privacy.get("dp"):
            self.log_writer.add_scalar("epsilon", privacy["epsilon"], current_round)
