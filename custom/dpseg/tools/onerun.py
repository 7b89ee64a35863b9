"""The one-run privacy audit: an empirical epsilon from a single run (Steinke, Nasr and Jagielski
2023, "Privacy auditing with one (1) training run"; Andrew et al. 2024, "One-shot empirical privacy
estimation for federated learning").

m canaries, each in the cohort by a fair coin, are scored after one run (high: "in"). Two figures:

- the lower bound (Steinke et al.): the auditor guesses "in" for the k best-scored canaries and
  "out" for the k worst, abstains on the rest; if the run is (epsilon, delta)-DP, the number of
  correct guesses is stochastically dominated by Binomial(2k, e^eps / (1 + e^eps)) up to a delta
  term. The bound is the largest epsilon that the observed count rejects at 95% confidence
  (Bonferroni over the fixed set of k tried). With m canaries even perfect guesses cannot confirm a
  large epsilon: for m = 1,000 the bound stops near 6 (``one_run_bound`` of perfect scores says
  where), so it catches gross bugs, never confirms a claim of 8.
- the estimate (Andrew et al.): normal distributions fitted to the scores of in and out canaries,
  and the epsilon at delta between the two (the hockey-stick divergence of the fitted pair). An
  estimate, not a bound: for a Gaussian-like mechanism whose accountant is tight it sits near the
  claim, a little under it or over it by chance.

``fl_one_run`` runs it inside a real job: a copy of ``jobs/fed_dp`` in the NVFlare simulator with
``canaries`` canaries per site (``dpseg.canaries``) and the server's update sums
(``dpseg.updatesums``); each canary's score is the cosine between its direction and the sum of
the updates its site sent (what the server sees).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import expit
from scipy.stats import binom, norm

CONFIDENCE = 0.95
GUESS_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)  # k / m tried on each side (Bonferroni over them)
ESTIMATE_CAP = 200.0  # epsilon estimates are reported up to this (a perfect separation is "at least")


def p_value(m: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of at least ``correct`` right guesses out of ``guesses`` (m canaries) if the
    run is (epsilon, delta)-DP (Steinke et al. 2023, their main theorem)."""
    p = float(expit(epsilon))
    tail = float(binom.sf(correct - 1, guesses, p))  # P[Binomial(guesses, p) >= correct]
    if delta == 0 or correct == 0:
        return tail
    i = np.arange(1, correct + 1)
    alpha = float(np.max((binom.sf(correct - i - 1, guesses, p) - tail) / i))
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_rejected(m: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest epsilon whose (epsilon, delta) claim ``correct`` of ``guesses`` rejects at
    ``significance`` (0 when none)."""
    if guesses == 0 or p_value(m, guesses, correct, 0.0, delta) > significance:
        return 0.0
    high = 1.0
    while p_value(m, guesses, correct, high, delta) <= significance:
        high *= 2
        if high > 1e3:
            return high
    return float(brentq(lambda e: p_value(m, guesses, correct, e, delta) - significance, high / 2 if high > 1 else 0.0,
                        high, xtol=1e-4))


def one_run_bound(scores: np.ndarray, member: np.ndarray, delta: float, confidence: float = CONFIDENCE) -> dict:
    """Steinke et al.'s lower bound from one run's canary ``scores`` (m,) and ``member`` (m,) bool."""
    m = len(scores)
    order = np.argsort(scores)
    significance = (1 - confidence) / len(GUESS_FRACTIONS)
    best = {"epsilon_lower_bound_one_run": 0.0, "guesses": 0, "correct": 0}
    for fraction in GUESS_FRACTIONS:
        k = max(1, int(fraction * m / 2))
        correct = int(member[order[-k:]].sum() + (~member[order[:k]]).sum())
        bound = epsilon_rejected(m, 2 * k, correct, delta, significance)
        if bound > best["epsilon_lower_bound_one_run"]:
            best = {"epsilon_lower_bound_one_run": bound, "guesses": 2 * k, "correct": correct}
    return best


def gdp_delta(epsilon: float, mu: float) -> float:
    """delta(epsilon) of mu-Gaussian DP (Dong, Roth and Su 2022)."""
    second = math.exp(epsilon + norm.logcdf(-epsilon / mu - mu / 2)) if mu > 0 else 0.0
    return float(norm.cdf(-epsilon / mu + mu / 2) - second)


def gdp_epsilon(mu: float, delta: float) -> float:
    """The epsilon of mu-GDP at ``delta`` (0 for mu <= 0 or where delta(0) <= delta)."""
    if mu <= 0 or gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 2.0
    while gdp_delta(high, mu) > delta:
        high *= 2
    return float(brentq(lambda e: gdp_delta(e, mu) - delta, 0.0, high))


def gaussian_estimate(scores_in: np.ndarray, scores_out: np.ndarray, delta: float) -> float:
    """The estimate after Andrew et al.: normals fitted to the in and out canaries' scores, with one
    shared variance (the mechanism's noise is the same for both), so the pair is mu-GDP with mu =
    (mean in - mean out) / pooled std; its epsilon at ``delta`` (capped at ``ESTIMATE_CAP``).
    With a variance fitted to each side, the variances' sampling error alone moved the estimate of
    a mu = 1.56 mechanism (7.39 exactly) over 7.1-10.2 (5th-95th percentile, 1,000 canaries);
    shared: 6.6-8.2."""
    spread = math.sqrt((float(np.var(scores_in)) + float(np.var(scores_out))) / 2)
    gap = float(np.mean(scores_in) - np.mean(scores_out))
    if spread <= 1e-12 * max(abs(gap), 1e-300):
        return ESTIMATE_CAP if gap > 0 else 0.0
    return min(gdp_epsilon(gap / spread, delta), ESTIMATE_CAP)


def one_run_figures(scores: np.ndarray, member: np.ndarray, delta: float) -> dict:
    """The bound and the estimate of one run's canaries, with their counts."""
    return {**one_run_bound(scores, member, delta),
            "epsilon_estimate": gaussian_estimate(scores[member], scores[~member], delta),
            "one_run_canaries": int(len(scores)), "one_run_in": int(member.sum())}


def _with_update_sums(job: Path) -> None:
    """Name the server's update sums (``dpseg.updatesums.UpdateSums``) in the job copy's server config."""
    from dpseg.jobs import SERVER_CONFIG

    path = job / SERVER_CONFIG
    config = json.loads(path.read_text())
    config["components"].append({"id": "update_sums", "path": "dpseg.updatesums.UpdateSums", "args": {}})
    path.write_text(json.dumps(config, indent=1) + "\n")


def audit_job(work: Path, job: Path, sites: list[str], canaries: int, canary_seed: int, rounds: int | None,
              client_args: dict | None) -> Path:
    """The audit copy of ``job`` in ``work/job``: canaries at every site, the server's update sums."""
    from dpseg.jobs import configure_job

    server = {"min_clients": len(sites), **({"num_rounds": rounds} if rounds else {})}
    copy = configure_job(job, work / "job", server, client_args or {},
                         learner_args={"canaries": canaries, "canary_seed": canary_seed})
    _with_update_sums(copy)
    return copy


def site_scores(sums: dict[str, np.ndarray], canaries: int, canary_seed: int, site: str,
                train_layers: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, membership) of one site's canaries against its summed updates ``sums``: the cosine
    of each canary's direction with minus the sum, since an update is a weight difference (minus
    the learning rate times the noised gradients) and a canary's gradient pushes it along -u."""
    from dpseg.bundle import Bundle
    from dpseg.canaries import CanarySet, trained_parameters
    from dpseg.dptrain import set_trained_layers

    network = Bundle().network()
    set_trained_layers(network, train_layers)
    named = trained_parameters(network)
    missing = [n for n, _ in named if n not in sums]
    if missing:
        raise KeyError(f"{site}: the update sums lack trained parameters {missing[:3]}")
    flat = torch.cat([torch.as_tensor(sums[n]).reshape(-1) for n, _ in named])
    canary_set = CanarySet(canaries, canary_seed, site, [p.numel() for _, p in named])
    return canary_set.scores(-flat), canary_set.member


def fl_one_run(out: Path, work: Path, cohort: Path, job: Path, canaries: int = 1000, canary_seed: int | None = None,
               rounds: int | None = None, client_args: dict | None = None, progress=print) -> dict:
    """The one-run audit inside a real job: ``job`` (a DP job folder) copied with ``canaries``
    canaries per site and run in the NVFlare simulator on ``cohort`` (site-*/datalist.json); each
    site's canaries scored against the sum of the updates the server received from it. Writes
    ``out/privacy_audit_fl.json`` and ``.md``; returns the results."""
    import secrets

    from dpseg.jobs import CLIENT_CONFIG, SERVER_CONFIG, site_ledgers
    from dpseg.tools.simulation import run_simulator

    sites = sorted(p.parent.name for p in Path(cohort).glob("site-*/datalist.json"))
    if not sites:
        raise FileNotFoundError(f"no site-*/datalist.json under {cohort}")
    client = {**json.loads((job / CLIENT_CONFIG).read_text()), **(client_args or {})}
    if not client.get("dp"):
        raise ValueError(f"{job}: the one-run audit audits a DP job (dp is not true)")
    seed = secrets.randbelow(2 ** 31) if canary_seed is None else canary_seed  # recorded in the results
    work.mkdir(parents=True, exist_ok=True)
    copy = audit_job(work, job, sites, canaries, seed, rounds, client_args)
    total_rounds = json.loads((copy / SERVER_CONFIG).read_text())["num_rounds"]
    env = {"DPSEG_DATA_ROOT": str(Path(cohort).resolve()),
           "DPSEG_LEDGER": site_ledgers(work / "ledgers", sites, total_epsilon=2 * client["target_epsilon"])}
    log = work / "simulator.log"
    progress(f"one-run audit: {job.name} with {canaries} canaries per site ({', '.join(sites)}), {total_rounds} rounds "
             f"in the simulator; log {log}")
    started = time.perf_counter()
    result = run_simulator(copy, work / "ws", env, sites, log=log, timeout=4 * 3600)
    if result.returncode != 0:
        raise RuntimeError(f"the audit job failed; see {log}")
    return fl_results(out, work, job.name, client, canaries, seed, total_rounds, time.perf_counter() - started,
                      progress)


def fl_results(out: Path, work: Path, job_name: str, client: dict, canaries: int, seed: int, total_rounds: int,
               seconds: float, progress=print) -> dict:
    """Score the canaries of a finished audit run in ``work/ws`` and write the results into ``out``."""
    from dpseg.updatesums import load_update_sums
    from dpseg.wire import UPDATE_SUMS_FILE

    sums = load_update_sums(next((work / "ws" / "server").rglob(UPDATE_SUMS_FILE)))
    sites = sorted(sums)
    per_site, all_scores, all_member = {}, [], []
    for site in sites:
        rounds_summed, site_sums = sums[site]
        scores, member = site_scores(site_sums, canaries, seed, site, client.get("train_layers", "all"))
        per_site[site] = {"rounds": rounds_summed, **one_run_figures(scores, member, client["delta"])}
        all_scores.append(scores)
        all_member.append(member)
    pooled = one_run_figures(np.concatenate(all_scores), np.concatenate(all_member), client["delta"])
    results = {"claimed_epsilon": client["target_epsilon"], "delta": client["delta"], "job": job_name,
               "rounds": total_rounds, "canaries_per_site": canaries, "canary_seed": seed, "confidence": CONFIDENCE,
               "sites": per_site, "pooled": pooled, "seconds": seconds,
               "caught": pooled["epsilon_lower_bound_one_run"] > client["target_epsilon"],
               "estimate_above_claim": pooled["epsilon_estimate"] > client["target_epsilon"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "privacy_audit_fl.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "privacy_audit_fl.md").write_text(fl_markdown(results))
    progress(f"one-run audit: lower bound {pooled['epsilon_lower_bound_one_run']:.2f}, estimate "
             f"{pooled['epsilon_estimate']:.2f} (claimed {client['target_epsilon']:g}); wrote "
             f"{out / 'privacy_audit_fl.json'}")
    return results


def fl_markdown(results: dict) -> str:
    lines = ["# One-run privacy audit inside the job", "",
             f"{results['job']}, {results['rounds']} rounds in the NVFlare simulator, {results['canaries_per_site']} "
             f"canaries per site (each in by a fair coin; canary seed {results['canary_seed']}); each canary scored by "
             "the cosine of its direction with the sum of its site's updates as the server received them. Claimed: "
             f"epsilon {results['claimed_epsilon']:g} at delta {results['delta']:g}. Lower bound (Steinke et al.) at "
             "95%; estimate after Andrew et al. (Gaussian, shared variance; an estimate, not a bound). One run "
             "cannot confirm a large epsilon: it catches gross bugs end to end.", "",
             "| canaries of | rounds | lower bound | guesses (correct) | estimate | canaries (in) |",
             "|---|---|---|---|---|---|"]
    rows = [(site, r) for site, r in results["sites"].items()] + [("all sites", {**results["pooled"], "rounds": "-"})]
    for name, r in rows:
        lines.append(f"| {name} | {r['rounds']} | {r['epsilon_lower_bound_one_run']:.2f} | {r['guesses']} "
                     f"({r['correct']}) | {r['epsilon_estimate']:.2f} | {r['one_run_canaries']} ({r['one_run_in']}) |")
    lines += ["", f"Caught (bound above the claim): {'yes' if results['caught'] else 'no'}; estimate above the claim: "
              f"{'yes' if results['estimate_above_claim'] else 'no'}; {results['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)
