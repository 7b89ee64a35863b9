"""The server's filter of the sites' training results (an NVFlare task-result filter).

Every result of a ``train`` task passes here before the aggregator sees it. An update is rejected
(never aggregated) when it:
- holds NaN or Inf values, lacks a parameter of the global model, has an extra one, or a wrong shape;
- in a DP job (``require_privacy``): comes without the privacy meta, says it was trained without
  DP, or reports an epsilon above ``max_epsilon`` (the job's target).
A rejected result is replaced by an error reply, so NVFlare's workflow treats it as that site's
failure for the round (the round goes on if ``min_clients`` results remain). Rejections and site
failures (with the reason a site gave) are written to ``<server run>/dpseg_rejected.json``, which
``dpseg report`` shows.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from dpseg.wire import ERROR_HEADER, PRIVACY_META, REJECTED_FILE, PrivacyMeta

REJECTED_HEADER = "dpseg_rejected"


def expected_shapes(fl_ctx: FLContext) -> dict[str, tuple]:
    """Parameter name -> shape of the current global model (else of the bundle's network)."""
    model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    if model is not None and model.get(ModelLearnableKey.WEIGHTS):
        return {k: tuple(np.shape(v)) for k, v in model[ModelLearnableKey.WEIGHTS].items()}
    from dpseg.bundle import Bundle

    return {k: tuple(v.shape) for k, v in Bundle().network().state_dict().items()}


def update_problem(data: dict, meta: dict, shapes: dict[str, tuple], require_privacy: bool,
                   max_epsilon: float | None) -> str | None:
    """Why an update (``data``: name -> array, ``meta``: the DXO meta) must not be aggregated, or None."""
    missing, extra = sorted(set(shapes) - set(data)), sorted(set(data) - set(shapes))
    if missing:
        return f"missing parameters: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"
    if extra:
        return f"unexpected parameters: {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"
    for name, value in data.items():
        array = np.asarray(value)
        if tuple(array.shape) != tuple(shapes[name]):
            return f"wrong shape for {name}: {tuple(array.shape)}, expected {tuple(shapes[name])}"
        if not np.all(np.isfinite(array)):
            return f"non-finite values (NaN or Inf) in {name}"
    if require_privacy:
        if meta.get(PRIVACY_META) is None:
            return "no privacy meta (epsilon spent) in an update of a DP job"
        try:
            privacy = PrivacyMeta.from_dict(meta[PRIVACY_META])
        except (TypeError, ValueError) as err:
            return f"unreadable privacy meta: {err}"
        if not privacy.dp:
            return "an update trained without DP in a DP job"
        if max_epsilon is not None and not privacy.epsilon <= max_epsilon:
            return f"epsilon {privacy.epsilon} above the job's target {max_epsilon}"
    return None


class UpdateFilter(Filter):
    """Task-result filter on the server; see the module docstring.

    require_privacy: the job is a DP job (updates must carry the privacy meta);
    max_epsilon: the job's target epsilon (None: not checked).
    """

    def __init__(self, require_privacy: bool = False, max_epsilon: float | None = None):
        super().__init__()
        self.require_privacy, self.max_epsilon = require_privacy, max_epsilon
        self.records: list[dict] = []
        self.lock = threading.Lock()

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        site = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None) or "?"
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        rc = shareable.get_return_code(ReturnCode.OK)
        if rc != ReturnCode.OK:
            reason = shareable.get_header(ERROR_HEADER) or str(rc)
            self.log_error(fl_ctx, f"{site} failed in round {current_round}: {reason}")
            self._record(fl_ctx, {"site": site, "round": current_round, "kind": "site failed", "reason": reason})
            return shareable
        try:
            dxo = from_shareable(shareable)
            problem = update_problem(dxo.data or {}, dxo.meta or {}, expected_shapes(fl_ctx),
                                     self.require_privacy, self.max_epsilon)
        except ValueError as err:
            problem = f"not a valid update: {err}"
        if problem is None:
            return shareable
        self.log_error(fl_ctx, f"rejected the update of {site} in round {current_round}: {problem}")
        self._record(fl_ctx, {"site": site, "round": current_round, "kind": "update rejected", "reason": problem})
        reply = make_reply(ReturnCode.BAD_TASK_DATA)
        reply.set_header(REJECTED_HEADER, problem)
        return reply

    def _record(self, fl_ctx: FLContext, record: dict) -> None:
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        with self.lock:
            self.records.append(record)
            (run_dir / REJECTED_FILE).write_text(json.dumps(self.records, indent=1) + "\n")
