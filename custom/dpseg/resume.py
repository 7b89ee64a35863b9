"""Continue a stopped federated job: a new job folder that starts from its resume point.

A stopped job (server killed, job aborted) leaves on the server the global model after its last
completed round (``dpseg_resume.pt``, written by ``dpseg.server.BundlePersistor``) and, in
``dpseg_rounds.json``, the ledger entry each site reported with its updates. ``resume_job``
copies the job folder and changes only what resuming needs:

- server: the workflow's ``start_round`` is the next round, ``num_rounds`` the rounds left, and
  the persistor starts from the saved model (``app/resume/global_model.pt``);
- sites: the learner's ``resume`` maps each site to its ledger entry, so the site's accountant
  continues from the state saved in its own ledger (epsilon does not restart at zero; a site whose
  entry is missing or whose settings differ refuses, see ``dpseg.privacy.continue_accountant``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from dpseg.jobs import CLIENT_CONFIG, SERVER_CONFIG, SITE_LEARNER, find_component
from dpseg.wire import RESUME_FILE, ROUNDS_FILE, PrivacyMeta

RESUME_MODEL = "resume/global_model.pt"
RESUME_AVERAGE = "resume/average_model.pt"
WORKFLOW = "ScatterAndGather"


class ResumeError(RuntimeError):
    """The stopped job cannot be resumed; the message says why and names the file."""


def find_one(root: Path, name: str) -> Path:
    """The single file called ``name`` under ``root`` (a simulator workspace or a job's folder)."""
    found = sorted(Path(root).rglob(name))
    if not found:
        raise ResumeError(f"no {name} under {root}: not the workspace of a dpseg job, or the job "
                          "stopped before its first round completed")
    if len(found) > 1:
        raise ResumeError(f"{len(found)} files called {name} under {root}; point at one job: "
                          + ", ".join(str(p) for p in found))
    return found[0]


def ledger_entries(rounds_file: Path) -> dict[str, str]:
    """Each site's ledger entry, from the privacy meta of its latest recorded update."""
    entries: dict[str, str] = {}
    for rec in json.loads(rounds_file.read_text()):
        for site, contribution in rec.get("sites", {}).items():
            privacy = contribution.get("privacy")
            entry = PrivacyMeta.from_dict(privacy).ledger_entry if privacy else None
            if entry:
                entries[site] = entry
    return entries


def _config(path: Path) -> dict:
    if not path.is_file():
        raise ResumeError(f"{path} is missing: not an NVFlare job folder with one app")
    return json.loads(path.read_text())


def _set_arg(config: dict, args: dict, name: str, value) -> None:
    """Set a component argument, or the job variable it refers to (``"{name}"``)."""
    current = args.get(name)
    if isinstance(current, str) and current.startswith("{") and current.endswith("}"):
        config[current[1:-1]] = value
    else:
        args[name] = value


def _component(config: dict, marker: str, config_file: Path) -> dict:
    try:
        return find_component(config, marker)
    except KeyError:
        raise ResumeError(f"{config_file} has no component {marker}") from None


def resume_job(run: Path, job: Path, out: Path) -> dict:
    """Write ``out``: ``job`` resumed from the stopped run's resume point found under ``run``.

    Returns a summary: the next round, the rounds left, the end round, each site's ledger entry.
    """
    point_file = find_one(run, RESUME_FILE)
    point = torch.load(point_file, map_location="cpu", weights_only=True)
    next_round, end = int(point["completed_round"]) + 1, int(point["end_round"])
    if next_round >= end:
        raise ResumeError(f"{point_file}: the job completed all its rounds ({end}); nothing to resume")
    entries = ledger_entries(find_one(run, ROUNDS_FILE))
    if out.exists():
        raise ResumeError(f"{out} exists; choose a new folder for the resumed job")
    server_file, client_file = job / SERVER_CONFIG, job / CLIENT_CONFIG
    server, client = _config(server_file), _config(client_file)

    workflow = _component(server, WORKFLOW, server_file)
    workflow["args"]["start_round"] = next_round
    _set_arg(server, workflow["args"], "num_rounds", end - next_round)
    persistor_id = workflow["args"].get("persistor_id", "persistor")
    persistor = _component(server, persistor_id, server_file)
    if "dpseg.server.BundlePersistor" not in persistor.get("path", ""):
        raise ResumeError(f"{server_file}: the persistor {persistor_id!r} is not dpseg.server.BundlePersistor")
    persistor.setdefault("args", {})["resume_model"] = RESUME_MODEL
    if "average" in point:  # the job averages its global models: the average goes on too
        persistor["args"]["resume_average"] = RESUME_AVERAGE
    _component(client, SITE_LEARNER, client_file).setdefault("args", {})["resume"] = entries

    shutil.copytree(job, out)
    (out / SERVER_CONFIG).write_text(json.dumps(server, indent=4) + "\n")
    (out / CLIENT_CONFIG).write_text(json.dumps(client, indent=4) + "\n")
    model_file = out / "app" / RESUME_MODEL
    model_file.parent.mkdir(parents=True)
    torch.save(point["model"], model_file)
    if "average" in point:
        torch.save(point["average"], out / "app" / RESUME_AVERAGE)
    return {"next_round": next_round, "rounds_left": end - next_round, "end_round": end,
            "ledger_entries": entries, "resume_point": str(point_file)}
