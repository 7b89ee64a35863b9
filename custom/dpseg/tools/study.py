"""The privacy-utility study: what DP costs (Dice) and what it buys (less leakage), one command.

For every seed of the grid, on one synthetic cohort (or the sites' own datalists), it trains in
the real NVFlare simulator:

- ``local site-k``: site k alone (no DP), one simulated client;
- ``pooled``: every site's training patients in one client (centralised, no DP);
- ``FL``: federated, no DP (``jobs/fed``);
- ``FL+DP eps e``: federated with patient-level DP at each epsilon of the grid (``jobs/fed_dp``),

and scores each best global model on every site's test patients (whole volumes, mean Dice per
site, then the mean over sites). Then the auditor (``jobs/fed_dp_audit``) attacks intercepted
updates with DP off and at each epsilon; the study reads the audit results where the sites kept
them (``run_audit``), since it plays every site. It writes ``results.md`` (or ``results_<grid>.md``),
``study_<grid>.json`` and figures. Seeds change the initial global model and, without DP, the
slice draws; DP noise is fresh in every run.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dpseg.files import write_whole
from dpseg.jobs import JOBS_DIR, configure_job, site_ledgers
from dpseg.tools.simulation import run_simulator


@dataclass
class Grid:
    """Study settings. patients: per site of the synthetic cohort (cohort seed 0); rounds x
    local_epochs of local training per round (the local and pooled arms), Poisson batch_size; the
    federated arms' public sample_rate and local_steps per round (FL and FL+DP alike; batch_size is
    the expected batch the update is divided by); epsilons of the DP arms (delta 1e-5, patient level); seeds; audit:
    rounds audited, attack iterations x restarts; random_start_epsilon: the epsilon of an extra FL+DP
    arm from a random network instead of the bundle's public weights (None: no such arm);
    ablation_epsilon: the epsilon of the ablation arms (``ABLATIONS``: each technique the shipped DP
    job leaves off, turned on alone), trained for the first seed only (None: no ablation)."""

    name: str
    patients: list[int]
    rounds: int
    local_epochs: float
    batch_size: int
    sample_rate: float
    local_steps: int
    epsilons: list[float]
    seeds: list[int]
    audit_rounds: int
    attack_iterations: int
    attack_restarts: int
    attack_refine_iterations: int
    # planning estimates (measured on the 2-core CPU machine): minutes per training run, for every
    # arm kind or per kind (public / local / pooled / fed / fed_dp), and per audit; not part of the settings
    minutes_per_run: float | dict[str, float]
    minutes_per_audit: float
    # the epsilon of the FL+DP arm that starts from a random network (the old start), None for none
    random_start_epsilon: float | None = None
    # the epsilon of the ablation arms (first seed only), None for none
    ablation_epsilon: float | None = None
    # the canary audit of the DP step (dpseg.tools.privacyaudit) at each epsilon: runs x canaries per
    # variant (0 runs: none), and its planning estimate in minutes per epsilon
    privacy_audit_runs: int = 0
    privacy_audit_canaries: int = 400
    minutes_per_privacy_audit: float = 10.0

    def settings(self, audit: bool = True) -> dict:
        """What the results depend on: every field but the planning estimates; a training run's
        (``audit`` False) not on the audit's fields either."""
        planning = ("minutes_per_run", "minutes_per_audit", "minutes_per_privacy_audit")
        audit_only = ("audit_rounds", "attack_iterations", "attack_restarts", "attack_refine_iterations",
                      "privacy_audit_runs", "privacy_audit_canaries")
        return {k: v for k, v in asdict(self).items() if k not in planning and (audit or k not in audit_only)}

    def recorded(self, grid: dict, audit: bool = True) -> bool:
        """Whether ``grid`` (a grid as results record it) has this grid's ``settings(audit)``."""
        settings = self.settings(audit)
        return {k: v for k, v in grid.items() if k in settings} == settings

    def attack(self) -> dict:
        """The attack the audits run: the audit job's defaults with this grid's iterations,
        restarts and refinement iterations."""
        from dpseg.jobs import job_attack

        return {**job_attack(), "iterations": self.attack_iterations, "restarts": self.attack_restarts,
                "refine_iterations": self.attack_refine_iterations}

    def run_minutes(self, kind: str, slices_per_patient: int = 1) -> float:
        """Planned minutes of one training run of ``kind`` (a DP run with K slices per patient: K
        times as long, an upper bound)."""
        m = self.minutes_per_run
        return float(m.get(kind, max(m.values())) if isinstance(m, dict) else m) * slices_per_patient


STUDY_LEDGER_EPSILON = 1000.0  # each run's own ledgers: no run of the study is refused for budget

GRIDS = {
    "quick": Grid("quick", [16, 16, 16], rounds=4, local_epochs=3.0, batch_size=4, sample_rate=0.35, local_steps=9,
                  epsilons=[8.0, 3.0, 1.0],
                  seeds=[0], audit_rounds=2, attack_iterations=100, attack_restarts=1, attack_refine_iterations=50,
                  minutes_per_run=1.0, minutes_per_audit=3.0, random_start_epsilon=8.0, privacy_audit_runs=5,
                  privacy_audit_canaries=200, minutes_per_privacy_audit=1.0),
    "full": Grid("full", [60, 90, 120], rounds=10, local_epochs=6.0, batch_size=16, sample_rate=0.25, local_steps=24,
                 epsilons=[8.0, 3.0, 1.0],
                 seeds=[0, 1, 2], audit_rounds=2, attack_iterations=300, attack_restarts=1, attack_refine_iterations=200,
                 minutes_per_run={"public": 1.0, "local": 2.5, "pooled": 6.5, "fed": 5.0, "fed_dp": 5.5}, minutes_per_audit=6.5,
                 random_start_epsilon=8.0, ablation_epsilon=8.0, privacy_audit_runs=50, privacy_audit_canaries=400),
}


ARM_KINDS = ("public", "local", "pooled", "fed", "fed_dp")


@dataclass
class Arm:
    """One training configuration: kind is one of ARM_KINDS ("public": the bundle's shipped model,
    trained on the public cohort only, with no site training); start: the first global model,
    "bundle" (the shipped weights) or "random" (a network initialised from the run's seed); the
    DP arms' techniques: slices_per_patient, train_layers (the site learner's arguments) and the
    server's average_decay (the shipped job's values by default)."""

    kind: str
    site: str = ""
    epsilon: float | None = None
    start: str = "bundle"
    slices_per_patient: int = 1
    train_layers: str = "all"
    average_decay: float = 0.0

    @property
    def ablation(self) -> str:
        """What this arm changes in the shipped DP job ("" for nothing)."""
        return ", ".join(([f"{self.slices_per_patient} slices per patient"] if self.slices_per_patient != 1 else [])
                         + ([f"{self.train_layers} layers only"] if self.train_layers != "all" else [])
                         + ([f"averaged (decay {self.average_decay:g})"] if self.average_decay else []))

    @property
    def name(self) -> str:
        if self.kind == "fed_dp":
            return f"FL+DP eps {self.epsilon:g}" + (" (random start)" if self.start == "random" else "") + \
                (f", {self.ablation}" if self.ablation else "")
        return {"public": "public model alone", "local": f"local {self.site}", "pooled": "pooled",
                "fed": "FL"}[self.kind]

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() or c in "._-" else "_" for c in self.name.replace("+", "_")
                       .replace("(", "").replace(")", "").replace(",", ""))


# the ablation arms: each technique the shipped DP job leaves off, on alone (the random start is its own arm)
ABLATIONS = ({"slices_per_patient": 4}, {"train_layers": "decoder"}, {"average_decay": 0.8})


@dataclass
class Study:
    """Where the study runs: cohort root (site-k/datalist.json, datalist.json pooled), the work
    folder (jobs, workspaces, logs) and the output folder (results, figures)."""

    grid: Grid
    cohort: Path
    work: Path
    out: Path
    sites: list[str] = field(default_factory=list)
    progress: callable = print
    cohort_note: str = "synthetic cohort (dpseg synth, seed 0)"

    def __post_init__(self):
        # absolute: the simulator's processes run in other folders (a relative cohort would not be found)
        self.cohort, self.work, self.out = (Path(p).resolve() for p in (self.cohort, self.work, self.out))
        if not self.sites:
            self.sites = sorted(p.parent.name for p in self.cohort.glob("site-*/datalist.json"))
        if not self.sites:
            raise FileNotFoundError(f"no site-*/datalist.json under {self.cohort}")

    def arms(self, seed: int | None = None) -> list[Arm]:
        """The arms trained for ``seed`` (the ablation arms for the grid's first seed only)."""
        g = self.grid
        ablation = [Arm("fed_dp", epsilon=g.ablation_epsilon, **a) for a in ABLATIONS] \
            if g.ablation_epsilon and seed == g.seeds[0] else []
        return [Arm("public")] + [Arm("local", site=s) for s in self.sites] + [Arm("pooled"), Arm("fed")] + \
            [Arm("fed_dp", epsilon=e) for e in g.epsilons] + \
            ([Arm("fed_dp", epsilon=e, start="random")] if (e := g.random_start_epsilon) else []) + ablation

    def env(self, run: Path, clients: list[str], datalist: Path | None = None) -> dict:
        """The simulated sites' settings for one run: the cohort, and a new privacy ledger per site
        in ``run/ledgers/`` (totals large enough for any run of the study: its budget is not
        what the study measures)."""
        ledgers = site_ledgers(run / "ledgers", clients, total_epsilon=STUDY_LEDGER_EPSILON)
        env = {"DPSEG_DATA_ROOT": str(self.cohort), "DPSEG_LEDGER": ledgers}
        if datalist:
            env["DPSEG_DATALIST"] = str(datalist)
        return env


RESULT = "result.json"


def kept_result(run: Path, grid: Grid, audit: bool = False) -> dict | None:
    """The result kept in ``run/result.json`` by an earlier invocation with the same settings (of
    a training run, or with ``audit`` of an audit), or None where there is none. A result of other
    settings is an error: the work folder belongs to that grid."""
    path = run / RESULT
    if not path.exists():
        return None
    kept = json.loads(path.read_text())
    if not grid.recorded(kept.get("grid", {}), audit):
        raise ValueError(f"{path} was written with other study settings ({kept.get('grid')}); use another "
                         f"--work folder or remove {run}")
    if audit and "summary" in kept["result"] and (ran := kept["result"]["summary"].get("attack")) != (now := grid.attack()):
        raise ValueError(f"{path} is an audit with another attack ({ran}) than the audit job's now "
                         f"({now}); use another --work folder or remove {run}")
    return kept["result"]


def finished(run: Path, grid: Grid, audit: bool = False) -> dict | None:
    """``kept_result``, or None after emptying ``run`` (an unfinished run starts again from nothing)."""
    result = kept_result(run, grid, audit)
    if result is not None:
        return result
    if run.exists():
        shutil.rmtree(run)
    run.mkdir(parents=True)
    return None


def keep(run: Path, grid: Grid, result: dict) -> dict:
    """Write ``result`` with the grid and the time it finished to ``run/result.json``; returns it."""
    result = {**result, "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    text = json.dumps({"grid": asdict(grid), "result": result}, indent=1) + "\n"
    write_whole(run / RESULT, lambda tmp: tmp.write_text(text))
    return result


def simulate_complete(study: Study, job: Path, run: Path, env: dict, clients: list[str]) -> tuple[Path, float]:
    """Run ``job`` in the simulator in ``run/ws``; returns (workspace, wall seconds). A run with a
    round that lacks a client's contribution (a site that timed out or died; ``run_simulator``
    already starts again a run whose workers the simulator mixed up) is run once more in a fresh
    workspace, and the second run's result is kept."""
    from dpseg.wire import ROUNDS_FILE

    for attempt in (1, 2):
        ws, log = (run / "ws", run / "simulator.log") if attempt == 1 else (run / "ws_rerun", run / "simulator_rerun.log")
        start = time.perf_counter()
        result = run_simulator(job, ws, env, clients, log=log)
        wall = time.perf_counter() - start
        if result.returncode != 0:
            raise RuntimeError(f"{run.name}: the simulator failed; see {log}")
        rounds = json.loads(next((ws / "server").rglob(ROUNDS_FILE)).read_text())
        missing = {r["round"]: sorted(set(clients) - set(r["sites"])) for r in rounds if set(clients) - set(r["sites"])}
        if not missing:
            return ws, wall
        study.progress(f"  {run.name}: rounds without a site's contribution {missing}; "
                       + ("running it once more" if attempt == 1 else "keeping this result"))
    return ws, wall


def arm_folder(study: Study, arm: Arm, seed: int) -> Path:
    """The work folder of one training run (job, workspace, log, kept result)."""
    return study.work / f"seed{seed}" / arm.slug


def train_arm(study: Study, arm: Arm, seed: int) -> dict:
    """Train one arm in the simulator and score its best global model on every site's test split."""
    from dpseg.report import build_report
    from dpseg.wire import PrivacyMeta

    g = study.grid
    run = arm_folder(study, arm, seed)
    if (done := finished(run, g)) is not None:
        return done
    started = time.perf_counter()
    if arm.kind == "public":
        return keep(run, g, public_result(study, arm, seed, started))
    clients = {"local": [arm.site], "pooled": ["pooled"]}.get(arm.kind, study.sites)
    learner = {"seed": seed}
    if arm.kind in ("fed", "fed_dp"):  # FL and FL+DP differ only in DP: the same public sampling
        client = {"batch_size": g.batch_size, "sample_rate": g.sample_rate, "local_steps": g.local_steps}
    else:  # one site or the pool alone: epochs of its own patients (nothing is shared)
        client = {"batch_size": g.batch_size, "sample_rate": 0.0, "local_steps": 0}
        learner["local_epochs"] = g.local_epochs
    server = {"num_rounds": g.rounds, "min_clients": len(clients)}
    if arm.kind == "fed_dp":
        client.update(target_epsilon=arm.epsilon, slices_per_patient=arm.slices_per_patient,
                      train_layers=arm.train_layers)
        server.update(target_epsilon=arm.epsilon, average_decay=arm.average_decay)
    job = configure_job(JOBS_DIR / ("fed_dp" if arm.kind == "fed_dp" else "fed"), run / "job", server, client,
                        persistor_args={"seed": seed, "initial_model": arm.start}, learner_args=learner)
    pooled = study.cohort / "datalist.json" if arm.kind == "pooled" else None
    ws, wall = simulate_complete(study, job, run, study.env(run, clients, pooled), clients)
    report = build_report(ws)
    if report["best_model_bundle"]:  # with averaging, the job's bundle is the average of its global models
        model, which = Path(report["best_model_bundle"]) / "models" / "model.pt", "average" if arm.average_decay else "best"
    else:  # no best model is chosen in a one-round job (round 0's validation is of the initial model)
        model, which = next((ws / "server").rglob("FL_global_model.pt"), None), "final"
        if model is None:
            raise RuntimeError(f"{arm.name}, seed {seed}: no global model in {ws}")
    dice = score_model(model, study)
    metas = [PrivacyMeta.from_dict(s["privacy"]) for s in report["sites"].values() if s.get("privacy")]
    eps = [m.epsilon for m in metas if m.dp]
    return keep(run, g, {
        "arm": arm.name, "kind": arm.kind, "epsilon": arm.epsilon, "start": arm.start, "ablation": arm.ablation,
        "seed": seed, "model": which,
        "wall_seconds": wall,
        "train_seconds": sum(s.get("train_seconds") or 0 for s in report["sites"].values()),
        "epsilon_spent": max(eps) if eps else None, "dice_per_site": dice,
        "mean_dice": float(np.mean(list(dice.values()))), "elapsed_seconds": time.perf_counter() - started})


def public_result(study: Study, arm: Arm, seed: int, started: float) -> dict:
    """The bundle's shipped model (trained on the public cohort alone), scored like a trained arm."""
    from dpseg.bundle import Bundle

    dice = score_model(Bundle().model_path(), study)
    return {"arm": arm.name, "kind": arm.kind, "epsilon": None, "start": "bundle", "seed": seed, "model": "bundle",
            "wall_seconds": 0.0,
            "train_seconds": 0.0, "epsilon_spent": None, "dice_per_site": dice,
            "mean_dice": float(np.mean(list(dice.values()))), "elapsed_seconds": time.perf_counter() - started}


def score_model(model_file: Path, study: Study) -> dict[str, float]:
    """Mean test Dice of a state dict (or an NVFlare checkpoint) on each site's test patients
    (whole volumes)."""
    import torch

    from dpseg.bundle import Bundle
    from dpseg.evaluate import evaluate

    bundle = Bundle()
    network = bundle.network()
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state), strict=True)  # NVFlare's checkpoints wrap it in "model"
    network.eval()
    return {s: evaluate(study.cohort / s / "datalist.json", bundle, network, "test")["mean_dice"] for s in study.sites}


def audit_folder(study: Study, epsilon: float | None) -> Path:
    """Where the audit with DP off (None) or at ``epsilon`` runs and keeps its result."""
    return study.work / "audit" / ("no_DP" if epsilon is None else f"eps_{epsilon:g}")


def audit_level(study: Study, epsilon: float | None) -> dict:
    """The canonical audit (batch 1, one SGD step per round) with DP off (None) or at ``epsilon``,
    on the first two sites; returns the summary of the results the sites kept
    (``dpseg.report.summarize_audit``) and where the reconstructions are."""
    g = study.grid
    run = audit_folder(study, epsilon)
    if (done := finished(run, g, audit=True)) is None:
        done = run_audit(study, epsilon, run)
    # example folders are kept relative to the run folder, so a moved work folder still has them
    return {**done, "examples": [str(run / e) for e in done["examples"]]}


def run_audit(study: Study, epsilon: float | None, run: Path) -> dict:
    """``audit_level``'s audit job in ``run`` (an empty folder); returns the result it keeps.

    The audit's results are read where the sites kept them (``dpseg.auditresults``: each site's
    ``dpseg_audit/<job id>/audit_results.json`` in the simulator workspace), not from the server:
    the study plays every site itself, so it may read what each site keeps, and it needs the
    per-update scores and ranks that a site never sends. So nothing is released: the study's
    simulator runs set ``DPSEG_AUDIT_RELEASE`` to ``none`` (whatever the caller's environment
    says), and the server's ``dpseg_audit.json`` holds acknowledgements only.
    """
    from dpseg.auditresults import RELEASE_NONE, SITE_AUDIT_DIR, find_site_results, read_site_results
    from dpseg.report import summarize_audit
    from dpseg.site import AUDIT_PRIOR_ENV, AUDIT_RELEASE_ENV

    g = study.grid
    started = time.perf_counter()
    server = {"num_rounds": g.audit_rounds, "attack_iterations": g.attack_iterations,
              "attack_restarts": g.attack_restarts, "attack_refine_iterations": g.attack_refine_iterations,
              "dp": epsilon is not None}
    client = {"dp": epsilon is not None, "sampling": "poisson" if epsilon is not None else "fixed"}
    if epsilon is not None:
        server["target_epsilon"] = client["target_epsilon"] = epsilon
    job = configure_job(JOBS_DIR / "fed_dp_audit", run / "job", server, client)
    clients = study.sites[:2]
    env = {**study.env(run, clients), AUDIT_RELEASE_ENV: RELEASE_NONE, AUDIT_PRIOR_ENV: str(prior_folder(study))}
    ws, wall = simulate_complete(study, job, run, env, clients)
    kept = find_site_results(ws)
    if not kept:
        raise RuntimeError(f"{run.name}: no site kept audit results in {ws}; see the simulator log in {run}")
    audit = summarize_audit(read_site_results(kept))
    folders = sorted(ws.glob(f"site-*/{SITE_AUDIT_DIR}/*/round*"))
    return keep(run, g, {"level": "no DP" if epsilon is None else f"eps {epsilon:g}", "epsilon": epsilon,
                         "wall_seconds": wall, "summary": audit, "elapsed_seconds": time.perf_counter() - started,
                         "examples": [str(f.relative_to(run)) for f in folders if (f / "reconstruction.npy").exists()]})


def privacy_audit_folder(study: Study, epsilon: float) -> Path:
    """Where the canary audit of the DP step at ``epsilon`` runs and keeps its result."""
    return study.work / "privacy_audit" / f"eps_{epsilon:g}"


def privacy_audit_level(study: Study, epsilon: float) -> dict:
    """The canary audit of the site's DP step (``dpseg.tools.privacyaudit``) with the grid's FL+DP
    settings at ``epsilon``: every variant's lower bounds (kept in its folder, with its page and figure)."""
    from dpseg.tools.privacyaudit import job_mechanism, privacy_audit

    g = study.grid
    run = privacy_audit_folder(study, epsilon)
    if (done := finished(run, g, audit=True)) is not None:
        return done
    started = time.perf_counter()
    mechanism = job_mechanism(epsilon=epsilon, rounds=g.rounds, local_steps=g.local_steps,
                              sample_rate=g.sample_rate, batch_size=g.batch_size)
    result = privacy_audit(run, mechanism, runs=g.privacy_audit_runs, canaries=g.privacy_audit_canaries,
                           progress=study.progress)
    return keep(run, g, {"epsilon": epsilon, **result, "elapsed_seconds": time.perf_counter() - started,
                         "wall_seconds": time.perf_counter() - started})


def prior_folder(study: Study) -> Path:
    """Where every audit of the study keeps the attacker's public prior (built once, public images only)."""
    return study.work / "audit_prior"


def build_prior(study: Study) -> None:
    """Build the audits' attacker prior once, here, before the audits (their sites then load it
    instead of each building it: about a minute each)."""
    from dpseg.bundle import Bundle
    from dpseg.prior import synthetic_prior

    attack = study.grid.attack()
    if attack.get("prior") == "synthetic":
        synthetic_prior(prior_folder(study), Bundle().volume_transforms(), attack["prior_components"],
                        progress=study.progress)


def summarize(runs: list[dict]) -> list[dict]:
    """Per arm: mean and spread (sample standard deviation; min, max) of the mean Dice over seeds,
    per-site means, and the median wall time."""
    rows = []
    for arm in dict.fromkeys(r["arm"] for r in runs):
        rs = [r for r in runs if r["arm"] == arm]
        dice = [r["mean_dice"] for r in rs]
        rows.append({"arm": arm, "kind": rs[0]["kind"], "epsilon": rs[0]["epsilon"], "start": rs[0].get("start", "bundle"),
                     "ablation": rs[0].get("ablation", ""),
                     "seeds": len(rs),
                     "mean_dice": statistics.mean(dice), "sd_dice": statistics.stdev(dice) if len(dice) > 1 else None,
                     "min_dice": min(dice), "max_dice": max(dice),
                     "dice_per_site": {s: statistics.mean(r["dice_per_site"][s] for r in rs) for s in rs[0]["dice_per_site"]},
                     "wall_seconds": statistics.median(r["wall_seconds"] for r in rs),
                     "epsilon_spent": max((r["epsilon_spent"] for r in rs if r["epsilon_spent"] is not None), default=None)})
    return rows


def machine() -> str:
    """CPU model, cores and memory of this machine (no host name, no paths)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU") \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.machine()}, no GPU used"


def published(study: Study) -> dict | None:
    """The study's results in its out folder (``study_<grid>.json``), or None where there are none."""
    path = study.out / f"study_{study.grid.name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def same_training(study: Study, results: dict) -> bool:
    """Whether published ``results`` were trained with this grid's training settings on this cohort."""
    return study.grid.recorded(results.get("grid", {}), audit=False) and results.get("cohort") == study.cohort_note


def published_runs(study: Study) -> list[dict]:
    """The training runs of the study's results in its out folder (``study_<grid>.json``), checked
    to have this grid's training settings and cohort."""
    path = study.out / f"study_{study.grid.name}.json"
    results = published(study)
    if results is None:
        raise FileNotFoundError(f"{path} is missing: the audits alone can only be rerun for a study whose "
                                "results are there")
    if not same_training(study, results):
        raise ValueError(f"{path} holds a study of other training settings or another cohort "
                         f"({results.get('grid')}, {results.get('cohort')}); its runs cannot be kept")
    return results["runs"]


def kept_published(study: Study) -> dict[tuple[str, int], dict]:
    """The training runs already in the out folder's results, by (arm, seed), where those results
    have this grid's training settings and cohort (a study stopped part-way, perhaps on another
    machine, goes on from them without its work folder); none otherwise (the results of other
    settings are replaced when this study writes its own)."""
    results = published(study)
    if results is None:
        return {}
    if not same_training(study, results):
        study.progress(f"{study.out / f'study_{study.grid.name}.json'} holds a study of other training settings "
                       "or another cohort: none of its runs is kept, and this study's results replace it")
        return {}
    return {(r["arm"], r["seed"]): r for r in results["runs"]}


def run_study(study: Study, only: set[str] | None = None, audit: bool = True, audits_only: bool = False) -> dict:
    """Run the grid (arms whose kind is in ``only``, all by default), then the audits; writes the
    results after every run and audit (marked incomplete until the last) and returns them.

    A training run is kept, not trained again, where the work folder holds its result or the out
    folder's results (``kept_published``) hold it. ``audits_only``: train nothing; the training runs
    are those of the results already in the out folder (``published_runs``), the audits are run (or
    kept) anew."""
    g = study.grid
    if audits_only and not audit:
        raise ValueError("audits_only with audit off leaves nothing to run")
    from_out = published_runs(study) if audits_only else []
    # every seed's headline arms first, then the ablation (its arms compare with seed 0's shipped job)
    plan = sorted(((arm, seed) for seed in g.seeds for arm in study.arms(seed) if (not only or arm.kind in only)
                   and not audits_only), key=lambda p: bool(p[0].ablation))
    levels = [None] + list(g.epsilons) if audit else []
    planned = [g.run_minutes(arm.kind, arm.slices_per_patient) for arm, _ in plan]
    # every kept result is checked before anything starts: one of other settings stops the study here
    kept_work = [kept_result(arm_folder(study, arm, seed), g) for arm, seed in plan]
    out_runs = kept_published(study) if plan else {}
    kept_runs = [w if w is not None else out_runs.get((arm.name, seed)) for w, (arm, seed) in zip(kept_work, plan)]
    kept_audits = [kept_result(audit_folder(study, level), g, audit=True) is not None for level in levels]
    canary_levels = list(g.epsilons) if audit and g.privacy_audit_runs else []
    kept_canaries = [kept_result(privacy_audit_folder(study, e), g, audit=True) is not None for e in canary_levels]
    estimate = sum(m for m, k in zip(planned, kept_runs) if k is None) + kept_audits.count(False) * g.minutes_per_audit \
        + kept_canaries.count(False) * g.minutes_per_privacy_audit
    if audits_only:
        what = (f"the {len(levels)} audits alone, {sum(kept_audits)} kept from earlier (training runs: the "
                f"{len(from_out)} of {study.out / f'study_{g.name}.json'})")
    else:
        kept = sum(k is not None for k in kept_runs)
        kept_note = f", {kept} runs and {sum(kept_audits)} audits kept from earlier" if kept or any(kept_audits) else ""
        what = f"{len(plan)} training runs and {len(levels)} audits" + \
            (f" (and {len(canary_levels)} canary audits of the DP step)" if canary_levels else "") + kept_note
    study.progress(f"study '{g.name}': {what}; estimated {estimate:.0f} min to go on a 2-core CPU "
                   f"(work folder {study.work})")
    runs, audits, canaries, new_minutes, new_planned = list(from_out), [], [], 0.0, 0.0
    planned_count = (len(runs) + len(plan), len(levels), len(canary_levels))
    for n, (arm, seed) in enumerate(plan, 1):
        if kept_runs[n - 1] is not None:
            runs.append(kept_runs[n - 1])
            study.progress(f"[{n}/{len(plan)}] {arm.name}, seed {seed}: finished earlier ({runs[-1]['finished']}), "
                           f"mean test Dice {runs[-1]['mean_dice']:.3f}; kept")
            continue
        study.progress(f"[{n}/{len(plan)}] {arm.name}, seed {seed} ...")
        started = time.perf_counter()
        runs.append(train_arm(study, arm, seed))
        r = runs[-1]
        new_minutes, new_planned = new_minutes + (time.perf_counter() - started) / 60, new_planned + planned[n - 1]
        left = sum(p for p, k in zip(planned[n:], kept_runs[n:]) if k is None) * new_minutes / new_planned \
            + kept_audits.count(False) * g.minutes_per_audit
        study.progress(f"[{n}/{len(plan)}] {arm.name}, seed {seed}: mean test Dice {r['mean_dice']:.3f} in "
                       f"{r['wall_seconds']:.0f} s; about {left:.0f} min left")
        write_results(study, collect(study, runs, audits, planned_count))
    for epsilon in canary_levels:
        canaries.append(privacy_audit_level(study, epsilon))
        write_results(study, collect(study, runs, audits, planned_count, canaries))
    if not all(kept_audits):
        build_prior(study)
    for level in levels:
        study.progress(f"audit {'no DP' if level is None else f'eps {level:g}'} ...")
        audits.append(audit_level(study, level))
        m = audits[-1]["summary"].get("mean", {})
        study.progress(f"audit {audits[-1]['level']}: SSIM {m.get('ssim', float('nan')):.3f} "
                       f"(baseline {m.get('baseline_ssim', float('nan')):.3f}), identified "
                       f"{m.get('identified', float('nan')):.2f}, {audits[-1]['wall_seconds']:.0f} s")
        if len(audits) < len(levels):
            write_results(study, collect(study, runs, audits, planned_count, canaries))
    results = collect(study, runs, audits, planned_count, canaries)
    write_results(study, results)
    return results


def collect(study: Study, runs: list[dict], audits: list[dict], planned: tuple[int, int, int],
            canaries: list[dict] | None = None) -> dict:
    """The study's results from the ``runs``, ``audits`` and canary audits (``canaries``) done so far
    of the ``planned`` (training runs, audits, canary audits); ``complete`` once all are done."""
    canaries = canaries or []
    done = sorted(r["finished"] for r in runs + audits + canaries)
    return {"grid": asdict(study.grid), "cohort": study.cohort_note,
            "complete": (len(runs), len(audits), len(canaries)) == planned,
            "planned": {"runs": planned[0], "audits": planned[1], "privacy_audits": planned[2]},
            "date": (done[0] if done[0] == done[-1] else f"{done[0]} to {done[-1]}") if done else "",
            "machine": machine(), "sites": study.sites,
            "total_minutes": sum(r.get("elapsed_seconds", r["wall_seconds"]) for r in runs + audits + canaries) / 60,
            "runs": runs, "summary": summarize(runs), "audits": audits, "privacy_audits": canaries}


NOTES_HEADING = "## Notes kept by hand"


def kept_notes(md: Path) -> str:
    """The part of a results page that the study does not write: from ``NOTES_HEADING`` to the end
    ("" where the page or the heading is missing)."""
    text = md.read_text() if md.exists() else ""
    return "\n" + text[text.index(NOTES_HEADING):] if NOTES_HEADING in text else ""


def write_results(study: Study, results: dict) -> Path:
    """``study_<grid>.json`` (example folders relative to the work folder), the figures and
    ``results.md`` (full grid) or ``results_<grid>.md``, whose notes kept by hand (``kept_notes``)
    stay as they are."""
    from dpseg.tools.studyreport import write_figures, write_markdown

    study.out.mkdir(parents=True, exist_ok=True)
    name = results["grid"]["name"]
    figures = write_figures(results, study.out / "figures")
    shareable = {**results, "audits": [{**a, "examples": [str(Path(e).relative_to(study.work)) for e in a["examples"]]}
                                       for a in results["audits"]]}  # no paths of this machine
    text = json.dumps(shareable, indent=1) + "\n"
    write_whole(study.out / f"study_{name}.json", lambda tmp: tmp.write_text(text))
    md = study.out / ("results.md" if name == "full" else f"results_{name}.md")
    page = write_markdown(results, {k: p.relative_to(study.out) for k, p in figures.items()}) + kept_notes(md)
    write_whole(md, lambda tmp: tmp.write_text(page))
    study.progress(f"wrote {md}" + ("" if results["complete"] else
                   f" ({len(results['runs'])} of {results['planned']['runs']} training runs, "
                   f"{len(results['audits'])} of {results['planned']['audits']} audits, "
                   f"{len(results['privacy_audits'])} of {results['planned']['privacy_audits']} canary audits so far)"))
    return md
