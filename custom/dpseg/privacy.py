"""Differential privacy bookkeeping of a site: noise calibration and the accountant (the site's
budget across jobs is its ledger, ``dpseg.ledger``).

The unit of privacy is one patient of one site: every training sample is one patient (the job's
``slices_per_patient`` slices of it, whose gradients are averaged and clipped once), and batches
are drawn by Poisson sampling over the site's training patients with rate ``sample_rate``. The
guarantee covers everything the site sends during a job (all rounds), by the accountant named
(Opacus' ``prv`` or ``rdp``).

Adjacency: add/remove one patient (ADJACENCY), the relation Opacus' accountants bound. Under it
the site's number of training patients is private, so nothing a site sends may depend on it
exactly: the sample rate, the steps per round and the expected batch size the summed gradient is
divided by are public job settings, never derived from the site's cohort.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dpseg.ledger import Ledger

ACCOUNTANTS = ("prv", "rdp")
ADJACENCY = "add/remove one patient"


class PrivacyError(RuntimeError):
    """Training must not go on: the guarantee would be broken or cannot be established."""


@dataclass(frozen=True)
class PrivacyPlan:
    """What a site calibrated for, fixed for the whole job.

    target_epsilon / delta: the (epsilon, delta) the job must not exceed at the patient level;
    max_grad_norm: per-sample clipping norm (L2); batch_size: the public expected batch (patients)
    the summed gradient is divided by; sample_rate: the public Poisson rate per patient; steps:
    optimizer steps over ALL rounds; adjacency: the neighbouring relation the accountant bounds.
    """

    target_epsilon: float
    delta: float
    max_grad_norm: float
    batch_size: int
    sample_rate: float
    steps: int
    accountant: str
    noise_multiplier: float
    adjacency: str = ADJACENCY

    def check_same(self, **requested) -> None:
        """Refuse any change of a privacy-relevant setting after calibration."""
        for key, value in requested.items():
            if key not in self.__dataclass_fields__:
                raise PrivacyError(f"unknown privacy setting {key!r} in the server's request: refused")
            if value is None:
                continue
            mine = getattr(self, key)
            if (isinstance(mine, float) and not math.isclose(mine, float(value), rel_tol=1e-9)) or (
                    not isinstance(mine, float) and mine != value):
                raise PrivacyError(f"this site calibrated its noise for {key}={mine}; "
                                   f"the server asked for {key}={value}: refused")


def calibrate(target_epsilon: float, delta: float, max_grad_norm: float, batch_size: int,
              sample_rate: float, steps: int, accountant: str = "prv") -> PrivacyPlan:
    """Noise multiplier such that ``steps`` Poisson-sampled steps at rate ``sample_rate`` spend at
    most ``target_epsilon`` (add/remove one patient). Every argument is a public job setting: the
    site's number of patients plays no part (see ``check_cohort``)."""
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not (target_epsilon > 0 and 0 < delta < 1):
        raise PrivacyError(f"need target_epsilon > 0 and 0 < delta < 1, got {target_epsilon}, {delta}")
    if not 0 < sample_rate < 1:
        raise PrivacyError(f"sample_rate={sample_rate} must be between 0 and 1 (exclusive)")
    if batch_size < 1 or max_grad_norm <= 0 or steps < 1:
        raise PrivacyError(f"need batch_size >= 1, max_grad_norm > 0 and steps >= 1, got {batch_size}, "
                           f"{max_grad_norm}, {steps}")
    sigma = _kept_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
    if sigma is None:
        sigma = noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant)
        _keep_noise_multiplier(target_epsilon, delta, sample_rate, steps, accountant, sigma)
    plan = PrivacyPlan(target_epsilon, delta, max_grad_norm, batch_size, sample_rate, steps,
                       accountant, float(sigma))
    planned = Accountant(plan).epsilon_after(steps)
    if planned > target_epsilon:
        raise PrivacyError(f"calibration failed: {planned:.4f} > target epsilon {target_epsilon}")
    return plan


EPSILON_TOLERANCE = 0.01  # a calibrated job spends between target - this and the target


def create_accountant(mechanism: str):
    """A new Opacus accountant ("prv" or "rdp"). Opacus is imported here, when an accountant is
    first needed, not with this module: importing it takes about 5 s, which every ``dpseg ledger``
    command would otherwise pay for nothing."""
    from opacus.accountants import create_accountant as opacus_accountant

    return opacus_accountant(mechanism=mechanism)


def _epsilon(sigma: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """Epsilon of ``steps`` Poisson-sampled Gaussian steps of noise multiplier ``sigma`` (inf where the
    accountant cannot bound it)."""
    acc = create_accountant(mechanism=accountant)
    acc.history = [(sigma, sample_rate, steps)]
    try:
        eps = float(acc.get_epsilon(delta))
    except (ValueError, ArithmeticError, RuntimeError):
        return math.inf
    return eps if math.isfinite(eps) else math.inf


def noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The smallest noise multiplier (to the tolerance) whose epsilon is at most ``target_epsilon``:
    bracketed from the RDP accountant's (RDP bounds epsilon from above, so its multiplier is large
    enough for the tighter PRV), then Brent's method on log sigma, about 8 accountant evaluations
    instead of the bisection's 15 to 20. The result spends between target - EPSILON_TOLERANCE and
    the target."""
    from opacus.accountants.utils import get_noise_multiplier
    from scipy.optimize import brentq

    def eps(sigma: float) -> float:
        return _epsilon(sigma, sample_rate, steps, delta, accountant)

    def enough(e: float) -> bool:  # spends at most the target, and at most the tolerance less
        return target_epsilon - EPSILON_TOLERANCE <= e <= target_epsilon

    hi = get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=sample_rate,
                              steps=steps, accountant="rdp", epsilon_tolerance=EPSILON_TOLERANCE)
    while (e_hi := eps(hi)) > target_epsilon:
        hi *= 1.5
    if enough(e_hi):
        return hi
    lo = hi / 1.5
    while (e_lo := eps(lo)) <= target_epsilon:  # still noise enough: go lower
        if enough(e_lo):
            return lo
        hi, lo = lo, lo / 1.5
    # now eps(lo) > target and eps(hi) < target - tolerance: the goal lies between
    goal = target_epsilon - EPSILON_TOLERANCE / 2
    sigma = math.exp(brentq(lambda x: min(eps(math.exp(x)), 1e6) - goal, math.log(lo), math.log(hi), xtol=1e-3))
    while eps(sigma) > target_epsilon:
        sigma *= 1.0005
    return sigma


CACHE_ENV = "DPSEG_CACHE_DIR"


def _calibration_file(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> Path:
    """Where a calibration is kept: ``$DPSEG_CACHE_DIR`` (default ``~/.cache/dpseg``)/calibration/."""
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dpseg")
    return root / "calibration" / f"{accountant}_{target_epsilon!r}_{delta!r}_{sample_rate!r}_{steps}.json"


def _kept_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                           accountant: str) -> float | None:
    """A noise multiplier kept by an earlier calibration of the same public settings, used only if
    the accountant, evaluated now, puts its epsilon between target - 2 x EPSILON_TOLERANCE and the
    target: the kept file is a hint that saves the search, never trusted (a wrong or edited one is
    searched again)."""
    try:
        sigma = float(json.loads(_calibration_file(target_epsilon, delta, sample_rate, steps, accountant)
                                 .read_text())["noise_multiplier"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (math.isfinite(sigma) and sigma > 0):
        return None
    eps = _epsilon(sigma, sample_rate, steps, delta, accountant)
    return sigma if target_epsilon - 2 * EPSILON_TOLERANCE <= eps <= target_epsilon else None


def _keep_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                           sigma: float) -> None:
    """Keep a calibration for the next job of the same settings (where the cache folder is writable)."""
    from dpseg.files import write_whole

    path = _calibration_file(target_epsilon, delta, sample_rate, steps, accountant)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_whole(path, lambda tmp: tmp.write_text(json.dumps({"noise_multiplier": sigma}) + "\n"))
    except OSError:
        pass  # a cache only: the next job searches again


def check_cohort(plan: PrivacyPlan, n_patients: int) -> None:
    """Refuse a job whose delta is not below 1 / the site's training patients (checked at the site;
    the number itself never leaves it)."""
    if n_patients < 1:
        raise PrivacyError("the site has no training patients")
    if plan.delta >= 1.0 / n_patients:
        raise PrivacyError(f"delta={plan.delta} is not below 1/{n_patients} (one over the site's training "
                           "patients): refused")


class Accountant:
    """The accountant of one job at one site; its history persists across rounds (and restarts)."""

    def __init__(self, plan: PrivacyPlan, history: list | None = None):
        self.plan = plan
        self._acc = create_accountant(mechanism=plan.accountant)
        self._acc.history = [tuple(h) for h in (history or [])]

    @property
    def history(self) -> list[tuple]:
        """[(noise multiplier, sample rate, steps), ...] so far (a copy)."""
        return [tuple(h) for h in self._acc.history]

    @property
    def steps(self) -> int:
        return sum(int(h[2]) for h in self._acc.history)

    def step(self, n: int = 1) -> None:
        """Record ``n`` steps of the calibrated Gaussian mechanism; refuse to pass the plan."""
        if self.steps + n > self.plan.steps:
            raise PrivacyError(f"the job planned {self.plan.steps} steps; step {self.steps + n} refused")
        s = self.plan
        hist = self._acc.history
        if hist and hist[-1][0] == s.noise_multiplier and hist[-1][1] == s.sample_rate:
            hist[-1] = (s.noise_multiplier, s.sample_rate, hist[-1][2] + n)
        else:
            hist.append((s.noise_multiplier, s.sample_rate, n))

    def epsilon(self) -> float:
        """Epsilon spent so far at the plan's delta, over the whole history (which holds more
        than one noise multiplier after a re-plan); 0 before the first step."""
        return history_epsilon(self._acc.history, self.plan) if self.steps else 0.0

    def epsilon_after(self, steps: int) -> float:
        """Epsilon of ``steps`` steps of this mechanism (for planning)."""
        s = self.plan
        acc = create_accountant(mechanism=s.accountant)
        acc.history = [(s.noise_multiplier, s.sample_rate, steps)]
        return float(acc.get_epsilon(delta=s.delta))

    def state(self) -> dict:
        return {"plan": asdict(self.plan), "history": [list(h) for h in self._acc.history]}

    @classmethod
    def from_state(cls, state: dict) -> "Accountant":
        plan = state["plan"] if "plan" in state else state["settings"]  # older ledgers name the plan "settings"
        return cls(PrivacyPlan(**plan), state["history"])


def history_epsilon(history: list, plan: PrivacyPlan, extra: tuple | None = None) -> float:
    """Epsilon at ``plan.delta`` of an accountant history [(noise multiplier, sample rate,
    steps), ...], plus an ``extra`` entry if given, by the plan's accountant."""
    acc = create_accountant(mechanism=plan.accountant)
    acc.history = [tuple(h) for h in history] + ([extra] if extra else [])
    return float(acc.get_epsilon(delta=plan.delta))


def replan(accountant: Accountant, more_steps: int) -> Accountant:
    """The same accountant (same history) with room for ``more_steps`` further steps: when they
    do not fit in its plan (a stopped job whose site trained rounds the server never completed),
    the noise multiplier of the further steps is raised, never lowered, so that the whole history
    stays within the target epsilon. Refused (PrivacyError) when no noise below 1000 x the
    calibrated one does."""
    s = accountant.plan
    if accountant.steps + more_steps <= s.steps:
        return accountant
    history = accountant.history

    def fits(sigma: float) -> bool:
        return history_epsilon(history, s, (sigma, s.sample_rate, more_steps)) <= s.target_epsilon

    low, high = s.noise_multiplier, s.noise_multiplier * 1000
    if not fits(high):
        raise PrivacyError(f"{accountant.steps} steps spent epsilon {accountant.epsilon():.3f} of the target "
                           f"{s.target_epsilon}: no noise fits {more_steps} more steps: refused")
    for _ in range(40):  # bisection to 1e-4 relative
        mid = (low + high) / 2
        low, high = (low, mid) if fits(mid) else (mid, high)
        if high - low < 1e-4 * high:
            break
    return Accountant(replace(s, steps=accountant.steps + more_steps, noise_multiplier=float(high)), history)


def continue_accountant(ledger: "Ledger", job_id: str, more_steps: int, **settings) -> Accountant | None:
    """The saved accountant of ledger entry ``job_id`` (a stopped job this job continues), ready
    for the continuing job's ``more_steps``; None when the entry has none.

    Refused (PrivacyError) when this job's privacy ``settings`` (the PrivacyPlan fields it can
    state before calibrating: target_epsilon, delta, max_grad_norm, batch_size, sample_rate,
    accountant) differ from the saved ones. When the steps left in the plan are fewer than
    ``more_steps``, the further steps get more noise (``replan``): the entry's epsilon never passes
    its target."""
    accountant = ledger.accountant(job_id)
    if accountant is None:
        return None
    try:
        accountant.plan.check_same(**settings)
        return replan(accountant, more_steps)
    except PrivacyError as err:
        raise PrivacyError(f"cannot continue ledger entry {job_id} of {ledger.path}: {err}") from None


def reconstruction_bound_eps_delta(epsilon: float, delta: float, baseline: float) -> float:
    """Upper bound on the probability that ANY attack reconstructs (here: identifies) a training
    sample, for an (epsilon, delta)-DP release, when an uninformed guess succeeds with probability
    ``baseline`` (reconstruction robustness, Balle, Cherubin and Hayes 2022): e^eps * baseline + delta."""
    return min(1.0, math.exp(epsilon) * baseline + delta)


def reconstruction_bound(history: list[tuple[float, float, int]], baseline: float,
                         eps_error: float = 0.01, delta_error: float = 1e-9) -> float:
    """The tight reconstruction-robustness bound (Hayes, Mahloujifar and Balle 2023; Kaissis et al.
    2023) on the job's own privacy profile: the probability that ANY attack identifies a training
    patient (or slice) whose uninformed guess succeeds with probability ``baseline`` (kappa) is at
    most min over epsilon >= 0 of [e^eps * kappa + delta(eps)], where delta(eps) is the privacy
    profile, with the patient in against out (the direction a reconstruction needs), of the
    Poisson-subsampled Gaussian mechanism composed over ``history`` [(noise multiplier, sample rate,
    steps), ...] (every step of the job, all rounds). The profile is the PRV accountant's own (the
    one the site's epsilon comes from), taken from above: delta(eps) <= estimate(eps - eps_error) +
    delta_error, so the bound is an upper bound. For one step of rate q and multiplier sigma it is
    (1 - q) * kappa + q * Phi(Phi^-1(kappa) + 1 / sigma) where the best epsilon is >= 0 (small kappa)."""
    return reconstruction_bounds(history, [baseline], eps_error, delta_error)[0]


def reconstruction_bounds(history: list[tuple[float, float, int]], baselines: list[float],
                          eps_error: float = 0.01, delta_error: float = 1e-9) -> list[float]:
    """``reconstruction_bound`` at each of ``baselines``, the privacy profile computed once."""
    from opacus.accountants.prv import PRVAccountant

    for baseline in baselines:
        if not 0.0 <= baseline <= 1.0:
            raise ValueError(f"a chance level is a probability, not {baseline}")
    acc = PRVAccountant()
    acc.history = [tuple(h) for h in history]
    with np.errstate(divide="ignore"):  # log(1 - q) at q = 1: the mechanism is a plain Gaussian
        dprv = acc._get_dprv(eps_error=eps_error, delta_error=delta_error)
    t, p = dprv.domain.ts, dprv.pmf
    tail = np.flip(np.flip(p).cumsum())  # P[L >= t_i]
    tail_exp = np.flip(np.flip(p * np.exp(-t)).cumsum())  # E[e^-L; L >= t_i]
    delta = np.clip(tail - np.exp(np.minimum(t, 700.0)) * tail_exp, 0.0, None) + delta_error
    bounds = []
    for baseline in baselines:
        if baseline == 0.0:
            bounds.append(0.0)  # e^eps * 0 + delta(eps) goes to 0 as epsilon grows
            continue
        # at epsilon = t_i + eps_error (>= 0, and e^eps * kappa <= 1 where the bound can be below 1)
        usable = (t >= 0) & (t + eps_error <= -math.log(baseline))
        bounds.append(float(min(1.0, np.min(np.exp(t[usable] + eps_error) * baseline + delta[usable])))
                      if usable.any() else 1.0)
    return bounds