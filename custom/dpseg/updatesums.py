"""The server's running sum of each site's updates over the rounds, for the one-run privacy audit
of a job's audit copy (``dpseg privacy-audit --fl``): what the auditor scores its canaries against.

It keeps what the server received anyway (each site's weight difference per round) and writes
``UPDATE_SUMS_FILE`` into the server's run folder after every round: arrays named
``<site>/<parameter>`` (float64 sums) and ``<site>/_rounds`` (rounds summed). Shipped jobs do not
name it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nvflare.apis.dxo import DataKind, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType

from dpseg.files import write_whole
from dpseg.wire import UPDATE_SUMS_FILE


class UpdateSums(FLComponent):
    """Sums each site's weight differences over the rounds (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.sums: dict[str, dict[str, np.ndarray]] = {}
        self.rounds: dict[str, int] = {}
        self.path: Path | None = None

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            self.path = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())) / UPDATE_SUMS_FILE
        elif event_type == AppEventType.BEFORE_CONTRIBUTION_ACCEPT:
            self._add(fl_ctx)
        elif event_type in (AppEventType.ROUND_DONE, EventType.END_RUN):
            self._save()

    def _add(self, fl_ctx: FLContext) -> None:
        result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
        if result is None:
            return
        try:
            dxo = from_shareable(result)
        except ValueError:
            return
        if dxo.data_kind != DataKind.WEIGHT_DIFF:
            self.log_warning(fl_ctx, f"update sums: a {dxo.data_kind} update is not a weight difference; not summed")
            return
        site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, "?")
        sums = self.sums.setdefault(site, {})
        for name, value in dxo.data.items():
            value = np.asarray(value, dtype=np.float64)
            sums[name] = sums[name] + value if name in sums else value.copy()
        self.rounds[site] = self.rounds.get(site, 0) + 1

    def _save(self) -> None:
        if self.path is None or not self.sums:
            return
        arrays = {f"{site}/{name}": v for site, sums in self.sums.items() for name, v in sums.items()}
        arrays.update({f"{site}/_rounds": np.asarray(n) for site, n in self.rounds.items()})
        write_whole(self.path, lambda tmp: _savez(tmp, arrays))


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with path.open("wb") as f:  # a file object: np.savez would add ".npz" to a temporary name
        np.savez(f, **arrays)


def load_update_sums(path: Path) -> dict[str, tuple[int, dict[str, np.ndarray]]]:
    """{site: (rounds summed, {parameter: summed update})} from an ``UPDATE_SUMS_FILE``."""
    out: dict[str, tuple[int, dict[str, np.ndarray]]] = {}
    with np.load(path) as data:
        for key in data.files:
            site, name = key.split("/", 1)
            sums = out.setdefault(site, (0, {}))[1]
            if name == "_rounds":
                out[site] = (int(data[key]), sums)
            else:
                sums[name] = data[key]
    return out
