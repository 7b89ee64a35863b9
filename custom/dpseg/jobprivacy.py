"""A site's privacy for one DP job: plain Python beside the ledger, no NVFlare.

The site learner (``dpseg.learner``) makes one ``JobPrivacy`` per job and calls it in order:
``start`` before the first round (calibrate the noise for all the job's steps, or continue the
accountant of the stopped job this one resumes; check delta against the site's patients; enter
the job in the ledger, which refuses it beyond the site's budget), ``check_round`` before each
round (the server may not change a privacy setting, and the round must fit the plan), ``record``
after each round's steps (what was spent, into the ledger), and ``meta`` for what the update says
of its privacy (``dpseg.wire.PrivacyMeta``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dpseg.ledger import Ledger
from dpseg.privacy import Accountant, PrivacyError, calibrate, check_cohort, continue_accountant
from dpseg.wire import PrivacyMeta


@dataclass
class JobPrivacy:
    """site: the site's name; ledger_path: its ledger file; entry: this job's ledger entry (the
    stopped job's where ``resumes``); job_id: this job's id (noted on a continued entry); the job's
    public privacy settings: target_epsilon and delta (patient level, over all the job's rounds),
    max_grad_norm (L2 clip), batch_size (the expected batch the summed gradient is divided by),
    sample_rate (Poisson rate per patient), accountant ("prv" or "rdp")."""

    site: str
    ledger_path: Path
    entry: str
    job_id: str
    resumes: bool
    target_epsilon: float
    delta: float
    max_grad_norm: float
    batch_size: int
    sample_rate: float
    accountant_name: str
    accountant: Accountant | None = field(default=None, init=False)
    ledger: Ledger | None = field(default=None, init=False)

    def start(self, steps: int, n_patients: int) -> str:
        """Calibrate for ``steps`` steps (all the job's rounds), or continue the stopped job's
        accountant saved in the ledger for the steps left, then enter the job in the ledger; returns
        a line for the site's log. Nothing is kept unless the ledger accepts the job, so a refused
        job stays refused in every later round. Raises PrivacyError (budget, delta, a resumed entry
        without its accountant)."""
        ledger = Ledger.open(self.ledger_path)
        accountant = continue_accountant(
            ledger, self.entry, steps, target_epsilon=self.target_epsilon, delta=self.delta,
            max_grad_norm=self.max_grad_norm, batch_size=self.batch_size, sample_rate=self.sample_rate,
            accountant=self.accountant_name)
        if accountant is not None:
            s = accountant.plan
            message = (f"{self.site}: continuing ledger entry {self.entry}: {accountant.steps} steps done, epsilon "
                       f"{accountant.epsilon():.3f} spent; {steps} more at noise multiplier {s.noise_multiplier:.4f} "
                       f"(plan: {s.steps} steps, epsilon <= {s.target_epsilon})")
        elif self.resumes:
            raise PrivacyError(f"the job resumes ledger entry {self.entry}, which has no saved accountant in "
                               f"{self.ledger_path}: refused")
        else:
            s = calibrate(self.target_epsilon, self.delta, self.max_grad_norm, self.batch_size, self.sample_rate,
                          steps, self.accountant_name)
            accountant = Accountant(s)
            message = (f"{self.site}: calibrated noise multiplier {s.noise_multiplier:.4f} for epsilon "
                       f"{s.target_epsilon} at delta {s.delta} over {s.steps} steps (sample rate "
                       f"{s.sample_rate:.4f}, accountant {s.accountant}); ledger entry {self.entry}")
        check_cohort(accountant.plan, n_patients)
        ledger.reserve(self.entry, accountant.plan)
        if self.resumes:
            ledger.note_continuation(self.entry, self.job_id)
        self.accountant, self.ledger = accountant, ledger
        return message

    @property
    def started(self) -> bool:
        return self.accountant is not None

    def check_round(self, requested: dict | None, steps: int, current_round: int) -> None:
        """Refuse (PrivacyError) a round whose ``requested`` privacy settings (the task's privacy
        meta, if any) differ from the calibrated ones, or whose ``steps`` do not fit the plan."""
        self.accountant.plan.check_same(**(requested or {}))
        planned = self.accountant.plan.steps
        if self.accountant.steps + steps > planned:
            raise PrivacyError(f"round {current_round}: this site has spent {self.accountant.steps} of the "
                               f"{planned} steps it calibrated for (ledger entry {self.entry}); {steps} more do "
                               "not fit: refused")

    def record(self) -> None:
        """Save the accountant (what was spent so far) in the ledger entry."""
        self.ledger.record(self.entry, self.accountant)

    def meta(self) -> dict:
        """The privacy meta of an update sent now (``PrivacyMeta`` as a dict)."""
        s = self.accountant.plan
        return PrivacyMeta(dp=True, adjacency=s.adjacency, epsilon=float(self.accountant.epsilon()), delta=s.delta,
                           target_epsilon=s.target_epsilon, noise_multiplier=s.noise_multiplier,
                           sample_rate=s.sample_rate, steps=self.accountant.steps, planned_steps=s.steps,
                           max_grad_norm=s.max_grad_norm, batch_size=s.batch_size, accountant=s.accountant,
                           ledger_entry=self.entry).to_dict()
