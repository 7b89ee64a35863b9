"""Server-side components: the bundle's model persistor and the per-round recorder.

The persistor also keeps a resume point (``dpseg_resume.pt``: the global model after the last
completed round, that round and the job's end round) from which ``dpseg resume-job`` continues a
stopped job.

The recorder keeps, per round and site, what the site reported with its update (privacy meta,
validation Dice, planned steps) and the wall time of each round. It
writes ``dpseg_rounds.json`` into the server's run folder, which ``dpseg report`` reads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey, JobConstants, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey, make_model_learnable
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

from dpseg.averaging import averaged, checked_decay
from dpseg.bundle import Bundle
from dpseg.files import write_whole
from dpseg.wire import BUNDLE_OUT, PRIVACY_META, RESUME_FILE, ROUNDS_FILE
from dpseg.workspace import allow_list_refusal



INITIAL_MODELS = ("bundle", "random")


def initial_network(bundle: Bundle, initial_model: str, seed: int) -> torch.nn.Module:
    """The job's first global model: the bundle's shipped weights or a seeded random network."""
    if initial_model not in INITIAL_MODELS:
        raise ValueError(f"initial_model must be one of {INITIAL_MODELS}, got {initial_model!r}")
    with torch.random.fork_rng():  # a random start: the same for the same seed
        torch.manual_seed(seed)
        network = bundle.network()
    if initial_model == "bundle":
        path = bundle.model_path()
        if not path.is_file():
            raise FileNotFoundError(f"initial_model 'bundle': the bundle has no weights at {path}; train them "
                                    "(docs/public_cohort.md) or set initial_model to 'random'")
        bundle.load_weights(network, path)
    return network


class BundlePersistor(PTFileModelPersistor):
    """PyTorch persistor whose network is the bundle's; writes the best global model as a bundle.

    When NVFlare reports a new best global model (by the sites' validation Dice), a complete copy
    of the bundle is written to ``<server run folder>/bundle/<name>/`` with that model as
    ``models/model.pt`` (a plain state dict, loadable by monai.bundle and MONAI Label).
    ``initial_model``: where the first global model comes from: ``"bundle"`` (default) the bundle's
    shipped weights (``models/model.pt``, trained on the public cohort only, never on a site's
    patients), ``"random"`` a fresh network initialised from ``seed`` (the same seed, the same
    initial weights);
    ``resume_model``: a state dict file inside the job's app folder (relative path) to start from
    instead, the global model of a stopped job (``dpseg resume-job`` writes it there);
    ``resume_average``: likewise, the stopped job's average of global models;
    ``average_decay``: 0 (default) no averaging; in (0, 1) the server also keeps an exponential
    moving average of the global models (``dpseg.averaging``, post-processing, no privacy cost), and
    that average is the job's output: the final global model (``FL_global_model.pt``, which the
    cross-site evaluation tests as the final model) and, at the end of the job, the bundle's
    ``models/model.pt``; the model picked by the sites' validation stays ``best_FL_global_model.pt``.
    Every persisted global model also becomes the job's resume point (``RESUME_FILE``).
    At the start of a job it applies the server's class allow-list to the job's configuration
    (``dpseg.workspace.allow_list_refusal``; NVFlare leaves that to the job when the job's app has a
    ``custom/`` folder, as the shipped ones do) and stops the job with one line where it is refused.
    """

    def __init__(self, initial_model: str = "bundle", seed: int = 0, resume_model: str = "",
                 average_decay: float = 0.0, resume_average: str = "", **kwargs):
        self.bundle = Bundle()
        for name, value in (("resume_model", resume_model), ("resume_average", resume_average)):
            if value and (Path(value).is_absolute() or ".." in Path(value).parts):
                raise ValueError(f"{name} must be a path inside the job's app folder, got {value!r}")
        self.resume_model, self.resume_average = resume_model, resume_average
        self.average_decay = checked_decay(average_decay)
        self.average: dict[str, np.ndarray] | None = None
        super().__init__(model=initial_network(self.bundle, initial_model, seed), **kwargs)

    def handle_event(self, event: str, fl_ctx: FLContext):
        if event == EventType.START_RUN and self._refused(fl_ctx):
            return
        if event == EventType.START_RUN and self.resume_model:
            path = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / self.resume_model
            if not path.is_file():
                raise FileNotFoundError(f"resume_model {self.resume_model} is not in the job's app folder")
            self.source_ckpt_file_full_name = str(path)  # NVFlare's persistor loads an absolute path
            self.log_info(fl_ctx, f"resuming from the global model in {self.resume_model}")
        if event == EventType.START_RUN and self.resume_average and self.average_decay:
            path = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT)) / self.resume_average
            if not path.is_file():
                raise FileNotFoundError(f"resume_average {self.resume_average} is not in the job's app folder")
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.average = {k: v.numpy() for k, v in state.items()}
        super().handle_event(event, fl_ctx)
        if event == AppEventType.GLOBAL_BEST_MODEL_AVAILABLE and not self.average_decay:
            self._write_bundle(fl_ctx, self._best_ckpt_save_path)
        elif event == EventType.END_RUN and self.average_decay and self.average is not None:
            self._write_bundle(fl_ctx, self._ckpt_save_path)

    def _refused(self, fl_ctx: FLContext) -> bool:
        """Stop the job (and say why, in one line) if the server's class allow-list does not allow
        it (``dpseg.workspace.allow_list_refusal``); before the persistor does anything."""
        app_dir = Path(fl_ctx.get_prop(FLContextKey.APP_ROOT))
        root = Path(fl_ctx.get_engine().get_workspace().get_root_dir())
        refusal = allow_list_refusal("the server", root, app_dir / "config" / JobConstants.SERVER_JOB_CONFIG,
                                     str(fl_ctx.get_job_id()))
        if refusal:
            self.log_error(fl_ctx, refusal)
            self.system_panic(refusal, fl_ctx)
        return refusal is not None

    def save_model(self, ml: ModelLearnable, fl_ctx: FLContext):
        """Persist the global model (with averaging: the average, as the final model) and the resume
        point: (round just completed, end round, model[, average]), one file written atomically."""
        weights = {k: np.asarray(v) for k, v in ml[ModelLearnableKey.WEIGHTS].items()}
        if self.average_decay:
            self.average = averaged(self.average, weights, self.average_decay)
            super().save_model(make_model_learnable(self.average, {}), fl_ctx)
        else:
            super().save_model(ml, fl_ctx)
        current = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
        end = int(fl_ctx.get_prop(AppConstants.START_ROUND) or 0) + int(fl_ctx.get_prop(AppConstants.NUM_ROUNDS) or 0)
        point = {"completed_round": current, "end_round": end,
                 "model": {k: torch.as_tensor(v) for k, v in weights.items()}}
        if self.average is not None:
            point["average"] = {k: torch.as_tensor(v) for k, v in self.average.items()}
        write_whole(Path(self.log_dir) / RESUME_FILE, lambda tmp: torch.save(point, tmp))

    def _write_bundle(self, fl_ctx: FLContext, checkpoint: str) -> None:
        """A copy of the bundle whose ``models/model.pt`` is the state dict of ``checkpoint``."""
        best = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = best.get("model", best)
        out = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / BUNDLE_OUT / self.bundle.root.name
        if not out.exists():
            shutil.copytree(self.bundle.root, out, ignore=shutil.ignore_patterns("model.pt", "model.ts", "eval"))
        network = self.bundle.network()
        network.load_state_dict(state, strict=True)  # fails loudly on any key mismatch
        write_whole(out / "models" / "model.pt", lambda tmp: torch.save(network.state_dict(), tmp))
        what = "average of the global models" if self.average_decay else "best global model"
        self.log_info(fl_ctx, f"{what} written to {out / 'models' / 'model.pt'}")


class RoundRecorder(FLComponent):
    """Records each round's accepted contributions (privacy meta, validation Dice) and wall time."""

    def __init__(self):
        super().__init__()
        self.rounds: dict[int, dict] = {}
        self.path: Path | None = None

    def _round(self, fl_ctx: FLContext) -> dict:
        r = int(fl_ctx.get_prop(AppConstants.CURRENT_ROUND) or 0)
        return self.rounds.setdefault(r, {"round": r, "sites": {}})

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.path = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / ROUNDS_FILE
            self.log_info(fl_ctx, "server: job started; waiting for the sites' first updates (each site first "
                                  "checks and caches its data)")
        elif event_type == AppEventType.ROUND_STARTED:
            self._round(fl_ctx)["started"] = time.time()
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._contribution(fl_ctx)
        elif event_type == AppEventType.ROUND_DONE:
            rec = self._round(fl_ctx)
            rec["seconds"] = time.time() - rec.get("started", time.time())
            self._save()
        elif event_type == EventType.END_RUN:
            self._save()

    def _contribution(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        if result is None:
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        rec = self._round(fl_ctx)
        try:
            dxo = from_shareable(result)
        except ValueError:
            return
        rec["sites"][site] = {
            "privacy": dxo.get_meta_prop(PRIVACY_META),
            "metrics": dxo.get_meta_prop(MetaKey.INITIAL_METRICS),
            "steps": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
            "meta": json.loads(json.dumps(dxo.meta or {}, default=str)),  # everything the update carried besides weights
        }

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.write_text(json.dumps([self.rounds[k] for k in sorted(self.rounds)], indent=1) + "\n")
