"""The audit job's server side, and the task it sends each site: what a curious server could
reconstruct from the updates it receives, asked of the sites that sent them.

- ``UpdateInterceptor`` (server component): saves the updates of the audited rounds exactly as
  the aggregator receives them (after every filter), with the global model each was computed from.
- ``AuditController`` (server workflow, after training): sends each audited site its intercepted
  updates as one ``audit`` task (``audit_task``; the site reads it with ``task_updates``) and
  writes the acknowledgements to ``dpseg_audit.json``.
- ``check_job_attack``: the job's attack settings, checked as a site checks what a job sends.

The site side (the attack, the scoring, ``SiteAuditor``) is ``dpseg.auditor``; nothing here loads
it, Opacus or the site learner.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from nvflare.apis.client import Client
from nvflare.apis.controller_spec import ClientTask, Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from dpseg.auditresults import KEPT_NOTE, received
from dpseg.inversion import AttackSettings
from dpseg.prior import PRIOR_SPECS
from dpseg.wire import AUDIT_FILE, AUDIT_TASK, ERROR_HEADER, PRIVACY_META, TRAINING_META

INTERCEPT_DIR = "intercepted"


# ------------------------------------------------------------------------------------------ the job's attack
SITE_SET = ("local_steps", "local_lr", "batch_size", "intensity_shift")  # each site sets these from its training
JOB_FILE = "the audit job's config_fed_server.json"


def check_job_attack(attack: dict) -> dict:
    """The job's attack settings (``dpseg.inversion.AttackSettings`` fields, as the audit job's
    ``attack_*`` arguments give them), checked as a site must check what a job sends: known
    names, plain values of each field's type, a built-in prior (``dpseg.prior.PRIOR_SPECS``; never
    a path), none of those each site sets from its training (``SITE_SET``). Returns a copy.

    Raises:
        TypeError: an unknown setting, or a value of another type than the field's.
        ValueError: a setting each site sets, a prior that is not built in, or a value that
            ``AttackSettings`` refuses.
    """
    if not isinstance(attack, dict):
        raise TypeError(f"{JOB_FILE}: the attack settings must be a mapping, got {type(attack).__name__}")
    if site_set := sorted(set(attack) & set(SITE_SET)):
        raise ValueError(f"{site_set}: set by each site from its training, not by the audit job")
    kinds = {f.name: type(f.default) for f in fields(AttackSettings)}
    for key, value in attack.items():
        if key not in kinds:
            raise TypeError(f"attack_{key} in {JOB_FILE}: {key!r} is not an attack setting")
        kind = kinds[key]
        plain = isinstance(value, str) if kind is str else \
            isinstance(value, (int, float) if kind is float else kind) and not isinstance(value, bool)
        if not plain:
            raise TypeError(f"attack_{key} in {JOB_FILE} must be a plain {kind.__name__}, got {value!r}")
    if attack.get("prior", "none") not in PRIOR_SPECS:
        raise ValueError(f"attack_prior in {JOB_FILE} must name a built-in prior ({', '.join(PRIOR_SPECS)}), "
                         f"got {attack['prior']!r}: a site never reads a file the job names")
    AttackSettings(**attack)
    return dict(attack)


def audit_task(records: list[dict], attack: dict) -> Shareable:
    """One site's audit task: its intercepted updates (``UpdateInterceptor`` records, all of one
    site) and the job's attack settings. Data: per round (key ``round<r>``) the update and the
    global weights (numpy arrays); meta: ``attack`` and ``audited``, per round its privacy and
    training meta as the site sent them."""
    data = {round_key(r["round"]): {"update": {k: v.numpy() for k, v in r["update"].items()},
                                     "global": {k: v.numpy() for k, v in r["global"].items()}} for r in records}
    meta = {"attack": attack, "audited": [{"round": int(r["round"]), **r["meta"]} for r in records]}
    return DXO(DataKind.COLLECTION, data=data, meta=meta).to_shareable()


def task_updates(dxo: DXO) -> list[dict]:
    """The updates of an ``audit_task`` in round order: ``round`` (int), ``update`` and
    ``global`` (name -> tensor), ``privacy`` and ``training`` (dicts or None)."""
    out = []
    for entry in dxo.get_meta_prop("audited") or []:
        r = entry.get("round")
        if isinstance(r, bool) or not isinstance(r, int) or r < 0:
            raise ValueError(f"audit task: round {r!r} is not a round number")
        tensors = dxo.data[round_key(r)]
        out.append({"round": r, "privacy": entry.get(PRIVACY_META), "training": entry.get(TRAINING_META) or {},
                    **{part: {k: torch.as_tensor(np.asarray(v)) for k, v in tensors[part].items()}
                       for part in ("update", "global")}})
    return sorted(out, key=lambda u: u["round"])


def round_key(current_round: int) -> str:
    return f"round{int(current_round)}"


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
                  "meta": {PRIVACY_META: dxo.get_meta_prop(PRIVACY_META), TRAINING_META: dxo.get_meta_prop(TRAINING_META)}}
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(record, self.folder / f"round{current_round}_{site}.pt")
        self.log_info(fl_ctx, f"intercepted the update of {site} in round {current_round}")

    def records(self) -> list[Path]:
        return sorted(self.folder.glob("round*_*.pt"), key=lambda p: p.stat().st_mtime) if self.folder else []


class AuditController(Controller):
    """After training, sends each audited site one ``audit`` task with all of its intercepted
    updates, and writes ``<server run>/dpseg_audit.json``: the attack, where the results are (at
    the sites: ``dpseg.auditresults.KEPT_NOTE``) and per site the rounds audited, its
    acknowledgement and, where the site chose to release them, aggregate metrics marked NOT
    DP-protected. No per-update value reaches the server.

    ``attack``: the attack's settings as the job gives them (``check_job_attack``), except those
    each site sets from its own training (``SITE_SET``).
    """

    def __init__(self, interceptor_id: str = "interceptor", task_name: str = AUDIT_TASK, task_timeout: int = 0,
                 **attack):
        super().__init__()
        self.interceptor_id, self.task_name, self.task_timeout = interceptor_id, task_name, task_timeout
        self.attack = check_job_attack(attack)  # refuse bad settings when the job starts
        self.results: list[dict] = []
        self.lock = threading.Lock()

    def start_controller(self, fl_ctx: FLContext):
        self.interceptor = fl_ctx.get_engine().get_component(self.interceptor_id)
        if not isinstance(self.interceptor, UpdateInterceptor):
            self.system_panic(f"component '{self.interceptor_id}' is not an UpdateInterceptor", fl_ctx)
        self.run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        by_site: dict[str, list[dict]] = {}
        for path in self.interceptor.records():
            record = torch.load(path, weights_only=True)
            by_site.setdefault(record["site"], []).append(record)
        self.log_info(fl_ctx, f"auditing the intercepted updates of {len(by_site)} sites at those sites")
        for site, records in sorted(by_site.items()):
            records.sort(key=lambda r: r["round"])
            task = Task(name=self.task_name, data=audit_task(records, self.attack), timeout=self.task_timeout,
                        props={"rounds": [int(r["round"]) for r in records]}, result_received_cb=self._received)
            self.broadcast(task=task, fl_ctx=fl_ctx, targets=[site], min_responses=1)
        while self.get_num_standing_tasks():
            if abort_signal.triggered:
                return
            time.sleep(0.5)
        self._save()
        self.log_info(fl_ctx, f"audit acknowledgements written to {self.run_dir / AUDIT_FILE}; results {KEPT_NOTE}")

    def _received(self, client_task: ClientTask, fl_ctx: FLContext) -> None:
        result, site = client_task.result, client_task.client.name
        record = {"site": site, "rounds": client_task.task.props["rounds"]}
        if result.get_return_code() != ReturnCode.OK:
            record["error"] = str(result.get_header(ERROR_HEADER) or result.get_return_code())
        else:
            record.update(received(from_shareable(result).data))
        self.log_info(fl_ctx, f"audit of {site}, rounds {record['rounds']}: "
                              + (f"failed: {record['error']}" if "error" in record else
                                 f"{record['status']}, release {record['release']}"))
        with self.lock:
            self.results.append(record)
        client_task.result = None

    def _save(self) -> None:
        rows = sorted(self.results, key=lambda r: r["site"])
        text = json.dumps({"attack": self.attack, "results": KEPT_NOTE, "sites": rows}, indent=1) + "\n"
        (self.run_dir / AUDIT_FILE).write_text(text)

    def stop_controller(self, fl_ctx: FLContext):
        pass

    def process_result_of_unknown_task(self, client: Client, task_name: str, client_task_id: str,
                                       result: Shareable, fl_ctx: FLContext):
        self.log_warning(fl_ctx, f"ignored a late result of task '{task_name}' from {client.name}")
