"""The empirical epsilon: a canary audit of the site's DP step (Jagielski et al. 2020; Nasr et al.
2023, "Tight auditing of differentially private machine learning").

What is audited is the site's own step code, not a copy of it: ``dpseg.dptrain.LocalTrainer`` with
its Poisson sampler (``SecureRandom``), per-sample gradients (``PerSampleGrads``), Opacus'
clipping and summation, the secure Gaussian noise (``SecureDPOptimizer``), the division by the
public expected batch, the calibration and the accountant (``dpseg.privacy``). The only way in is
the trainer's ``per_sample_hook``: after a step's per-sample gradients are computed and before
they are clipped, it gives each sampled canary the gradient M * e_r (M = ``CANARY_NORM`` x the clip
norm, far above it) along its own coordinate r of the network's weights.

A smaller network audits the same code: what the mechanism does (sample, clip, sum, noise, divide)
does not depend on the network, and with the canaries on orthogonal coordinates and noise
independent per coordinate, every canary is an independent trial. One run of the job's T steps
with R canaries gives R trials: each canary is in the site's cohort by a fair coin (then
Poisson-sampled like every patient); an out canary's coordinate receives noise only. The auditor
sees every noised step (more than the server, which sees one update per round) and scores each
canary by the log-likelihood ratio of its coordinate's projections under the claimed mechanism
(rate q, noise sigma * C, contribution C). True and false positive rates at a threshold, chosen on
one half of the canaries and counted on the other, give a lower bound on epsilon at 95% confidence
(Clopper-Pearson, both tails 2.5%) and the Gaussian-DP route's (Nasr et al. 2023: mu from the same
rates, then the epsilon of mu-GDP at delta; it assumes the trade-off is Gaussian, which many
subsampled steps make nearly so).

Deliberately broken variants run through the same code with one thing wrong each; each must be
caught (a lower bound above the claimed epsilon), the shipped mechanism must not be.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import beta, norm

from dpseg.dptrain import LocalTrainer, StepStats
from dpseg.privacy import Accountant, PrivacyPlan, calibrate
from dpseg.tools.onerun import ESTIMATE_CAP, gdp_epsilon, one_run_figures

CANARY_NORM = 10.0  # a canary's gradient norm, in clip norms
CONFIDENCE = 0.95
ONE_RUN_CANARIES = 1000  # canaries of each variant's one-run audit


@dataclass(frozen=True)
class Variant:
    """One mechanism under audit: ``name``; ``broken`` (what it should be caught at); the noise
    multiplier as a multiple of the calibrated one; ``clip`` off; ``every_step``: the sampler takes
    every patient in every step; ``reset_every_round``: the noise calibrated for one round's steps
    as if the accountant restarted each round."""

    name: str
    broken: bool
    noise_factor: float = 1.0
    clip: bool = True
    every_step: bool = False
    reset_every_round: bool = False


VARIANTS = (Variant("shipped", False), Variant("noise off", True, noise_factor=0.0),
            Variant("noise multiplier 10x too small", True, noise_factor=0.1),
            Variant("clipping off", True, clip=False), Variant("canary sampled at every step", True, every_step=True),
            Variant("accountant reset every round", True, reset_every_round=True))


@dataclass(frozen=True)
class Mechanism:
    """The job's public DP settings (``jobs/fed_dp`` by default): epsilon, delta, clip norm C,
    expected batch, Poisson rate q, steps per round and rounds."""

    epsilon: float
    delta: float
    max_grad_norm: float
    batch_size: int
    sample_rate: float
    local_steps: int
    rounds: int

    @property
    def steps(self) -> int:
        return self.local_steps * self.rounds

    def plan(self, steps: int | None = None) -> PrivacyPlan:
        """The site's calibration for ``steps`` (all the job's by default)."""
        return calibrate(self.epsilon, self.delta, self.max_grad_norm, self.batch_size, self.sample_rate,
                         steps or self.steps)


def job_mechanism(job: Path | None = None, **overrides) -> Mechanism:
    """The mechanism of a DP job's configs (``jobs/fed_dp``), with ``overrides``."""
    from dpseg.jobs import JOBS_DIR

    job = job or JOBS_DIR / "fed_dp"
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    values = {"epsilon": client["target_epsilon"], "delta": client["delta"], "max_grad_norm": client["max_grad_norm"],
              "batch_size": client["batch_size"], "sample_rate": client["sample_rate"],
              "local_steps": client["local_steps"], "rounds": server["num_rounds"]}
    return Mechanism(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


class CanaryCohort:
    """A site's training patients, all canaries: ``batch`` gives inputs of zeros (their real
    gradients are replaced by the hook), in the ``PatientSlices`` interface."""

    def __init__(self, patients: int, features: int, outputs: int):
        self.patients, self.features, self.outputs = patients, features, outputs

    def __len__(self) -> int:
        return self.patients

    def batch(self, indices: list[int], slices_per_patient: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        rows = len(indices) * slices_per_patient
        return torch.zeros(rows, self.features), torch.zeros(rows, self.outputs)


@dataclass
class RunTrace:
    """One run: per canary, whether it was in the cohort; per step and canary, the projection of
    the noised sum on its coordinate (T, R) in gradient-sum units; how often in canaries were sampled."""

    member: np.ndarray
    projections: np.ndarray
    sampled: int


def canary_run(mechanism: Mechanism, variant: Variant, canaries: int, generator: np.random.Generator) -> RunTrace:
    """One run of the job's steps through ``LocalTrainer`` with ``canaries`` canaries, each in the
    cohort by a fair coin; returns what the auditor sees."""
    member = generator.random(canaries) < 0.5
    in_coords = np.flatnonzero(member)
    calibrated = mechanism.plan(mechanism.local_steps if variant.reset_every_round else None)
    sigma = calibrated.noise_multiplier * variant.noise_factor
    plan = PrivacyPlan(**{**asdict(calibrated), "noise_multiplier": sigma, "steps": mechanism.steps})
    outputs = 10
    features = -(-canaries // outputs)
    network = torch.nn.Linear(features, outputs, bias=False)
    torch.nn.init.zeros_(network.weight)
    sampled = 0

    def canary_gradients(indices: list[int], params: list[torch.Tensor]) -> None:
        nonlocal sampled
        (weight,) = params
        rows = torch.zeros(len(indices), weight.numel())
        rows[torch.arange(len(indices)), torch.as_tensor(in_coords[indices], dtype=torch.long)] = \
            CANARY_NORM * mechanism.max_grad_norm
        weight.grad_sample = rows.view(len(indices), *weight.shape)
        sampled += len(indices)

    trainer = LocalTrainer(network, torch.nn.MSELoss(), CanaryCohort(len(in_coords), features, outputs), lr=1.0,
                           batch_size=mechanism.batch_size, accountant=Accountant(plan), optimizer="sgd",
                           per_sample_hook=canary_gradients)
    if not variant.clip:  # clipping at a norm no gradient reaches, the noise's scale kept
        trainer.optimizer.max_grad_norm = 1e12
        trainer.optimizer.noise_multiplier = sigma * mechanism.max_grad_norm / 1e12
    if variant.every_step:  # the deliberately broken sampler: every patient in every step
        trainer._poisson = lambda n, rate: list(range(n))
    projections = np.empty((mechanism.steps, canaries))
    before = network.weight.detach().reshape(-1).clone()
    stats = StepStats()
    for t in range(mechanism.steps):
        trainer.step(stats)
        after = network.weight.detach().reshape(-1).clone()
        # SGD at learning rate 1: theta_t = theta_{t-1} - (noised sum) / expected batch
        projections[t] = ((before - after) * mechanism.batch_size).numpy()[:canaries]
        before = after
    trainer.close()
    return RunTrace(member, projections, sampled)


def log_likelihood_ratios(projections: np.ndarray, mechanism: Mechanism, sigma: float) -> np.ndarray:
    """Per canary (R,), the log-likelihood ratio of its projections (T, R) for "in the cohort"
    against "not": each step (1 - q) N(0, (sigma C)^2) + q N(C, (sigma C)^2) against N(0, (sigma C)^2)."""
    q, c = mechanism.sample_rate, mechanism.max_grad_norm
    per_step = (projections * c - c * c / 2) / (sigma * c) ** 2
    return np.logaddexp(math.log1p(-q), math.log(q) + per_step).sum(axis=0)


def clopper_pearson(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """The one-sided (1 - alpha) Clopper-Pearson bounds (lower, upper) of a binomial rate."""
    lower = 0.0 if successes == 0 else float(beta.ppf(alpha, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - alpha, successes + 1, trials - successes))
    return lower, upper


def epsilon_of_rates(tpr_low: float, fpr_high: float, delta: float) -> float:
    """The largest epsilon that rates TPR >= ``tpr_low`` and FPR <= ``fpr_high`` force on an
    (epsilon, delta)-DP test (both the test and its complement; 0 where none)."""
    bounds = [0.0]
    if fpr_high > 0 and tpr_low - delta > 0:
        bounds.append(math.log((tpr_low - delta) / fpr_high))
    if 1 - tpr_low > 0 and (1 - fpr_high) - delta > 0:
        bounds.append(math.log(((1 - fpr_high) - delta) / (1 - tpr_low)))
    return max(bounds)


def _rates(scores_in: np.ndarray, scores_out: np.ndarray, threshold: float, alpha: float) -> tuple[float, float]:
    tpr_low, _ = clopper_pearson(int((scores_in >= threshold).sum()), len(scores_in), alpha)
    _, fpr_high = clopper_pearson(int((scores_out >= threshold).sum()), len(scores_out), alpha)
    return tpr_low, fpr_high


def _gdp_mu(tpr_low: float, fpr_high: float) -> float:
    if tpr_low <= 0 or fpr_high >= 1:
        return 0.0
    return float(norm.ppf(min(tpr_low, 1 - 1e-16)) - norm.ppf(max(fpr_high, 1e-300)))


def lower_bounds(scores: np.ndarray, member: np.ndarray, delta: float, confidence: float = CONFIDENCE) -> dict:
    """The empirical lower bounds on epsilon from canary scores: thresholds chosen on the even
    canaries, rates counted on the odd ones (so the choice costs no confidence), each rate bounded
    at (1 - confidence) / 2 (Clopper-Pearson), so both hold together at ``confidence``."""
    alpha = (1 - confidence) / 2
    pick, count = np.arange(len(scores)) % 2 == 0, np.arange(len(scores)) % 2 == 1
    candidates = np.unique(np.quantile(scores[pick], np.linspace(0.0, 1.0, 401)))

    def best(criterion) -> float:
        a_in, a_out = scores[pick & member], scores[pick & ~member]
        return max(candidates, key=lambda t: criterion(*_rates(a_in, a_out, t, alpha)))

    b_in, b_out = scores[count & member], scores[count & ~member]
    t_cp = best(lambda tpr, fpr: epsilon_of_rates(tpr, fpr, delta))
    t_gdp = best(_gdp_mu)
    tpr, fpr = _rates(b_in, b_out, t_cp, alpha)
    tpr_g, fpr_g = _rates(b_in, b_out, t_gdp, alpha)
    mu = _gdp_mu(tpr_g, fpr_g)
    return {"epsilon_lower_bound": epsilon_of_rates(tpr, fpr, delta), "tpr_lower": tpr, "fpr_upper": fpr,
            "epsilon_lower_bound_gdp": gdp_epsilon(mu, delta), "mu_lower": mu,
            "canaries_in": int(len(b_in)), "canaries_out": int(len(b_out))}


def audit_variant(mechanism: Mechanism, variant: Variant, runs: int, canaries: int, seed: int = 0,
                  progress=None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Audit one variant: ``runs`` runs of ``canaries`` canaries; returns (its result row, scores,
    membership). The scores assume the claimed (shipped) mechanism, whatever the variant does."""
    generator = np.random.default_rng(seed)
    claimed = mechanism.plan()
    started = time.perf_counter()
    traces = []
    for run in range(runs):
        traces.append(canary_run(mechanism, variant, canaries, generator))
        if progress and ((run + 1) % 10 == 0 or run + 1 == runs):
            progress(f"  {variant.name}: run {run + 1}/{runs} ({time.perf_counter() - started:.0f} s)")
    member = np.concatenate([t.member for t in traces])
    projections = np.concatenate([t.projections for t in traces], axis=1)
    scores = log_likelihood_ratios(projections, mechanism, claimed.noise_multiplier)
    c = mechanism.max_grad_norm
    out = projections[:, ~member]
    in_steps, sampled = member.sum() * mechanism.steps, sum(t.sampled for t in traces)
    bounds = lower_bounds(scores, member, mechanism.delta)
    one = one_run(mechanism, variant, generator)
    row = {"variant": variant.name, "broken": variant.broken, **bounds, "confidence": CONFIDENCE,
           "runs": runs, "canaries": int(len(member)), "steps": mechanism.steps, **one,
           "caught": max(bounds["epsilon_lower_bound"], bounds["epsilon_lower_bound_gdp"],
                         one["epsilon_lower_bound_one_run"]) > mechanism.epsilon,
           "estimate_above_claim": one["epsilon_estimate"] > mechanism.epsilon,
           # the mechanism measured directly: noise std / C (claimed sigma), inclusion rate (claimed q),
           # an included canary's mean contribution / C (claimed 1: clipped to C)
           "noise_std_over_clip": float(out.std() / c), "claimed_noise_multiplier": claimed.noise_multiplier,
           "inclusion_rate": sampled / in_steps if in_steps else None,
           "contribution_over_clip": _contribution(member, projections, sampled) / c,
           "seconds": time.perf_counter() - started}
    return row, scores, member


def one_run(mechanism: Mechanism, variant: Variant, generator: np.random.Generator,
            canaries: int = ONE_RUN_CANARIES) -> dict:
    """The one-run audit of ``variant`` (``dpseg.tools.onerun``): one run of the job's steps with
    ``canaries`` canaries, each scored by the sum of its projections over all steps, which is what
    the server sees of it (the sum of the rounds' updates; the network is linear and trained by SGD)."""
    trace = canary_run(mechanism, variant, canaries, generator)
    return one_run_figures(trace.projections.sum(axis=0), trace.member, mechanism.delta)


def detected(row: dict) -> bool:
    """Whether the audit flags a variant's row: a bound above the claim, or, for a broken variant,
    its estimate above the claim (the shipped mechanism's estimate may sit near the claim)."""
    return row["caught"] or (row["broken"] and bool(row.get("estimate_above_claim")))


def wrong_verdicts(results: dict) -> list[str]:
    """The variants the audit got wrong: a broken one not ``detected``, or the shipped one detected."""
    return [r["variant"] for r in results["results"] if detected(r) != r["broken"]]


def _contribution(member: np.ndarray, projections: np.ndarray, sampled: int) -> float:
    """The mean projection of in canaries (``member``) minus that of out canaries, per sampled step
    (``sampled`` in all): an included canary's mean contribution to the noised sum."""
    if not member.any() or not sampled:
        return 0.0
    steps = projections.shape[0]
    excess = projections[:, member].sum() - member.sum() * steps * projections[:, ~member].mean()
    return float(excess / sampled)


def privacy_audit(out: Path, mechanism: Mechanism | None = None, runs: int = 50, canaries: int = 400,
                  variants: tuple[Variant, ...] = VARIANTS, progress=print) -> dict:
    """Audit every variant; writes ``out/privacy_audit.json``, ``out/privacy_audit.md`` and
    ``out/privacy_audit.png`` (the canary scores, in against out, per variant); returns the results."""
    mechanism = mechanism or job_mechanism()
    out.mkdir(parents=True, exist_ok=True)
    claimed = mechanism.plan()
    progress(f"privacy audit: claimed epsilon {mechanism.epsilon:g}, delta {mechanism.delta:g}; {mechanism.steps} "
             f"steps at rate {mechanism.sample_rate:g}, noise multiplier {claimed.noise_multiplier:.3f}; "
             f"{len(variants)} variants x {runs} runs x {canaries} canaries")
    rows, scores = [], {}
    for i, variant in enumerate(variants):
        row, s, member = audit_variant(mechanism, variant, runs, canaries, seed=i, progress=progress)
        rows.append(row)
        scores[variant.name] = (s, member)
        verdict = "caught" if row["caught"] else "not caught"
        progress(f"{variant.name}: lower bound {row['epsilon_lower_bound']:.2f} (Clopper-Pearson), "
                 f"{row['epsilon_lower_bound_gdp']:.2f} (GDP route), one run {row['epsilon_lower_bound_one_run']:.2f} "
                 f"(estimate {row['epsilon_estimate']:.2f}); {verdict}{' (broken)' if variant.broken else ''}; "
                 f"{row['seconds']:.0f} s")
    results = {"claimed_epsilon": mechanism.epsilon, "delta": mechanism.delta, "mechanism": asdict(mechanism),
               "noise_multiplier": claimed.noise_multiplier, "canary_norm_over_clip": CANARY_NORM, "results": rows}
    (out / "privacy_audit.json").write_text(json.dumps(results, indent=1) + "\n")
    figure = write_figure(scores, out / "privacy_audit.png")
    (out / "privacy_audit.md").write_text(markdown(results, figure.name))
    progress(f"wrote {out / 'privacy_audit.json'} and {out / 'privacy_audit.md'}")
    return results


def write_figure(scores: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Histograms of the canary scores, in against out, one panel per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(3.2 * len(scores), 2.8), squeeze=False)
    for ax, (name, (s, member)) in zip(axes[0], scores.items()):
        finite = np.isfinite(s)
        low, high = np.percentile(s[finite], [0.5, 99.5]) if finite.any() else (0, 1)
        bins = np.linspace(low, high if high > low else low + 1, 40)
        ax.hist(np.clip(s[member & finite], low, high), bins, alpha=0.6, label="in")
        ax.hist(np.clip(s[~member & finite], low, high), bins, alpha=0.6, label="out")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("log-likelihood ratio", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def markdown(results: dict, figure: str) -> str:
    m = results["mechanism"]
    lines = ["# Privacy audit (canaries through the site's DP step)", "",
             f"Claimed: epsilon {results['claimed_epsilon']:g}, delta {results['delta']:g} (patient level, add/remove), "
             f"{m['local_steps']} x {m['rounds']} steps at Poisson rate {m['sample_rate']:g}, clip norm "
             f"{m['max_grad_norm']:g}, expected batch {m['batch_size']}, noise multiplier "
             f"{results['noise_multiplier']:.3f}. Each canary's gradient is {results['canary_norm_over_clip']:g} x the "
             "clip norm along its own coordinate. Many runs: the auditor sees every noised step; lower bounds at 95% "
             f"confidence. One run: {ONE_RUN_CANARIES} canaries scored by what the server sees (the sum of the "
             "updates); Steinke et al.'s lower bound at 95% and the Gaussian estimate after Andrew et al. (an "
             "estimate, not a bound). A variant is caught when a bound exceeds the claimed epsilon; a broken one "
             "also when its estimate does.", "",
             "| variant | broken | many runs: bound (Clopper-Pearson) | bound (GDP route) | one run: bound | estimate "
             "| caught | runs x canaries | noise std / C | inclusion rate | contribution / C | s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["results"]:
        rate = "-" if r["inclusion_rate"] is None else f"{r['inclusion_rate']:.3f}"
        estimate = f"{r['epsilon_estimate']:.2f}" + (" (cap)" if r["epsilon_estimate"] >= ESTIMATE_CAP else "")
        lines.append(f"| {r['variant']} | {'yes' if r['broken'] else 'no'} | {r['epsilon_lower_bound']:.2f} | "
                     f"{r['epsilon_lower_bound_gdp']:.2f} | {r['epsilon_lower_bound_one_run']:.2f} | {estimate} | "
                     f"{'yes' if r['caught'] else 'no'} | {r['runs']} x {r['canaries'] // r['runs']} | "
                     f"{r['noise_std_over_clip']:.3f} | {rate} | {r['contribution_over_clip']:.3f} | {r['seconds']:.0f} |")
    lines += ["", f"Claimed noise std / C: {results['noise_multiplier']:.3f}; inclusion rate: {m['sample_rate']:g}; "
              "contribution / C: 1.", "", f"![Canary scores, in against out]({figure})", ""]
    return "\n".join(lines)
