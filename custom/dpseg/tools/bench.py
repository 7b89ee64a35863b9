"""Benchmarks that print figures (JSON).

- ``dp_step_time``: every DP mode and the non-DP step timed in the same process on the same batch
  (the bundle's network, its loss, a batch of ``batch_size`` 128 x 128 slices), as the median of
  ``repeats`` full optimizer steps after one warm-up step. A "step" is forward, backward,
  (per-sample clipping and noise for DP) and Adam. Peak memory of each mode is measured in a fresh
  child process of its own (a process's peak RSS only grows).
- ``attack_time``: seconds of the audit job's default gradient-inversion attack on one update of
  the bundle network, and of building its public prior.
- ``fl_overhead`` and ``scaling`` (``dpseg.tools.bench --fl``): the NVFlare simulator's wall time per
  round against the local training time the sites report inside it, for 1, 2, 4 and 8 simulated
  sites with the same tiny cohort per site.
- ``demo`` (``--demo``): ``make demo``'s work timed as a whole (the default cohort written, the
  sites' ledgers, ``jobs/fed_dp`` in the simulator with 3 sites) and broken down: start-up (the
  simulator's start to the first round), per round the server's round time against the slowest
  site's training and validation (the rest is communication and waiting), the end (cross-site
  evaluation and shut-down), each site's peak RSS and the test Dice.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from opacus.optimizers import DPOptimizer

from dpseg.bundle import Bundle
from dpseg.dptrain import make_private
from dpseg.securerandom import SecureRandom
from dpseg.wire import ROUNDS_FILE

DP_MODES = ("fast", "hooks", "functorch", "ew", "ghost")  # "fast": dpseg.fastdp, the default


def _batch(bundle: Bundle, batch_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 1, *bundle.roi_size(), generator=g)
    y = (torch.rand(batch_size, 1, *bundle.roi_size(), generator=g) > 0.8).float()
    return x, y


def _step_fn(bundle: Bundle, mode: str, batch_size: int):
    """A step function for one mode: 'plain' (no DP), a dptrain.GRAD_SAMPLE_MODES mode, or Opacus' 'ew'."""
    net, loss_fn = bundle.network(), bundle.loss()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = _batch(bundle, batch_size)
    per_sample, model, criterion = None, net, loss_fn
    if mode == "ghost":
        model, opt, criterion = _ghost(net, opt, loss_fn, x, y)
    elif mode == "ew":
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=batch_size,
                          loss_reduction="mean", generator=torch.Generator().manual_seed(1))
        model = _expanded_weights(net, batch_size)
    elif mode != "plain":
        model, per_sample, opt = make_private(net, opt, mode, 1.0, 1.0, batch_size, SecureRandom())

    def step():
        opt.zero_grad(set_to_none=True)
        if per_sample is not None:
            per_sample.backward(x, y, loss_fn)
        else:
            criterion(model(x), y).backward()
        opt.step()
    return step


class PerSampleLoss(torch.nn.Module):
    """The bundle's loss with a ``reduction`` attribute, as Opacus' ghost clipping needs:
    "none" gives one loss per sample (the loss of each sample alone), "mean" their mean."""

    def __init__(self, loss_fn: torch.nn.Module):
        super().__init__()
        self.loss_fn, self.reduction = loss_fn, "mean"

    def forward(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        losses = torch.stack([self.loss_fn(out[i:i + 1], target[i:i + 1]) for i in range(out.shape[0])])
        return losses if self.reduction == "none" else losses.mean()


def _ghost(net, opt, loss_fn, x, y):
    """Opacus' ghost clipping (PrivacyEngine, grad_sample_mode="ghost") on one fixed batch."""
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(x, y), batch_size=len(x))
    model, opt, criterion, _ = PrivacyEngine(accountant="prv").make_private(
        module=net, optimizer=opt, criterion=PerSampleLoss(loss_fn), data_loader=loader, noise_multiplier=1.0,
        max_grad_norm=1.0, grad_sample_mode="ghost", poisson_sampling=False,
        noise_generator=torch.Generator().manual_seed(1))
    return model, opt, criterion


def _expanded_weights(net, batch_size):
    from opacus.grad_sample import get_gsm_class

    return get_gsm_class("ew")(net, batch_first=True, loss_reduction="mean")


def time_mode(bundle: Bundle, mode: str, batch_size: int, repeats: int) -> dict:
    try:
        step = _step_fn(bundle, mode, batch_size)
        step()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    except Exception as err:  # a mode that does not support this network
        return {"mode": mode, "error": f"{type(err).__name__}: {str(err)[:200]}"}
    return {"mode": mode, "median_s": statistics.median(times), "runs": repeats}


def _status_mb(field_name: str) -> float:
    """A memory field (VmRSS, VmHWM) of this process from /proc/self/status, in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field_name)


def _peak_memory_child(mode: str, batch_size: int, threads: int | None, queue) -> None:
    if threads:
        torch.set_num_threads(threads)
    bundle = Bundle()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before = _status_mb("VmRSS")
    result = time_mode(bundle, mode, batch_size, 2)
    queue.put({"peak_rss_mb": _status_mb("VmHWM"), "rss_before_mb": before, "error": result.get("error")})


def peak_memory(mode: str, batch_size: int, threads: int | None) -> dict:
    """Peak RSS (MB) of a fresh process while it builds the network and runs 3 steps of ``mode``;
    ``rss_before_mb``: its RSS after the imports, when the peak was reset (Linux)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_peak_memory_child, args=(mode, batch_size, threads, queue))
    child.start()
    out = queue.get(timeout=600)
    out["step_mb"] = out["peak_rss_mb"] - out["rss_before_mb"]
    child.join()
    return out


def noise_time(repeats: int = 21) -> dict:
    """Median milliseconds to draw one step's Gaussian noise for every parameter of the bundle
    network: from ``SecureRandom`` (what DP training uses) and, for comparison, from an
    integer-seeded torch generator per parameter (Opacus' default, which DP training must not use)."""
    params = [p for p in Bundle().network().parameters()]
    sizes = [p.numel() for p in params]
    source, generator = SecureRandom(), torch.Generator().manual_seed(0)

    def median_ms(draw) -> float:
        draw()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            draw()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    return {"coordinates": sum(sizes), "secure_ms": median_ms(lambda: source.gaussian(sum(sizes), 1.0)),
            "seeded_torch_ms": median_ms(lambda: [torch.normal(0.0, 1.0, p.shape, generator=generator)
                                                  for p in params])}


def step_time_ratios(batch_size: int = 16, repeats: int = 7, threads: int | None = None,
                     memory: bool = True) -> dict:
    """Median step time of each DP mode divided by the non-DP step time (same process), and the
    peak memory of each mode in a process of its own."""
    if threads:
        torch.set_num_threads(threads)
    bundle = Bundle()
    plain = time_mode(bundle, "plain", batch_size, repeats)
    results = [plain] + [time_mode(bundle, m, batch_size, repeats) for m in DP_MODES]
    for r in results:
        if "median_s" in r:
            r["ratio_to_non_dp"] = r["median_s"] / plain["median_s"]
        if memory and "median_s" in r:
            mem = peak_memory(r["mode"], batch_size, threads)
            r.update(peak_rss_mb=mem["peak_rss_mb"], step_mb=mem["step_mb"])
    return {"benchmark": "dp_step_time", "batch_size": batch_size, "input": list(bundle.roi_size()),
            "network": "bundle network_def", "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
            "torch": torch.__version__, "modes": results, "noise": noise_time()}


INFORMED_CANDIDATES = 64  # candidates the informed attacker's cost per candidate is timed on


def attack_time(overrides: dict | None = None, prior_patients: tuple[int, ...] | None = None) -> dict:
    """Seconds of the audit job's default attack (every ``attack_*`` setting of its server config:
    iterations x restarts, prior, noise averaging, refinement, ...; ``overrides`` change them) on
    one update of the bundle network (one slice, one SGD step of learning rate 0.01 at the initial
    model, known mask): building the synthetic prior (done once per site workspace, then kept) and
    attacking the update by reconstruction, and the informed attacker's seconds per candidate (one
    per-sample gradient each; an audit scores every training slice of the site)."""
    from dpseg.identification import candidate_scores
    from dpseg.inversion import AttackSettings, invert
    from dpseg.jobs import job_attack
    from dpseg.prior import PUBLIC_PATIENTS, load_prior, synthetic_prior

    attack = {**job_attack(), **(overrides or {})}
    bundle = Bundle()
    network, loss_fn = bundle.network(), bundle.loss()
    x, y = _batch(bundle, 1)
    network.zero_grad()
    loss_fn(network(x), y).backward()
    update = {k: -0.01 * p.grad.detach().clone() for k, p in network.named_parameters()}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        vt, k = bundle.volume_transforms(), attack["prior_components"]
        prior = synthetic_prior(Path(folder), vt, k, patients=prior_patients or PUBLIC_PATIENTS) \
            if attack["prior"] == "synthetic" else load_prior(attack["prior"], Path(folder), vt, k)
    built = time.perf_counter() - started
    settings = AttackSettings(**attack, local_lr=0.01, intensity_shift=bundle.intensity_shift())
    rec = invert(network, loss_fn, update, settings, tuple(bundle.roi_size()), label=y, prior=prior)
    images, labels = _batch(bundle, INFORMED_CANDIDATES, seed=1)
    started = time.perf_counter()
    candidate_scores(network, loss_fn, [-t for t in update.values()], list(update), images, labels)
    informed = (time.perf_counter() - started) / INFORMED_CANDIDATES
    return {"benchmark": "attack_time", "attack": attack, "prior_build_seconds": built,
            "seconds_per_update": rec.seconds, "seconds_per_iteration": rec.seconds / rec.iterations,
            "informed_seconds_per_candidate": informed, "torch_threads": torch.get_num_threads()}


def fl_scaling(site_counts: tuple[int, ...] = (1, 2, 4, 8), patients: int = 6, rounds: int = 3,
               work: Path | None = None) -> dict:
    """Simulator wall time per round (rounds after the first; the server's round timer) against
    the longest local training time a site reported in that round, for each number of simulated
    sites, each with the same synthetic cohort of ``patients`` patients (non-DP ``jobs/fed``: the
    overhead is NVFlare's, not DP's). One process per site, all on this machine."""
    from dpseg.jobs import JOBS_DIR, configure_job
    from dpseg.tools.simulation import run_simulator
    from dpseg.report import site_rounds
    from dpseg.synthetic import write_cohort

    work = Path(work or tempfile.mkdtemp(prefix="dpseg_bench_"))
    rows = []
    for n in site_counts:
        root = work / f"sites{n}"
        write_cohort(root / "data", n_sites=n, patients=[patients] * n, seed=0)
        job = configure_job(JOBS_DIR / "fed", root / "job", {"num_rounds": rounds, "min_clients": n},
                            {"batch_size": 2, "sample_rate": 0.0, "local_steps": 0}, learner_args={"local_epochs": 2.0})
        start = time.perf_counter()
        result = run_simulator(job, root / "ws", {"DPSEG_DATA_ROOT": str(root / "data")},
                               [f"site-{i + 1}" for i in range(n)], log=root / "simulator.log")
        wall = time.perf_counter() - start
        if result.returncode != 0:
            rows.append({"sites": n, "error": f"simulator failed, see {root / 'simulator.log'}"})
            continue
        recs = json.loads(next((root / "ws" / "server").rglob(ROUNDS_FILE)).read_text())[1:]
        kept = site_rounds(root / "ws")  # each site's own record of its training time
        per_round = [r["seconds"] for r in recs]
        local = [max(kept[(s, r["round"])]["train_seconds"] for s in r["sites"]) for r in recs]
        rows.append({"sites": n, "job_wall_s": wall, "round_s": statistics.median(per_round),
                     "local_train_s": statistics.median(local),
                     "overhead_s": statistics.median(a - b for a, b in zip(per_round, local)),
                     "rounds_timed": len(recs)})
    return {"benchmark": "fl_overhead_and_scaling", "patients_per_site": patients, "rounds": rounds,
            "job": "fed (no DP), batch 2, 2 local epochs", "results": rows}


def round_breakdown(rounds: list[dict], sites: dict[tuple[str, int], dict]) -> list[dict]:
    """Per round: the server's round time (s) against the slowest site's training and validation
    (``sites``: each site's own record, ``dpseg.report.site_rounds``); communication and waiting
    are the rest of the round."""
    rows = []
    for r in rounds:
        own = [sites[(s, r["round"])] for s in r["sites"] if (s, r["round"]) in sites]
        busiest = max(own, key=lambda o: o["train_seconds"] + (o.get("validation_seconds") or 0), default=None)
        train = busiest["train_seconds"] if busiest else None
        validation = busiest.get("validation_seconds") if busiest else None
        rows.append({"round": r["round"], "round_s": r.get("seconds"), "train_s": train, "validation_s": validation,
                     "communication_s": r["seconds"] - train - (validation or 0)
                     if busiest and r.get("seconds") is not None else None})
    return rows


def demo_breakdown(work: Path | None = None) -> dict:
    """``make demo``'s work, timed and broken down (see the module docstring)."""
    from dpseg.jobs import JOBS_DIR, site_ledgers
    from dpseg.report import build_report, site_rounds
    from dpseg.synthetic import write_cohort
    from dpseg.tools.simulation import run_simulator

    work = Path(work or tempfile.mkdtemp(prefix="dpseg_bench_demo_"))
    sites = ["site-1", "site-2", "site-3"]
    start = time.perf_counter()
    write_cohort(work / "data", n_sites=3, seed=0, workers=os.cpu_count() or 1)
    cohort_s = time.perf_counter() - start
    env = {"DPSEG_DATA_ROOT": str(work / "data"), "DPSEG_LEDGER": site_ledgers(work / "ledgers", sites, 20.0)}
    wall_start = time.time()
    started = time.perf_counter()
    result = run_simulator(JOBS_DIR / "fed_dp", work / "ws", env, sites, log=work / "simulator.log")
    simulator_s = time.perf_counter() - started
    if result.returncode != 0:
        return {"benchmark": "demo", "error": f"simulator failed, see {work / 'simulator.log'}"}
    rounds = json.loads(next((work / "ws" / "server").rglob(ROUNDS_FILE)).read_text())
    report = build_report(work / "ws")
    first, last = rounds[0], rounds[-1]
    return {"benchmark": "demo", "wall_s": time.perf_counter() - start, "cohort_s": cohort_s,
            "simulator_s": simulator_s, "startup_s": first.get("started", wall_start) - wall_start,
            "end_s": wall_start + simulator_s - (last.get("started", 0) + (last.get("seconds") or 0)),
            "rounds": round_breakdown(rounds, site_rounds(work / "ws")),
            "peak_rss_mb": {s: e.get("peak_rss_mb") for s, e in report["sites"].items()},
            "test_dice": {s: e.get("test_dice_best") for s, e in report["sites"].items()}}


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="dpseg bench", description=__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--fl", action="store_true", help="also the simulator overhead / scaling (1, 2, 4, 8 sites)")
    p.add_argument("--attack", action="store_true", help="also the time of the audit's default attack on one update")
    p.add_argument("--demo", action="store_true", help="also make demo's work, timed and broken down (minutes)")
    args = p.parse_args(argv)
    out = {"dp_step_time": step_time_ratios(args.batch_size, args.repeats, args.threads)}
    if args.attack:
        out["attack_time"] = attack_time()
    if args.fl:
        out["fl_overhead_and_scaling"] = fl_scaling()
    if args.demo:
        out["demo"] = demo_breakdown()
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
