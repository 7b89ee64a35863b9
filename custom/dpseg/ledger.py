"""The site's privacy ledger: its total (epsilon, delta) budget and every DP job it ran, in one
JSON file that the site owns.

Threat model: jobs and the server never name, create or change a site's ledger; the site's own
settings say where it is (``dpseg.site``), and the site creates it once with
``dpseg ledger init PATH --total-epsilon E [--total-delta D]``, which stores the totals IN the file
(covered by its checksum). A missing ledger is an error, never a fresh budget: moving the data or
the workspace cannot reset what was spent.

Several jobs may run against one ledger at once (separate processes: the simulator's workers,
jobs of a deployed site). Every change (``reserve``, ``record``, ``note_continuation``) takes an
exclusive lock (``fcntl.flock`` on ``<ledger>.lock`` beside it), re-reads and verifies the file,
applies its own change to that fresh content, writes the whole file atomically and releases the
lock: no change is lost, and two jobs together never pass the totals. ``flock`` is advisory and
local: every writer must be this module, on one machine (not a ledger on NFS shared by hosts).

Across jobs, epsilons and deltas add up (basic composition, an upper bound). A job commits the
larger of its target epsilon and what it spent, and its delta. A file that cannot be read or whose
checksum does not match stops training; it is never reset here. The checksum (sha256 of everything
but itself) catches damage and hand edits, not a deliberate forger with write access.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dpseg.files import write_whole
from dpseg.privacy import Accountant, PrivacyError, PrivacyPlan
from dpseg.site import DEFAULT_TOTAL_DELTA, ledger_init_command

__all__ = ["DEFAULT_TOTAL_DELTA", "FORMAT", "LOCK_TIMEOUT_S", "Ledger", "lock_path"]

FORMAT = "dpseg-ledger/1"
LOCK_TIMEOUT_S = 60.0
_REL_TOL = 1e-9  # sums of floats may pass a total by rounding alone


def lock_path(path: Path) -> Path:
    """The lock file beside ledger ``path`` (``<name>.lock``); it stays there, empty."""
    return Path(path).with_name(Path(path).name + ".lock")


@dataclass
class Ledger:
    """The ledger's content as of its last ``open`` or change: totals (epsilon, delta: the site's
    budget across all jobs) and ``jobs`` (ledger entry -> target_epsilon, delta, spent_epsilon,
    steps, accountant, started, accountant_state, continued_by)."""

    path: Path
    total_epsilon: float
    total_delta: float
    jobs: dict = field(default_factory=dict)

    @classmethod
    def create(cls, path: Path, total_epsilon: float, total_delta: float = DEFAULT_TOTAL_DELTA) -> "Ledger":
        """Write a new, empty ledger with the site's totals. Refused (PrivacyError) if ``path``
        exists: a ledger is never overwritten."""
        path = Path(path)
        _check_totals(path, total_epsilon, total_delta)
        path.parent.mkdir(parents=True, exist_ok=True)
        ledger = cls(path, float(total_epsilon), float(total_delta))
        with _locked(path):
            if path.exists():
                raise PrivacyError(f"privacy ledger {path} exists already; it is never overwritten "
                                   "(its entries are what the site has spent)")
            ledger._write()
        return ledger

    @classmethod
    def open(cls, path: Path) -> "Ledger":
        """Read and verify the ledger at ``path``. Raises PrivacyError if it does not exist (naming
        the command that creates it), cannot be read, or does not match its checksum."""
        path = Path(path)
        return cls(path, *_read(path))

    # ----------------------------------------------------------------------------- figures
    def committed(self, exclude: str | None = None) -> float:
        """Epsilon committed by every job (the larger of target and spent), except ``exclude``."""
        return sum(max(j["target_epsilon"], j["spent_epsilon"]) for k, j in self.jobs.items() if k != exclude)

    def committed_delta(self) -> float:
        """Delta committed by every job (each job's delta, from the moment it is entered)."""
        return sum(j["delta"] for j in self.jobs.values())

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta) actually spent by all jobs, added up (a job's delta once it took a step)."""
        return (sum(j["spent_epsilon"] for j in self.jobs.values()),
                sum(j["delta"] for j in self.jobs.values() if j["spent_epsilon"] > 0))

    def accountant(self, job_id: str) -> Accountant | None:
        """The saved accountant of a job entered earlier (None if the job is not in the ledger or
        never took a step)."""
        state = self.jobs.get(job_id, {}).get("accountant_state")
        return Accountant.from_state(state) if state else None

    # ----------------------------------------------------------------------------- changes
    def reserve(self, job_id: str, plan: PrivacyPlan) -> None:
        """Enter a job at its target epsilon and delta; refuse it (PrivacyError) if the site's
        committed epsilon or delta plus the job's would pass the ledger's totals. A job already
        entered with the same target and delta (a resumed job) is counted once."""

        def apply(jobs: dict) -> bool:
            if job_id in jobs:
                entry = jobs[job_id]
                if (entry["target_epsilon"], entry["delta"]) != (plan.target_epsilon, plan.delta):
                    raise PrivacyError(f"job {job_id} is already in the ledger {self.path} with another target "
                                       f"epsilon or delta ({entry['target_epsilon']}, {entry['delta']}): refused")
                return False
            self._check_room(job_id, plan.target_epsilon, plan.delta)
            jobs[job_id] = {"target_epsilon": plan.target_epsilon, "delta": plan.delta,
                            "spent_epsilon": 0.0, "steps": 0, "accountant": plan.accountant,
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
            return True

        self._change(apply)

    def record(self, job_id: str, accountant: Accountant) -> None:
        """Update a job's entry with what it spent and the accountant's full state (its history),
        from which a stopped job continues (``accountant()``)."""

        spent = {"spent_epsilon": float(accountant.epsilon()), "steps": int(accountant.steps),
                 "accountant_state": accountant.state()}  # computed before the lock is taken

        def apply(jobs: dict) -> bool:
            self._entry(jobs, job_id).update(spent)
            return True

        self._change(apply)

    def note_continuation(self, job_id: str, by: str) -> None:
        """Record that job ``by`` continues the entry ``job_id`` (its steps count in that entry)."""

        def apply(jobs: dict) -> bool:
            continued = self._entry(jobs, job_id).setdefault("continued_by", [])
            if by == job_id or by in continued:
                return False
            continued.append(by)
            return True

        self._change(apply)

    # ----------------------------------------------------------------------------- private
    def _check_room(self, job_id: str, epsilon: float, delta: float) -> None:
        for name, already, wanted, total in (("epsilon", self.committed(), epsilon, self.total_epsilon),
                                             ("delta", self.committed_delta(), delta, self.total_delta)):
            if already + wanted > total and not math.isclose(already + wanted, total, rel_tol=_REL_TOL):
                raise PrivacyError(
                    f"privacy budget exceeded: this site has committed {name} {already:.6g} of its total "
                    f"{total:.6g} (ledger {self.path}); job {job_id} needs {wanted:.6g}. "
                    "Refused before any training step.")

    def _entry(self, jobs: dict, job_id: str) -> dict:
        if job_id not in jobs:
            raise PrivacyError(f"ledger entry {job_id} is missing from {self.path} (it was entered before "
                               "training): training stopped")
        return jobs[job_id]

    def _change(self, apply: Callable[[dict], bool]) -> None:
        """Under the lock: re-read and verify the file, ``apply`` the change to the fresh entries
        and write them if it returns True. This object then holds the fresh content."""
        with _locked(self.path):
            self.total_epsilon, self.total_delta, self.jobs = _read(self.path)
            if apply(self.jobs):
                self._write()

    def _write(self) -> None:
        """Write atomically and durably (a crash leaves the old or the new ledger, never half of one)."""
        body = {"format": FORMAT, "total_epsilon": self.total_epsilon, "total_delta": self.total_delta,
                "jobs": self.jobs}
        text = json.dumps({**body, "sha256": _digest(body)}, indent=1) + "\n"

        def write(tmp: Path) -> None:
            with open(tmp, "w") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())

        write_whole(self.path, write)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def _check_totals(path: Path, total_epsilon, total_delta) -> None:
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (total_epsilon, total_delta))
    if not (ok and 0 < total_epsilon < math.inf and 0 < total_delta < 1):
        raise PrivacyError(f"privacy ledger {path}: need total epsilon > 0 and 0 < total delta < 1, "
                           f"got {total_epsilon!r}, {total_delta!r}")


def _read(path: Path) -> tuple[float, float, dict]:
    """(total epsilon, total delta, jobs) of the ledger file at ``path``, verified."""
    if not path.exists():
        raise PrivacyError(f"privacy ledger {path} does not exist; a DP job needs the site's ledger. "
                           f"Create it once with `{ledger_init_command(path)}`")
    restore = "training stopped. Restore it from a backup; it is never reset automatically."
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "jobs" in data and "total_epsilon" not in data:
            raise PrivacyError(f"privacy ledger {path} holds no totals (an older dpseg's format, whose budget was a "
                               f"site setting); training stopped. Keep it as the record of what the site spent")
        body = {key: data[key] for key in ("format", "total_epsilon", "total_delta", "jobs")}
        digest = data["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PrivacyError(f"privacy ledger {path} is unreadable or not a {FORMAT} ledger ({err!r}); {restore}") from None
    if digest != _digest(body):
        raise PrivacyError(f"privacy ledger {path} does not match its checksum (damaged or edited); {restore}")
    if body["format"] != FORMAT:
        raise PrivacyError(f"privacy ledger {path} has format {body['format']!r}, not {FORMAT!r}: training stopped")
    _check_totals(path, body["total_epsilon"], body["total_delta"])
    return float(body["total_epsilon"]), float(body["total_delta"]), body["jobs"]


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextmanager
def _locked(path: Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the exclusive lock of ledger ``path`` (``lock_path``); PrivacyError after ``timeout`` s."""
    lock = lock_path(path)
    handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise PrivacyError(f"privacy ledger {path}: its lock {lock} was held by another process for "
                                       f"more than {timeout:.0f} s: refused") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(handle)  # closing the descriptor releases the lock
