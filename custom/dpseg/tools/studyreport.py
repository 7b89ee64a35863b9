"""The study's results page: markdown tables and figures from ``dpseg.tools.study``'s results.

Figures: ``privacy_utility.png`` (epsilon vs mean test Dice of the FL arms, local and pooled as
reference lines; leakage, SSIM and slice and patient identification rates, per audit level) and
``reconstructions.png`` (true slice and reconstruction of the first audited update per level).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def headline_dp(row: dict) -> bool:
    """Whether a run or summary row is a shipped FL+DP arm: from the bundle, no ablation."""
    return row["kind"] == "fed_dp" and row.get("start", "bundle") == "bundle" and not row.get("ablation")


def ablation_table(results: dict) -> list[str]:
    """Markdown lines: the ablation arms against the shipped FL+DP arm of the same seed and epsilon
    (none where the study has no ablation)."""
    ablated = [r for r in results["runs"] if r.get("ablation") or (r["kind"] == "fed_dp" and r.get("start") == "random")]
    rows = []
    for r in ablated:
        shipped = next((s for s in results["runs"] if headline_dp(s) and s["seed"] == r["seed"]
                        and s["epsilon"] == r["epsilon"]), None)
        if shipped:
            rows.append((r, shipped))
    if not rows:
        return []
    lines = ["", "## Ablation (one seed each; against the shipped FL+DP job of the same seed)", "",
             "| arm | seed | mean test Dice | shipped job | difference | wall time (s) | shipped job (s) |",
             "|---|---|---|---|---|---|---|"]
    for r, shipped in rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {_fmt(r['mean_dice'])} | {_fmt(shipped['mean_dice'])} | "
                     f"{r['mean_dice'] - shipped['mean_dice']:+.3f} | {r['wall_seconds']:.0f} | "
                     f"{shipped['wall_seconds']:.0f} |")
    return lines


def partial_note(results: dict) -> list[str]:
    """Markdown lines saying how much of the study is done, where it is not complete (none where it is)."""
    if results.get("complete", True):
        return []
    planned = results["planned"]
    return [f"**Not complete**: {len(results['runs'])} of {planned['runs']} training runs, "
            f"{len(results['audits'])} of {planned['audits']} audits and {len(results.get('privacy_audits', []))} of "
            f"{planned.get('privacy_audits', 0)} canary audits so far. `dpseg study` with the same grid "
            "and out folder goes on from here (it keeps the runs this page's JSON holds).", ""]


def privacy_audit_table(results: dict) -> list[str]:
    """Markdown lines: the canary audit's lower bounds per variant and claimed epsilon (none where
    the study ran no canary audit)."""
    audits = results.get("privacy_audits") or []
    if not audits:
        return []
    from dpseg.tools.privacyaudit import detected

    first = audits[0]
    lines = ["", "## Empirical epsilon (canary audit of the DP step)", "",
             f"`dpseg privacy-audit` with this grid's FL+DP settings at each epsilon: {first['results'][0]['runs']} runs x "
             f"{first['results'][0]['canaries'] // first['results'][0]['runs']} canaries per variant, every noised step "
             "seen; lower bounds on epsilon at 95% confidence, Clopper-Pearson / Gaussian-DP route; then one run of "
             "1,000 canaries scored by the sum of the updates: its lower bound / its estimate (where the audit ran "
             "it). A variant is caught when a bound exceeds the claim, a broken one also when its estimate does "
             "([audit.md](audit.md#empirical-epsilon-dpseg-privacy-audit)).", "",
             "| variant | broken | " + " | ".join(f"claimed {a['claimed_epsilon']:g}" for a in audits) + " | caught |",
             "|---|---|" + "---|" * len(audits) + "---|"]
    for i, row in enumerate(first["results"]):
        cells = [_privacy_audit_cell(a["results"][i]) for a in audits]
        caught = ", ".join("yes" if detected(a["results"][i]) else "no" for a in audits)
        lines.append(f"| {row['variant']} | {'yes' if row['broken'] else 'no'} | " + " | ".join(cells) + f" | {caught} |")
    return lines


def _privacy_audit_cell(row: dict) -> str:
    """"CP / GDP route", and "; one run: bound / estimate" where the row has the one-run audit."""
    cell = f"{row['epsilon_lower_bound']:.2f} / {row['epsilon_lower_bound_gdp']:.2f}"
    if row.get("epsilon_estimate") is not None and "epsilon_lower_bound_one_run" in row:
        cell += f"; one run: {row['epsilon_lower_bound_one_run']:.2f} / {row['epsilon_estimate']:.2f}"
    return cell


def write_figures(results: dict, folder: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    name = results["grid"]["name"]
    rows = results["summary"]
    dp = sorted((r for r in rows if headline_dp(r)), key=lambda r: r["epsilon"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if dp:
        left.errorbar([r["epsilon"] for r in dp], [r["mean_dice"] for r in dp],
                      yerr=[r["sd_dice"] or 0 for r in dp], marker="o", capsize=3, label="FL + DP")
    styles = {"fed": ("FL, no DP", "C1", "-"), "pooled": ("pooled, no DP", "C2", "--"),
              "public": ("public model alone", "C4", "-.")}
    for r in rows:
        if r["kind"] in styles:
            label, colour, line = styles[r["kind"]]
            left.axhline(r["mean_dice"], color=colour, linestyle=line, label=label)
    local = [r["mean_dice"] for r in rows if r["kind"] == "local"]
    if local:
        left.axhline(float(np.mean(local)), color="C3", linestyle=":", label="local alone (mean of sites)")
    left.set_xscale("log")
    if dp:
        left.set_xticks([r["epsilon"] for r in dp], [f"{r['epsilon']:g}" for r in dp])
        left.minorticks_off()
    left.set_xlabel("epsilon (patient level, delta 1e-5)")
    left.set_ylabel("mean test Dice over sites")
    left.set_title("utility")
    left.legend(fontsize=8)
    audits = [a for a in results.get("audits", []) if a["summary"].get("mean")]
    if audits:
        x = np.arange(len(audits))
        means = [a["summary"]["mean"] for a in audits]
        right.bar(x - 0.27, [m.get("ssim", np.nan) for m in means], 0.27, label="SSIM of reconstruction")
        right.bar(x, [m.get("identified", np.nan) for m in means], 0.27, label="slice identified")
        right.bar(x + 0.27, [m.get("patient_identified", np.nan) for m in means], 0.27, label="patient identified")
        right.plot(x, [m.get("baseline_ssim", np.nan) for m in means], "k_", markersize=20, label="uninformed SSIM")
        right.set_xticks(x, [a["level"] for a in audits])
        right.set_ylim(0, 1)
        right.legend(fontsize=8)
    right.set_title("leakage (gradient inversion)")
    fig.tight_layout()
    paths = {"privacy_utility": folder / f"{name}_privacy_utility.png"}
    fig.savefig(paths["privacy_utility"], dpi=110)
    plt.close(fig)

    examples = [(a["level"], Path(a["examples"][0])) for a in results.get("audits", []) if a.get("examples")]
    if examples:
        fig, axes = plt.subplots(2, len(examples), figsize=(2.4 * len(examples), 5), squeeze=False)
        for j, (level, folder_) in enumerate(examples):
            for i, (what, file) in enumerate((("true slice", "truth.npy"), ("reconstruction", "reconstruction.npy"))):
                ax = axes[i, j]
                ax.imshow(np.load(folder_ / file)[0].T, cmap="gray", vmin=0, vmax=1, origin="lower")
                ax.set_title(f"{level}: {what}", fontsize=8)
                ax.axis("off")
        fig.tight_layout()
        paths["reconstructions"] = folder / f"{name}_reconstructions.png"
        fig.savefig(paths["reconstructions"], dpi=110)
        plt.close(fig)
    return paths


def write_markdown(results: dict, figures: dict[str, Path]) -> str:
    g = results["grid"]
    sites = results["sites"]
    lines = [f"# Privacy-utility study ({g['name']} grid)", "",
             f"Run {results['date']} on {results['machine']}; {results['total_minutes']:.0f} min in all.", "",
             *partial_note(results),
             f"Settings: {results.get('cohort', 'synthetic cohort')}, sites " + ", ".join(sites) +
             f" (each site's own split into training / validation / test); {g['rounds']} round(s) x "
             + (f"{g['local_steps']} steps at public Poisson rate {g['sample_rate']:g} (FL, FL+DP; update divided by "
                f"{g['batch_size']}) or {g['local_epochs']:g} local epochs at expected batch {g['batch_size']} "
                "(local, pooled), Adam; DP: patient-level (epsilon, delta 1e-5, add/remove one patient), "
                if "sample_rate" in g else f"{g['local_epochs']:g} local epochs, expected Poisson batch "
                f"{g['batch_size']}, Adam; DP: patient-level (epsilon, delta 1e-5), ") +
             f"PRV accountant, over all the job's steps, clip norm 1.0; seeds "
             f"{', '.join(map(str, g['seeds']))} (initial model and, without DP, slice draws; DP noise fresh every run). "
             "Every model is the best global model by validation Dice (the final one in a one-round job), "
             "scored on each site's test patients (whole volumes); 'mean' is the mean over sites. Wall time: the simulator run (start-up, "
             "training, validation, cross-site evaluation), median over seeds.", "",
             "## Utility", "",
             "| arm | mean test Dice | spread over seeds | " + " | ".join(sites) + " | epsilon spent | wall time (s) |",
             "|---|---|---|" + "---|" * len(sites) + "---|---|"]
    for r in results["summary"]:
        spread = (f"sd {_fmt(r['sd_dice'])}, {_fmt(r['min_dice'])} to {_fmt(r['max_dice'])}"
                  if r["seeds"] > 1 else "1 seed")
        lines.append(f"| {r['arm']} | {_fmt(r['mean_dice'])} | {spread} | "
                     + " | ".join(_fmt(r["dice_per_site"].get(s)) for s in sites)
                     + f" | {_fmt(r['epsilon_spent'], '.2f')} | {r['wall_seconds']:.0f} |")
    fed = next((r for r in results["summary"] if r["kind"] == "fed"), None)
    if fed:
        gaps = [f"eps {r['epsilon']:g}: {fed['mean_dice'] - r['mean_dice']:+.3f}"
                for r in results["summary"] if headline_dp(r)]
        if gaps:
            lines += ["", "Dice gap, FL without DP minus FL with DP: " + ", ".join(gaps) + "."]
    lines += ablation_table(results)
    audits = results.get("audits", [])
    if audits:
        a0 = (audits[0]["summary"].get("attack") or {})
        lines += ["", "## Leakage (gradient inversion of intercepted updates)", "",
                  f"The canonical audit (`jobs/fed_dp_audit`: batch 1, one SGD step per round, {g['audit_rounds']} "
                  f"round(s), sites {', '.join(sites[:2])}; attack {a0.get('iterations')} iterations x "
                  f"{a0.get('restarts')} restarts, prior {a0.get('prior', 'none')}, "
                  + (f"then {a0['refine_iterations']} refinement iterations, " if a0.get("refine_iterations") else "")
                  + (f"the update matched averaged over image noise of {a0['noise']} ({a0.get('noise_draws')} draws), "
                     if a0.get("noise") else "")
                  + ("the true label mask given to the attacker" if a0.get("label") == "known"
                     else "the label mask optimised with the image") + "). Means over scored "
                  "updates; uninformed SSIM: the best guess made without the update (the attack's random start or "
                  "its prior's guess from public slices, a blank slice of air, the cohort's mean slice); "
                  "identified: the true slice is the most similar among all the site's training slices (chance: "
                  "1 / slices); rank: where the true slice comes among them by similarity to the reconstruction "
                  "(1: identified), and for the attack's own uninformed guess; patient identified: the most "
                  "similar slice is one of the true patient's (chance: 1 / patients); aligned SSIM: after a "
                  "least-squares intensity alignment; informed: the share the informed attacker identifies (it holds "
                  "the site's training slices and scores each by its own gradient against the update); bound: the "
                  "tight reconstruction-robustness bound on identification from the job's privacy profile "
                  "(min over eps of e^eps x chance + delta(eps)), for the attacker not given the mask (chance 1 / "
                  "slices or 1 / patients) and the one given it (chance: the best guess from the mask alone). "
                  "These are the sites' own results, read from their workspaces (the study "
                  "plays every site): no site sent them to the server, and none is DP-protected (they are computed "
                  "from the sites' training slices).", "",
                  "| level | updates scored | SSIM | aligned SSIM | uninformed SSIM | PSNR (dB) | identified | rank "
                  "| uninformed rank | informed | chance | bound | chance, mask given | bound, mask given "
                  "| patient identified | chance | bound | bound, mask given | s / update |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for a in audits:
            s = a["summary"]
            m = s.get("mean", {})
            cells = [(m.get("ssim"), ".3f"), (m.get("ssim_aligned"), ".3f"), (m.get("baseline_ssim"), ".3f"),
                     (m.get("psnr"), ".1f"), (m.get("identified"), ".2f"), (m.get("slice_rank"), ".0f"),
                     (m.get("baseline_slice_rank"), ".0f"), (m.get("informed_identified"), ".2f"),
                     (m.get("chance"), ".1e"), (m.get("bound"), ".3f"), (m.get("chance_mask"), ".2f"),
                     (m.get("bound_mask"), ".2f"), (m.get("patient_identified"), ".2f"),
                     (m.get("patient_chance"), ".3f"), (m.get("bound_patient"), ".2f"),
                     (m.get("bound_patient_mask"), ".2f"), (m.get("seconds"), ".0f")]
            lines.append(f"| {a['level']} | {s.get('scored', 0)} | " + " | ".join(_fmt(v, f) for v, f in cells) + " |")
    lines += privacy_audit_table(results)
    lines += [""]
    for key, title in (("privacy_utility", "Privacy and utility"), ("reconstructions", "Example reconstructions")):
        if key in figures:
            lines += [f"![{title}]({figures[key].as_posix()})", ""]
    return "\n".join(lines)
