"""Where a site keeps its audit results, and the little an audit may send to the server.

Threat model: the audit scores reconstructions against the site's TRAINING slices. Nothing of
that is differentially private and none of it is counted in the site's privacy ledger, so by
default none of it leaves the site: reconstructions, per-update scores, ranks, cohort sizes and
realised batch sizes are kept in ``<site workspace>/dpseg_audit/<job id>/`` (``audit_results.json``
and one ``round<r>/`` folder of images per scored update), readable there with ``dpseg report``.
The server gets an acknowledgement that holds no data-dependent value (``acknowledgement``).

A site may choose to release aggregate metrics (its setting ``audit_release``, see
``dpseg.site.audit_release``): means over its scored updates of ``RELEASED_KEYS`` only, never
per-update values, ranks, counts or batch sizes, and only over at least ``MIN_RELEASED_UPDATES``
scored updates. Such values are NOT DP-protected; every place that shows them says so
(``NOT_DP_NOTE``). Whether anything is released at all still depends on how many updates held a
patient; that, and the time an audit takes, are not protected either.

Plain library: no NVFlare, no torch. The wire names of the audit's reply live here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from dpseg.files import write_whole

SITE_AUDIT_DIR = "dpseg_audit"  # <site workspace>/dpseg_audit/<job id>/
SITE_RESULTS_FILE = "audit_results.json"

RELEASE_NONE = "none"
RELEASE_AGGREGATE = "aggregate"
RELEASE_CHOICES = (RELEASE_NONE, RELEASE_AGGREGATE)
RELEASED_KEYS = ("ssim", "psnr", "mse", "baseline_ssim", "identified", "patient_identified", "baseline_identified",
                 "baseline_patient_identified")
MIN_RELEASED_UPDATES = 2  # a mean over one update of one slice would be that slice's values
NOT_DP_NOTE = ("NOT DP-protected: aggregate audit metrics released by the site's choice (its audit_release "
               "setting); computed from its training slices and not counted in its privacy ledger")
KEPT_NOTE = (f"kept at the sites: <site workspace>/{SITE_AUDIT_DIR}/<job id>/{SITE_RESULTS_FILE} with the "
             "reconstructions (read them there with `dpseg report`); the server gets an acknowledgement from each "
             "site, and aggregate means (NOT DP-protected) only from a site whose audit_release setting releases them")

# the reply's fields (DXO data of the audit task's result)
REPLY_STATUS = "status"
REPLY_RELEASE = "release"
REPLY_RELEASED = "released"
STATUS_KEPT = "kept at the site"


def site_audit_folder(site_root: Path, job_id: str) -> Path:
    """The folder where a site keeps one job's audit: ``<site_root>/dpseg_audit/<job_id>/``."""
    return Path(site_root) / SITE_AUDIT_DIR / job_id


def released_means(rows: list[dict]) -> dict[str, float] | None:
    """Means of ``RELEASED_KEYS`` over the scored rows (those with an SSIM), or None when fewer
    than ``MIN_RELEASED_UPDATES`` updates were scored. Rows: per-update metrics as
    ``dpseg.auditor.audit_update`` returns them."""
    scored = [r for r in rows if "ssim" in r]
    if len(scored) < MIN_RELEASED_UPDATES:
        return None
    means = {}
    for key in RELEASED_KEYS:
        values = [float(r[key]) for r in scored if key in r]
        if len(values) == len(scored):
            means[key] = sum(values) / len(values)
    return means


def marked(means: dict[str, float]) -> dict:
    """Released means as they travel and are shown: ``{"dp_protected": False, "note": NOT_DP_NOTE,
    "means": {...}}``."""
    return {"dp_protected": False, "note": NOT_DP_NOTE, "means": dict(means)}


def acknowledgement(release: str, means: dict[str, float] | None) -> dict:
    """The audit task's reply: a status with no data-dependent value, the site's release choice,
    and with ``release`` "aggregate" and enough scored updates the marked means."""
    reply = {REPLY_STATUS: STATUS_KEPT, REPLY_RELEASE: release}
    if release == RELEASE_AGGREGATE and means is not None:
        reply[REPLY_RELEASED] = marked(means)
    return reply


def received(reply: dict) -> dict:
    """What the server keeps of a site's reply: the status, the release choice, and released
    means (``RELEASED_KEYS`` with finite numbers only, marked again); anything else is dropped."""
    out = {"status": str(reply.get(REPLY_STATUS, "")), "release": str(reply.get(REPLY_RELEASE, RELEASE_NONE))}
    released = reply.get(REPLY_RELEASED)
    if out["release"] == RELEASE_AGGREGATE and isinstance(released, dict) and isinstance(released.get("means"), dict):
        means = {k: float(v) for k, v in released["means"].items() if k in RELEASED_KEYS
                 and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        out["released"] = marked(means)
    return out


def write_site_results(folder: Path, site: str, job_id: str, attack: dict, release: str, rows: list[dict],
                       released: dict[str, float] | None = None) -> Path:
    """Write ``folder/audit_results.json`` (whole or not at all): the site, the job, the attack as
    the job set it, the site's release choice, what it released (marked) and one row per audited
    update (``site``, ``round`` and its metrics, or ``error``). Returns the file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"site": site, "job_id": job_id, "kept": "at the site: nothing here was sent to the server",
              "attack": attack, "release": release, "released": marked(released) if released is not None else None,
              "updates": rows}
    text = json.dumps(record, indent=1) + "\n"
    return write_whole(folder / SITE_RESULTS_FILE, lambda tmp: tmp.write_text(text))


def find_site_results(folder: Path) -> list[Path]:
    """Every ``audit_results.json`` under ``folder`` (a site's workspace, one job's audit folder,
    or a simulator workspace holding several sites), sorted by path."""
    folder = Path(folder)
    if folder.is_file():
        return [folder] if folder.name == SITE_RESULTS_FILE else []
    return sorted(folder.rglob(SITE_RESULTS_FILE)) if folder.is_dir() else []


def read_site_results(paths: list[Path]) -> dict:
    """The kept results of ``paths`` together: ``attack`` (the same in every file, else ValueError
    naming the files), ``updates`` (every file's rows, by round and site), ``released`` (per site,
    what it released, or None) and ``files``."""
    records = [(Path(p), json.loads(Path(p).read_text())) for p in paths]
    attacks = {json.dumps(r.get("attack"), sort_keys=True) for _, r in records}
    if len(attacks) > 1:
        raise ValueError(f"audit results of different attacks: {', '.join(str(p) for p, _ in records)}")
    rows = sorted((row for _, r in records for row in r.get("updates", [])), key=lambda r: (r["round"], r["site"]))
    return {"attack": records[0][1].get("attack") if records else None, "updates": rows,
            "released": {r.get("site"): r.get("released") for _, r in records}, "files": [str(p) for p, _ in records]}
