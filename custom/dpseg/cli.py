"""`dpseg ...` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def print_site_progress(started: float, site: str, done: int, total: int) -> None:
    """A line every 20 patients of a site and at its end; ``started``: the wall clock (s) at the start."""
    if done == total or done % 20 == 0:
        print(f"  {site}: {done}/{total} patients ({time.time() - started:.1f} s)", flush=True)


def write_synthetic(out: Path, sites: int, patients, seed: int) -> None:
    """``dpseg synth``'s work, with progress: the synthetic cohort in ``out`` (site-k/datalist.json)
    and the pooled ``out/datalist.json``. ``patients``: per site (a list) or for every site."""
    from dpseg.datalist import write_pooled
    from dpseg.synthetic import write_cohort

    start = time.perf_counter()
    progress = partial(print_site_progress, time.time())  # called in the processes that write the sites
    datalists = write_cohort(out, sites, patients, seed, progress, workers=os.cpu_count() or 1)
    write_pooled(datalists, out / "datalist.json", description="synthetic CT, all sites pooled")
    for d in datalists:
        print(f"wrote {d}")
    print(f"wrote {out / 'datalist.json'} (all sites pooled) in {time.perf_counter() - start:.1f} s")


def write_public_synthetic(out: Path, patients: int, seed: int, voxels: int) -> None:
    """``dpseg synth --public``'s work, with progress: the public cohort in ``out/public``."""
    from dpseg.synthetic import write_public

    start = time.perf_counter()

    def progress(name: str, done: int, total: int) -> None:
        if done == total or done % 20 == 0:
            print(f"  {name}: {done}/{total} patients ({time.perf_counter() - start:.1f} s)", flush=True)

    datalist = write_public(out, seed, patients, voxels, progress)
    print(f"wrote {datalist} (public cohort; scanners in {datalist.parent / 'scanners.json'}) "
          f"in {time.perf_counter() - start:.1f} s")


def cmd_synth(args: argparse.Namespace) -> int:
    from dpseg.synthetic import IN_PLANE_VOXELS, PUBLIC_PATIENTS

    try:
        if args.public:
            if args.sites is not None:
                raise ValueError("--public writes the public cohort alone: leave out --sites")
            if args.patients is not None and len(args.patients) != 1:
                raise ValueError(f"--patients with --public is one number (the public cohort's size), "
                                 f"got {args.patients}")
            patients = PUBLIC_PATIENTS if args.patients is None else args.patients[0]
            write_public_synthetic(Path(args.out), patients, args.seed,
                                   IN_PLANE_VOXELS if args.voxels is None else args.voxels)
        else:
            if args.voxels is not None:
                raise ValueError(f"--voxels goes with --public only (the sites' volumes have {IN_PLANE_VOXELS} "
                                 "voxels a side)")
            write_synthetic(Path(args.out), 3 if args.sites is None else args.sites, args.patients, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def cmd_split_msd(args: argparse.Namespace) -> int:
    from dpseg.datalist import DatalistError, split_msd, write_pooled

    try:
        datalists = split_msd(Path(args.msd), Path(args.out), args.sites, args.seed)
    except DatalistError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d in datalists:
        print(f"wrote {d}")
    print(f"wrote {write_pooled(datalists, Path(args.out) / 'datalist.json')} (all sites pooled)")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from dpseg.checks import check_datalist

    status = 0
    for path in args.datalist:
        report = check_datalist(Path(path))
        if report.ok:
            print(report.summary())
        else:
            status = 1
            for problem in report.problems:
                print(problem)
    return status


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dpseg.bundle import Bundle
    from dpseg.evaluate import evaluate
    from dpseg.plausibility import warning

    bundle = Bundle(args.bundle)
    network = bundle.load_weights(bundle.network(), args.model)
    results = []
    for path in args.datalist:
        res = evaluate(Path(path), bundle, network, args.split)
        results.append(res)
        print(f"{path}: {res['split']} Dice mean {res['mean_dice']:.3f} (min {res['min_dice']:.3f}, "
              f"{res['patients']} patients; {len(res['flagged'])} implausible)")
        for case in res["cases"]:
            if case["plausibility"]["flags"]:
                print(warning(case["patient"], case["plausibility"]), file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


def cmd_init_workspace(args: argparse.Namespace) -> int:
    from dpseg.site import AUDIT_RELEASE_KEY, SiteConfigError
    from dpseg.workspace import init_workspace, write_site_settings

    def absolute(path: str | None) -> str | None:
        return str(Path(path).absolute()) if path else None

    site = {"datalist": absolute(args.datalist), "data_root": absolute(args.data_root),
            "ledger": absolute(args.ledger), "require_dp": args.require_dp or None,
            "max_job_epsilon": args.max_job_epsilon, AUDIT_RELEASE_KEY: args.audit_release}
    for folder in args.workspace:
        print(f"wrote {init_workspace(Path(folder))} (class allow-list: NVFlare's defaults + dpseg.; "
              "job log streaming to the server off)")
        if any(v is not None for v in site.values()):
            try:
                print(f"wrote {write_site_settings(Path(folder), site)} (the site's own settings)")
            except SiteConfigError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
    return 0


def cmd_ledger_init(args: argparse.Namespace) -> int:
    from dpseg.ledger import Ledger
    from dpseg.privacy import PrivacyError

    if "{site}" in args.path:
        print(f"error: {args.path}: give one site's ledger file ({{site}} is replaced only in the site's "
              "DPSEG_LEDGER / 'ledger' setting)", file=sys.stderr)
        return 2
    try:
        ledger = Ledger.create(Path(args.path).absolute(), args.total_epsilon, args.total_delta)
    except PrivacyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {ledger.path}: total epsilon {ledger.total_epsilon:g}, total delta {ledger.total_delta:g}, no jobs")
    return 0


def cmd_ledger_show(args: argparse.Namespace) -> int:
    from dpseg.ledger import Ledger
    from dpseg.privacy import PrivacyError

    try:
        ledger = Ledger.open(Path(args.path))
    except PrivacyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spent = ledger.spent()
    print(f"privacy ledger {ledger.path}")
    print(f"  total:     epsilon {ledger.total_epsilon:g}, delta {ledger.total_delta:g}")
    print(f"  committed: epsilon {ledger.committed():.4g}, delta {ledger.committed_delta():.4g}")
    print(f"  spent:     epsilon {spent[0]:.4g}, delta {spent[1]:.4g}")
    for entry, job in ledger.jobs.items():
        more = f", continued by {', '.join(job['continued_by'])}" if job.get("continued_by") else ""
        print(f"  {entry}: target epsilon {job['target_epsilon']:g} at delta {job['delta']:g}, spent "
              f"{job['spent_epsilon']:.4g} in {job['steps']} steps ({job['accountant']}), started {job['started']}{more}")
    if not ledger.jobs:
        print("  no jobs yet")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from dpseg.report import ReportError, build_report, format_report

    try:
        report = build_report(Path(args.workspace))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.json) if args.json else Path(args.workspace) / "dpseg_report.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(format_report(report))
    print(f"\nwrote {out}")
    return 0


def cmd_resume_job(args: argparse.Namespace) -> int:
    from dpseg.resume import ResumeError, resume_job

    try:
        summary = resume_job(Path(args.run), Path(args.job), Path(args.out))
    except ResumeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"resume point: {summary['resume_point']}")
    print(f"wrote {args.out}: rounds {summary['next_round']}..{summary['end_round'] - 1} "
          f"({summary['rounds_left']} left) from the saved global model")
    for site, entry in sorted(summary["ledger_entries"].items()):
        print(f"  {site} continues its ledger entry {entry}")
    if not summary["ledger_entries"]:
        print("  no site reported a ledger entry (a job without DP): sites start fresh")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from dpseg.tools.study import GRIDS, Study, run_study

    if args.audits_only and (args.only or args.no_audit):
        print("error: --audits-only trains nothing: it goes with neither --only nor --no-audit", file=sys.stderr)
        return 2
    grid = GRIDS[args.grid]
    work = Path(args.work or f"study_{grid.name}")
    cohort = Path(args.data) if args.data else work / "cohort"
    if not args.data and not (cohort / "datalist.json").exists():
        print(f"writing the synthetic cohort ({', '.join(map(str, grid.patients))} patients) to {cohort}", flush=True)
        write_synthetic(cohort, len(grid.patients), grid.patients, seed=0)
    if not (cohort / "datalist.json").exists() and not args.audits_only:
        print(f"error: {cohort / 'datalist.json'} (all sites pooled) is missing; the pooled arm needs it", file=sys.stderr)
        return 2
    note = f"the sites' datalists in {cohort.name}/" if args.data else \
        f"synthetic cohort (dpseg synth, seed 0; {', '.join(map(str, grid.patients))} patients per site)"
    study = Study(grid, cohort, work, Path(args.out), progress=lambda m: print(m, flush=True), cohort_note=note)
    try:
        run_study(study, only=set(args.only.split(",")) if args.only else None, audit=not args.no_audit,
                  audits_only=args.audits_only)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


def _load_torch(path: str, what: str):
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise SystemExit(f"error: cannot read {what} {path}: {err}")


AUDIT_OPTIONS = ("iterations", "restarts", "label", "simulate", "seed", "prior", "prior_components", "prior_candidates",
                 "noise", "noise_draws", "refine_iterations", "warp_grid", "warp_step")  # AttackSettings fields


def cmd_audit(args: argparse.Namespace) -> int:
    """Attack one saved update outside NVFlare and score it against the site's true batch."""
    from dpseg.wire import PRIVACY_META, TRAINING_META

    record = _load_torch(args.update, "update")
    meta = {}
    if isinstance(record, dict) and "update" in record:  # an intercepted update (server's audit folder)
        update, global_state, meta = record["update"], record.get("global"), record.get("meta") or {}
    else:
        update, global_state = record, None
    if args.model:
        global_state = _load_torch(args.model, "model")
    if global_state is None:
        print("error: --model is required unless --update is an intercepted update with its global model",
              file=sys.stderr)
        return 2
    data = _load_torch(args.data, "data")
    batch = data[args.step] if isinstance(data, list) else data
    if not batch.get("patients", [0]) or "images" not in batch:
        print(f"error: {args.data} holds no image for step {args.step} (an empty Poisson sample?)", file=sys.stderr)
        return 2
    # the attack's modules (MONAI, Opacus: seconds to import) only once the files are known to be good
    from dpseg.auditor import attack_settings, audit_update
    from dpseg.bundle import Bundle
    from dpseg.datalist import resolve
    from dpseg.prior import PRIOR_SPECS, load_prior, prior_from_datalist
    from dpseg.slices import SliceSet

    bundle = Bundle()
    given = {"local_steps": args.local_steps, "learning_rate": args.local_lr, "batch_size": args.batch_size}
    training = {**(meta.get(TRAINING_META) or {}), **{k: v for k, v in given.items() if v}}
    # what the operator left out is the canonical audit's (AttackSettings' defaults)
    chosen = {k: getattr(args, k) for k in AUDIT_OPTIONS if getattr(args, k) is not None}
    settings = attack_settings(training, **chosen, intensity_shift=bundle.intensity_shift())
    with tempfile.TemporaryDirectory() as scratch:
        try:
            if settings.prior in PRIOR_SPECS:
                prior = load_prior(settings.prior, Path(args.prior_dir or args.out or scratch), bundle.volume_transforms(),
                                   settings.prior_components, progress=lambda m: print(m, flush=True))
            elif Path(settings.prior).is_file():  # this operator's own public datalist (a job can name none)
                prior = prior_from_datalist(Path(settings.prior), bundle.volume_transforms(), settings.prior_components)
            else:
                raise ValueError(f"--prior {args.prior}: neither a built-in prior ({', '.join(PRIOR_SPECS)}) nor a "
                                 "public datalist file")
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    network = bundle.network()
    network.load_state_dict(global_state, strict=True)
    cohort = None
    if args.datalist:
        print(f"loading the training slices of {args.datalist} for identification", flush=True)
        cohort = SliceSet(resolve(Path(args.datalist), "training"), bundle.volume_transforms(), with_labels=True)
    metrics = audit_update(network, bundle.loss(), update, settings, batch["images"], batch["labels"], cohort,
                           batch.get("patients"), meta.get(PRIVACY_META), Path(args.out) if args.out else None,
                           progress=lambda m: print(m, flush=True), prior=prior)
    print(json.dumps(metrics, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


def cmd_privacy_audit(args: argparse.Namespace) -> int:
    from dpseg.privacy import PrivacyError

    if args.fl:
        return fl_privacy_audit(args)
    from dpseg.tools.privacyaudit import VARIANTS, job_mechanism, privacy_audit, wrong_verdicts

    try:
        mechanism = job_mechanism(Path(args.job) if args.job else None, epsilon=args.epsilon, rounds=args.rounds)
        variants = tuple(v for v in VARIANTS if not args.shipped_only or not v.broken)
        results = privacy_audit(Path(args.out), mechanism, runs=args.runs, canaries=args.canaries, variants=variants,
                                progress=lambda m: print(m, flush=True))
    except (FileNotFoundError, KeyError, ValueError, PrivacyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    wrong = wrong_verdicts(results)
    if wrong:
        print(f"error: the audit got these variants wrong (a broken one not caught, or the shipped one caught): "
              f"{', '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


def fl_privacy_audit(args: argparse.Namespace) -> int:
    """``dpseg privacy-audit --fl``: the one-run audit inside a real job (``dpseg.tools.onerun``)."""
    from dpseg.jobs import JOBS_DIR
    from dpseg.tools.onerun import fl_one_run

    work = Path(args.work or Path(args.out) / "fl_work")
    if (work / "job").exists() or (work / "ws").exists():
        print(f"error: {work} holds an earlier audit run (its job and workspace): remove them or give another "
              "--work", file=sys.stderr)
        return 2
    cohort = Path(args.data) if args.data else work / "data"
    if not args.data and not (cohort / "site-1" / "datalist.json").is_file():
        write_synthetic(cohort, 3, None, seed=0)  # the default cohort, as make demo writes it
    try:
        results = fl_one_run(Path(args.out), work, cohort, Path(args.job) if args.job else JOBS_DIR / "fed_dp",
                             canaries=args.fl_canaries, rounds=args.rounds, progress=lambda m: print(m, flush=True))
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if results["caught"]:
        print("error: the one-run audit's lower bound is above the claimed epsilon", file=sys.stderr)
        return 1
    return 0


def cmd_monailabel_check(args: argparse.Namespace) -> int:
    from dpseg.tools.labelserver import LabelServerError, check

    try:
        figures = check(Path(args.venv), Path(args.datalist), Path(args.work), args.port, args.patients,
                        args.train_epochs, progress=lambda m: print(m, flush=True))
    except LabelServerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(figures, indent=1))
    if figures["mean_dice"] < args.min_dice:
        print(f"error: mean Dice {figures['mean_dice']:.4f} below {args.min_dice}: the weights did not load?",
              file=sys.stderr)
        return 1
    return 0


def _data_commands(sub) -> None:
    """The subcommands of datasets: synthetic cohorts, MSD splits, data checks."""
    p = sub.add_parser("synth", help="write a synthetic multi-site abdominal CT cohort (NIfTI, MSD layout); with "
                                      "--public, a public cohort unlike every site (for pretraining)")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site, or public/)")
    p.add_argument("--sites", type=int, help="number of sites (default 3)")
    p.add_argument("--patients", type=_int_list, help="patients per site, comma-separated (default 60,90,120); with "
                                                      "--public, the public cohort's size (default 96)")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed gives the same files)")
    p.add_argument("--public", action="store_true",
                   help="write OUT/public: other scanners, contrast phases and body regions (abdomen, chest, pelvis, "
                        "head and neck) than any site, from seeds no site uses")
    p.add_argument("--voxels", type=int, help="with --public: voxels per in-plane side (default 128; fewer for quick "
                                              "tests)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("split-msd", help="split a Medical Segmentation Decathlon task into per-site datalists")
    p.add_argument("--msd", required=True, help="task folder with dataset.json, imagesTr, labelsTr")
    p.add_argument("--out", required=True, help="output folder (site-1, site-2, ...)")
    p.add_argument("--sites", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_split_msd)

    p = sub.add_parser("check-data", help="validate datalists and their volumes; exit 1 on any problem")
    p.add_argument("datalist", nargs="+")
    p.set_defaults(func=cmd_check_data)


def _site_commands(sub) -> None:
    """The subcommands of a site's and an admin's: workspace, ledger, report, resume."""
    from dpseg.auditresults import RELEASE_CHOICES
    from dpseg.site import DEFAULT_TOTAL_DELTA

    p = sub.add_parser("init-workspace", help="allow dpseg's components in an NVFlare simulator workspace or startup kit")
    p.add_argument("workspace", nargs="+", help="simulator workspace (-w) or a site's / the server's startup-kit folder")
    p.add_argument("--datalist", help="site setting: the site's datalist ({site} is replaced by the site name)")
    p.add_argument("--data-root", help="site setting: else <data-root>/<site>/datalist.json")
    p.add_argument("--ledger", help="site setting: the privacy ledger file ({site} is replaced; create it "
                                    "with `dpseg ledger init`)")
    p.add_argument("--require-dp", action="store_true", help="site policy: refuse every job without DP")
    p.add_argument("--max-job-epsilon", type=float, help="site policy: refuse DP jobs of a higher target epsilon")
    p.add_argument("--audit-release", choices=RELEASE_CHOICES,
                   help="site setting: what its audits send the server (none, the default; aggregate: means over its "
                        "audited updates, NOT DP-protected)")
    p.set_defaults(func=cmd_init_workspace)

    p = sub.add_parser("ledger", help="a site's privacy ledger: create it (with the site's total budget) or show it")
    ledger = p.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")
    q = ledger.add_parser("init", help="create a new, empty ledger holding the site's total budget (never overwrites)")
    q.add_argument("path", help="the ledger file to create (the site's DPSEG_LEDGER / 'ledger')")
    q.add_argument("--total-epsilon", type=float, required=True, help="the site's total epsilon across all jobs")
    q.add_argument("--total-delta", type=float, default=DEFAULT_TOTAL_DELTA,
                   help=f"the site's total delta across all jobs (default {DEFAULT_TOTAL_DELTA:g})")
    q.set_defaults(func=cmd_ledger_init)
    q = ledger.add_parser("show", help="totals, committed and spent budget, and every job's entry")
    q.add_argument("path", help="the ledger file")
    q.set_defaults(func=cmd_ledger_show)

    p = sub.add_parser("report", help="privacy and utility report of a finished NVFlare workspace, or the audit "
                                       "results a site kept")
    p.add_argument("workspace", help="simulator workspace (-w), a downloaded job result folder, or a site's workspace "
                                     "(or its dpseg_audit/<job id> folder) for the audit results kept there")
    p.add_argument("--json", help="where to write the JSON report (default: WORKSPACE/dpseg_report.json)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("resume-job", help="a new job folder that continues a stopped job from its last completed round")
    p.add_argument("run", help="the stopped job's simulator workspace (-w) or its downloaded job folder")
    p.add_argument("--job", required=True, help="the job folder that was stopped (e.g. jobs/fed_dp)")
    p.add_argument("--out", required=True, help="new job folder to write (must not exist)")
    p.set_defaults(func=cmd_resume_job)


def _study_commands(sub) -> None:
    """The subcommands of the study and evaluation."""
    p = sub.add_parser("study", help="the privacy-utility study: local, pooled, FL, FL+DP at several epsilons, "
                                      "and the audit at each; writes results.md and figures")
    p.add_argument("--grid", choices=["quick", "full"], default="full",
                   help="full: default cohort, 10 rounds, 3 seeds and an ablation (hours); quick: small cohort, 1 seed (~20 min)")
    p.add_argument("--quick", dest="grid", action="store_const", const="quick", help="same as --grid quick")
    p.add_argument("--data", help="cohort root with site-*/datalist.json and a pooled datalist.json "
                                   "(default: a synthetic cohort written into the work folder)")
    p.add_argument("--work", help="work folder for jobs, workspaces and logs (default study_<grid>)")
    p.add_argument("--out", default="docs", help="where results*.md, study_<grid>.json and figures/ go (default docs)")
    p.add_argument("--only", help="comma-separated arm kinds to train: public,local,pooled,fed,fed_dp (default all)")
    p.add_argument("--no-audit", action="store_true", help="skip the leakage audits")
    p.add_argument("--audits-only", action="store_true",
                   help="run the audits alone (after a change of the attack): the training runs are those of "
                        "OUT/study_<grid>.json, which must have the same training settings and cohort")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("evaluate", help="Dice and plausibility of the bundle's model on whole 3D volumes of a split")
    p.add_argument("datalist", nargs="+")
    p.add_argument("--split", default="test")
    p.add_argument("--model", help="state dict to evaluate (default: the bundle's models/model.pt)")
    p.add_argument("--bundle", help="bundle folder (default: the installed bundle)")
    p.add_argument("--json", help="also write the per-patient results (Dice, plausibility report) to this JSON file")
    p.set_defaults(func=cmd_evaluate)


def _audit_commands(sub) -> None:
    """The subcommands of the audit of a saved update and the MONAI Label check."""
    p = sub.add_parser("audit", help="gradient-inversion attack on one saved update, scored against the true batch")
    p.add_argument("--update", required=True, help="intercepted update (server's intercepted/*.pt) or a weight-difference state dict")
    p.add_argument("--model", help="global model state dict the update was computed from (else taken from --update)")
    p.add_argument("--data", required=True, help="the site's training batches of that round (audit/batches_round<r>.pt) "
                                                 "or a dict with images, labels (T, 1, H, W)")
    p.add_argument("--step", type=int, default=0, help="which local step's batch to score (default 0)")
    p.add_argument("--datalist", help="the site's datalist: identify the reconstruction among all its training slices")
    p.add_argument("--out", help="folder for the reconstruction, the truth and comparison.png")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    # the attack's options default to the canonical audit's (dpseg.inversion.AttackSettings, as the audit
    # job): left out here, filled in by cmd_audit, so that the values live in one place
    p.add_argument("--iterations", type=int, help="per restart (default: the canonical audit's, 300; 2000 suits --prior none)")
    p.add_argument("--restarts", type=int)
    p.add_argument("--prior",
                   help="the attacker's public image prior: 'synthetic' (a public synthetic cohort, seed of its own; "
                        "default), 'none' (search pixels), or a public datalist")
    p.add_argument("--prior-components", type=int)
    p.add_argument("--prior-candidates", type=int,
                   help="public slices with the masks closest to the known one, ranked as starting points")
    p.add_argument("--noise", type=float,
                   help="image noise the attacker assumes in the site's slices (window units; 0: match the plain update)")
    p.add_argument("--noise-draws", type=int, help="noisy copies averaged per iteration")
    p.add_argument("--refine-iterations", type=int, help="last stage of the prior search: pixels inside the body (0: none)")
    p.add_argument("--warp-grid", type=int, help="control points per side of a smooth deformation of the prior's image (0: none)")
    p.add_argument("--warp-step", type=float, help="the deformation's Adam step")
    p.add_argument("--prior-dir", help="where the synthetic prior is built and kept (default: --out, else a temporary folder)")
    p.add_argument("--label", choices=["known", "joint"])
    p.add_argument("--simulate", choices=["single", "unroll"])
    p.add_argument("--local-steps", type=int, help="the site's local steps (default: from the update's meta, else 1)")
    p.add_argument("--local-lr", type=float, help="the site's learning rate (default: from the update's meta)")
    p.add_argument("--batch-size", type=int, help="images to reconstruct for --label joint (default: from the meta, else 1)")
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("privacy-audit", help="the empirical epsilon: canaries through the site's DP step, the "
                                             "shipped mechanism and deliberately broken ones (a few minutes)")
    p.add_argument("--out", required=True, help="folder for privacy_audit.json, privacy_audit.md and the figure")
    p.add_argument("--job", help="the DP job whose settings are audited (default: jobs/fed_dp)")
    p.add_argument("--epsilon", type=float, help="the claimed epsilon (default: the job's target_epsilon)")
    p.add_argument("--rounds", type=int, help="rounds (default: the job's num_rounds)")
    p.add_argument("--runs", type=int, default=50, help="runs per variant (default 50)")
    p.add_argument("--canaries", type=int, default=400, help="canaries per run (default 400; each in by a fair coin)")
    p.add_argument("--shipped-only", action="store_true", help="audit the shipped mechanism alone")
    p.add_argument("--fl", action="store_true", help="instead: the one-run audit inside the real job in the NVFlare "
                   "simulator (canaries at every site; privacy_audit_fl.json; about a demo's time)")
    p.add_argument("--fl-canaries", type=int, default=1000, help="--fl: canaries per site (default 1000)")
    p.add_argument("--data", help="--fl: cohort root with site-*/datalist.json (default: the synthetic cohort, "
                   "written into the work folder)")
    p.add_argument("--work", help="--fl: work folder for the job copy, workspace and log (default OUT/fl_work)")
    p.set_defaults(func=cmd_privacy_audit)

    p = sub.add_parser("monailabel-check", help="the bundle in a real MONAI Label server: /info, /infer, /train")
    p.add_argument("--venv", required=True, help="MONAI Label 0.8.5's virtual environment")
    p.add_argument("--datalist", required=True, help="datalist whose test patients become the studies")
    p.add_argument("--work", required=True, help="work folder (app copy, studies, predictions, server log)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--patients", type=int, default=3, help="test patients to put in the studies folder")
    p.add_argument("--train-epochs", type=int, default=1)
    p.add_argument("--min-dice", type=float, default=0.8, help="fail below this mean Dice (default 0.8)")
    p.set_defaults(func=cmd_monailabel_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpseg", description=(
        "Federated CT liver segmentation with patient-level differential privacy."))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _data_commands(sub)
    _site_commands(sub)
    _study_commands(sub)
    _audit_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
