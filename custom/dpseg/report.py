"""Privacy and utility report of a finished NVFlare workspace (simulator, POC or a downloaded job),
and the audit results a site kept.

Reads what the server kept: ``dpseg_rounds.json`` (per round and site: privacy meta, validation
Dice, steps; wall time), ``cross_site_val/cross_val_results.json`` (each global model's Dice on
each site's test patients) and ``dpseg_audit.json`` (the sites' audit acknowledgements and what a
site chose to release, NOT DP-protected). Never reads a site's data or paths. Given a site's
workspace (or a simulator workspace, which holds the sites too), it reads what the sites kept
there: the audit results (``dpseg.auditresults``: ``dpseg_audit/<job id>/audit_results.json``) and
each site's own record of its training time and memory (``SITE_ROUNDS_FILE``); neither is ever
sent to the server.
"""

from __future__ import annotations

import json
from pathlib import Path

from dpseg.auditresults import NOT_DP_NOTE, RELEASED_KEYS, SITE_RESULTS_FILE, find_site_results, read_site_results
from dpseg.wire import AUDIT_FILE, BUNDLE_OUT, REJECTED_FILE, ROUNDS_FILE, SITE_ROUNDS_FILE

AUDIT_KEYS = ("ssim", "ssim_aligned", "psnr", "mse", "identified", "patient_identified", "slice_rank", "patient_rank",
              "baseline_ssim", "baseline_identified", "baseline_patient_identified", "baseline_slice_rank",
              "informed_identified", "informed_patient_identified", "informed_slice_rank", "chance", "patient_chance",
              "chance_mask", "patient_chance_mask", "bound", "bound_patient", "bound_mask", "bound_patient_mask",
              "bound_eps_delta", "bound_patient_eps_delta", "seconds", "informed_seconds")

BEST_MODEL = "SRV_best_FL_global_model.pt"
FINAL_MODEL = "SRV_FL_global_model.pt"


class ReportError(RuntimeError):
    pass


def find_run_dir(workspace: Path) -> Path:
    """The server's run folder inside a workspace (the one holding ``dpseg_rounds.json``)."""
    workspace = Path(workspace)
    if not workspace.is_dir():
        raise ReportError(f"{workspace} is not a folder")
    found = sorted(workspace.rglob(ROUNDS_FILE), key=lambda p: p.stat().st_mtime)
    if not found:
        raise ReportError(f"no {ROUNDS_FILE} under {workspace}: not a finished dpseg job workspace")
    return found[-1].parent


def site_rounds(workspace: Path) -> dict[tuple[str, int], dict]:
    """{(site, round): the site's own record of that round (train_seconds, peak_rss_mb)} from every
    SITE_ROUNDS_FILE under ``workspace`` (empty where the sites' folders are elsewhere)."""
    records = {}
    for path in sorted(Path(workspace).rglob(SITE_ROUNDS_FILE), key=lambda p: p.stat().st_mtime):
        for rec in json.loads(path.read_text()):
            records[(rec["site"], rec["round"])] = rec
    return records


def _new_site() -> dict:
    return {"rounds": 0, "privacy": None, "val_dice": None}


def build_report(workspace: Path) -> dict:
    """The report of ``workspace``: the server's run (privacy, utility, audit acknowledgements)
    where there is one, and the audit results kept by any site under ``workspace``
    (``site_audit``). A site's workspace alone gives ``site_audit`` and ``notes`` only."""
    if not Path(workspace).is_dir():
        raise ReportError(f"{workspace} is not a folder")
    kept = site_audit_summary(workspace)
    try:
        run = find_run_dir(workspace)
    except ReportError:
        if kept is None:
            raise ReportError(f"no {ROUNDS_FILE} nor {SITE_RESULTS_FILE} under {workspace}: neither a finished dpseg "
                              "job workspace nor a site's audit results") from None
        return {"site_audit": kept, "notes": [SITE_AUDIT_NOTE]}
    rounds = json.loads((run / ROUNDS_FILE).read_text())
    sites: dict[str, dict] = {}
    own_rounds = site_rounds(workspace)
    for rec in rounds:
        for site, contrib in rec["sites"].items():
            entry = sites.setdefault(site, _new_site())
            entry["rounds"] += 1
            entry["privacy"] = contrib.get("privacy")
            entry["val_dice"] = (contrib.get("metrics") or {}).get("val_dice")
            own = own_rounds.get((site, rec["round"])) or {}
            entry["peak_rss_mb"] = max(entry.get("peak_rss_mb") or 0, own.get("peak_rss_mb") or 0)
            entry["train_seconds"] = entry.get("train_seconds", 0) + (own.get("train_seconds") or 0)
    cross = run / "cross_site_val" / "cross_val_results.json"
    test = json.loads(cross.read_text()) if cross.exists() else {}
    for site, models in test.items():
        entry = sites.setdefault(site, _new_site())
        entry["test_dice_best"] = (models.get(BEST_MODEL) or {}).get("test_dice")
        entry["test_dice_final"] = (models.get(FINAL_MODEL) or {}).get("test_dice")
        entry["test_patients"] = (models.get(BEST_MODEL) or models.get(FINAL_MODEL) or {}).get("test_patients")

    def mean(key: str):
        values = [s[key] for s in sites.values() if s.get(key) is not None]
        return sum(values) / len(values) if values else None

    seen = sorted({site for rec in rounds for site in rec["sites"]})
    missing = [{"round": rec["round"], "sites": [s for s in seen if s not in rec["sites"]]} for rec in rounds]
    audit_file = run / AUDIT_FILE
    audit = summarize_server_audit(json.loads(audit_file.read_text())) if audit_file.exists() else None
    bundle = next((run / BUNDLE_OUT).glob("*/models/model.pt"), None) if (run / BUNDLE_OUT).exists() else None
    return {
        "run_dir": str(run),
        "rounds": len(rounds),
        "round_seconds": [round(r.get("seconds", float("nan")), 2) for r in rounds],
        "sites": dict(sorted(sites.items())),
        "mean_test_dice_best": mean("test_dice_best"),
        "mean_test_dice_final": mean("test_dice_final"),
        "best_model_bundle": str(bundle.parent.parent) if bundle else None,
        "missing_contributions": [m for m in missing if m["sites"]],
        "audit": audit,
        "site_audit": kept,
        "problems": json.loads((run / REJECTED_FILE).read_text()) if (run / REJECTED_FILE).exists() else [],
        "notes": [
            "epsilon: patient-level (one patient of one site), for everything the site sent in this job "
            "(all rounds), by the accountant named; server aggregation is post-processing.",
            "Dice on validation and test patients is reported without DP; it is about those patients, "
            "who are not in the training split.",
        ],
    }


SITE_AUDIT_NOTE = ("audit results kept at the sites are read on the site's own machine; they were not sent to "
                   "the server and none of them is DP-protected (computed from the site's training slices).")


def site_audit_summary(folder: Path) -> dict | None:
    """``summarize_audit`` of every site's kept audit results under ``folder``, with ``released``
    (per site, what it chose to send the server, or None) and ``files``; None where there are none."""
    paths = find_site_results(Path(folder))
    if not paths:
        return None
    kept = read_site_results(paths)
    return {**summarize_audit(kept), "released": kept["released"], "files": kept["files"]}


def summarize_server_audit(audit: dict) -> dict:
    """The server's ``dpseg_audit.json``: per site the rounds audited, its acknowledgement or
    error, and what it released (marked NOT DP-protected). A file of the earlier layout (per-update
    metrics under ``updates``) is summarized by ``summarize_audit``."""
    if "updates" in audit:
        return summarize_audit(audit)
    sites = audit.get("sites", [])
    return {"attack": audit.get("attack"), "results": audit.get("results"), "sites": sites,
            "failed": sum(1 for s in sites if "error" in s),
            "released": {s["site"]: s["released"] for s in sites if s.get("released")}}


def summarize_audit(audit: dict) -> dict:
    """Per audited update (site, round) the scalar metrics, and their means over scored updates."""
    rows = audit.get("updates", [])
    scored = [r for r in rows if "ssim" in r]
    means = {k: sum(r[k] for r in scored if k in r) / max(1, sum(1 for r in scored if k in r))
             for k in AUDIT_KEYS if any(k in r for r in scored)}
    return {"attack": audit.get("attack"), "updates": rows, "scored": len(scored),
            "empty": sum(1 for r in rows if r.get("patients_in_update") == 0),
            "failed": sum(1 for r in rows if "error" in r), "mean": means}


def _attack_text(a: dict | None) -> str:
    a = a or {}
    return (f"attack at each site: {a.get('iterations')} iterations x {a.get('restarts')} restarts, "
            f"label {a.get('label')}, {a.get('simulate')}-step, prior {a.get('prior', 'none')}")


def format_server_audit(audit: dict) -> list[str]:
    """Lines of ``summarize_server_audit``'s summary (or ``format_audit`` for the earlier layout)."""
    if "updates" in audit:
        return format_audit(audit)
    lines = ["", f"audit ({_attack_text(audit.get('attack'))}): results {audit.get('results')}"]
    for s in audit["sites"]:
        rounds = ", ".join(map(str, s.get("rounds", [])))
        lines.append(f"  {s['site']:<10} rounds {rounds}: " + (f"failed: {s['error']}" if "error" in s else
                                                            f"{s.get('status')}, release {s.get('release')}"))
    lines += format_released(audit.get("released") or {})
    return lines


def format_released(released: dict) -> list[str]:
    """Lines of what sites released (site -> ``dpseg.auditresults.marked`` means), marked NOT
    DP-protected; none where nothing was released."""
    released = {site: r for site, r in released.items() if r}
    if not released:
        return []
    labels = {"ssim": "SSIM", "psnr": "PSNR", "mse": "MSE", "baseline_ssim": "base", "identified": "ident",
              "patient_identified": "pat.id", "baseline_identified": "b.ident", "baseline_patient_identified": "b.pat.id"}
    head = f"{'site':<10}" + "".join(f"{labels.get(k, k):>10}" for k in RELEASED_KEYS)
    lines = ["", "released audit metrics, means over each site's scored updates: " + NOT_DP_NOTE, head, "-" * len(head)]
    for site, r in sorted(released.items()):
        means = r.get("means", {})
        lines.append(f"{site:<10}" + "".join(format(means[k], ".3f").rjust(10) if k in means else "-".rjust(10)
                                             for k in RELEASED_KEYS))
    return lines


def format_site_audit(audit: dict) -> list[str]:
    """Lines of ``site_audit_summary``: the kept per-update table and what each site released."""
    lines = format_audit(audit, title="audit results kept at the sites, never sent to the server, not DP-protected")
    for site, r in sorted((audit.get("released") or {}).items()):
        if not r:
            lines.append(f"{site}: released nothing to the server")
    return lines + format_released(audit.get("released") or {})


def format_audit(audit: dict, title: str = "audit") -> list[str]:
    lines = ["", f"{title} ({_attack_text(audit.get('attack'))}): {audit['scored']} updates scored, "
             f"{audit['empty']} with no patient, {audit['failed']} failed"]
    columns = [("epsilon", "epsilon", ".2f", 9), ("SSIM", "ssim", ".3f", 7), ("aSSIM", "ssim_aligned", ".3f", 7),
               ("base", "baseline_ssim", ".3f", 7), ("PSNR", "psnr", ".1f", 7), ("ident", "identified", ".2f", 7),
               ("rank", "slice_rank", ".0f", 7), ("b.rank", "baseline_slice_rank", ".0f", 7),
               ("inf.id", "informed_identified", ".2f", 8), ("chance", "chance", ".1e", 9), ("bound", "bound", ".3f", 8),
               ("m.chance", "chance_mask", ".3f", 9), ("m.bound", "bound_mask", ".3f", 8),
               ("pat.id", "patient_identified", ".2f", 8), ("p.bound", "bound_patient", ".3f", 8),
               ("pm.bound", "bound_patient_mask", ".3f", 9), ("seconds", "seconds", ".0f", 9)]
    head = f"{'site':<10}{'round':>6}{'DP':>4}" + "".join(f"{title:>{width}}" for title, _, _, width in columns)
    lines += [head, "-" * len(head)]

    def cell(row, key, fmt, width):
        return format(row[key], fmt).rjust(width) if row.get(key) is not None else "-".rjust(width)

    for r in audit["updates"] + ([{"site": "mean", **audit["mean"]}] if audit["scored"] else []):
        if "error" in r:
            lines.append(f"{r['site']:<10}{r['round']:>6}  failed: {r['error']}")
            continue
        dp = {True: "yes", False: "no"}.get(r.get("dp"), "")
        lines.append(f"{r['site']:<10}{r.get('round', ''):>6}{dp:>4}"
                     + "".join(cell(r, key, fmt, width) for _, key, fmt, width in columns))
    lines.append("audit note: SSIM / PSNR of the best reconstruction against the true slice, aSSIM the SSIM after "
                 "a least-squares intensity alignment; base: the best uninformed guess, made without the update (the "
                 "attack's random start or its prior's guess from public slices, a blank slice of air, or the "
                 "cohort's mean slice); ident: share identified as the true slice among all the site's training "
                 "slices (chance: 1 / slices); rank: where the true slice comes when those slices are ranked by "
                 "similarity to the reconstruction (1: identified), b.rank: the same for the attack's own uninformed "
                 "guess; inf.id: share identified by the informed attacker, who holds the site's training slices and "
                 "scores each by its own gradient against the update; bound: the tight upper bound on identification "
                 "success from the job's privacy profile, for an attacker not given the mask (chance 1 / slices); "
                 "m.chance, m.bound: the best guess from the mask alone and the bound for the attacker given the mask "
                 "(as the reconstruction attack is); pat.id, p.bound, pm.bound: the same for the patient (the most "
                 "similar slice is one of the true patient's; chance 1 / patients).")
    return lines


def format_report(report: dict) -> str:
    if "run_dir" not in report:  # a site's workspace: its kept audit results only
        return "\n".join(format_site_audit(report["site_audit"]) + [""] + [f"note: {n}" for n in report["notes"]])
    lines = [f"run: {report['run_dir']}", f"rounds: {report['rounds']}; wall time per round (s): "
             + ", ".join(f"{s:.1f}" for s in report["round_seconds"]), ""]
    head = f"{'site':<10}{'DP':<5}{'epsilon':>9}{'delta':>9}{'target':>8}{'sigma':>8}{'q':>8}{'steps':>7}" \
           f"{'rounds':>7}  {'acct':<5}{'unit':<9}{'test Dice':>10}{'(final)':>9}{'train s':>9}{'peak MB':>9}"
    lines += [head, "-" * len(head)]
    for site, s in report["sites"].items():
        p = s.get("privacy") or {}
        dp = p.get("dp", False)

        def num(key, fmt):
            return format(p[key], fmt) if dp and p.get(key) is not None else "-"

        best = f"{s['test_dice_best']:.4f}" if s.get("test_dice_best") is not None else "-"
        final = f"{s['test_dice_final']:.4f}" if s.get("test_dice_final") is not None else "-"
        lines.append(f"{site:<10}{'yes' if dp else 'no':<5}{num('epsilon', '.3f'):>9}{num('delta', '.0e'):>9}"
                     f"{num('target_epsilon', '.2f'):>8}{num('noise_multiplier', '.3f'):>8}{num('sample_rate', '.3f'):>8}"
                     f"{num('steps', 'd'):>7}{s['rounds']:>7}  {p.get('accountant', '-') if dp else '-':<5}"
                     f"{p.get('unit', 'patient'):<9}{best:>10}{final:>9}{s.get('train_seconds', 0):>9.0f}"
                     f"{s.get('peak_rss_mb') or 0:>9.0f}")
    if report["mean_test_dice_best"] is not None:
        lines.append(f"\nmean test Dice of the best global model: {report['mean_test_dice_best']:.4f}"
                     + (f" (final model: {report['mean_test_dice_final']:.4f})" if report["mean_test_dice_final"] is not None else ""))
    if report["best_model_bundle"]:
        lines.append(f"best global model as a MONAI bundle: {report['best_model_bundle']}")
    for m in report.get("missing_contributions", []):
        lines.append(f"round {m['round']}: no contribution from {', '.join(m['sites'])}")
    if report.get("problems"):
        lines += ["", "missing contributions (never aggregated):"]
        lines += [f"  round {p['round']}: {p['site']} {p['kind']}: {p['reason']}" for p in report["problems"]]
    if report.get("audit"):
        lines += format_server_audit(report["audit"])
    if report.get("site_audit"):
        lines += format_site_audit(report["site_audit"])
    lines += [""] + [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)
