"""NVFlare job folders: copies of the shipped jobs (``jobs/``) with other job arguments, and the
privacy ledgers a job's sites need (running a job in the simulator: ``dpseg.tools.simulation``).

A job's arguments are the variables at the top of its config JSONs (``"num_rounds": 20`` used as
``"{num_rounds}"``); components' own arguments (the persistor's ``seed``, the learner's
``seed``) are set by component id or class.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from dpseg.shipped import shipped
from dpseg.site import DEFAULT_TOTAL_DELTA

JOBS_DIR = shipped("jobs")
SERVER_CONFIG = Path("app") / "config" / "config_fed_server.json"
CLIENT_CONFIG = Path("app") / "config" / "config_fed_client.json"
SITE_LEARNER = "dpseg.learner.SiteLearner"  # the executor the training jobs name at each site


def job_attack(job: Path = JOBS_DIR / "fed_dp_audit") -> dict:
    """The audit job's attack settings: every ``attack_*`` argument of its server config, without
    the prefix (iterations, restarts, prior, ...; see ``dpseg.inversion.AttackSettings``)."""
    server = json.loads((job / SERVER_CONFIG).read_text())
    return {k.removeprefix("attack_"): v for k, v in server.items() if k.startswith("attack_")}


def find_component(config: dict, marker: str) -> dict:
    """The first component, workflow or executor whose id is ``marker`` or whose path contains it."""
    items = config.get("components", []) + config.get("workflows", []) + \
        [e.get("executor", {}) for e in config.get("executors", [])]
    for item in items:
        if marker == item.get("id") or marker in item.get("path", ""):
            return item
    raise KeyError(f"no component {marker!r} in the job config")


def component_args(config: dict, marker: str) -> dict:
    """The ``args`` of ``find_component(config, marker)``."""
    return find_component(config, marker).setdefault("args", {})


def configure_job(source: Path, dest: Path, server_args: dict | None = None, client_args: dict | None = None,
                  persistor_args: dict | None = None, learner_args: dict | None = None) -> Path:
    """Copy job folder ``source`` to ``dest`` with other job arguments (server / client config
    variables) and component arguments (the persistor's, the site learner's). Returns ``dest``."""
    if dest.exists():
        raise FileExistsError(f"{dest} exists")
    shutil.copytree(source, dest)
    for rel, variables, marker, extra in ((SERVER_CONFIG, server_args, "persistor", persistor_args),
                                          (CLIENT_CONFIG, client_args, SITE_LEARNER, learner_args)):
        path = dest / rel
        config = json.loads(path.read_text())
        unknown = set(variables or {}) - set(config)
        if unknown:
            raise KeyError(f"{path}: no job argument(s) {sorted(unknown)}")
        config.update(variables or {})
        if extra:
            component_args(config, marker).update(extra)
        path.write_text(json.dumps(config, indent=1) + "\n")
    return dest


def site_ledgers(folder: Path, sites: list[str], total_epsilon: float,
                 total_delta: float = DEFAULT_TOTAL_DELTA) -> str:
    """Create a new privacy ledger ``<folder>/<site>.json`` for each site with the given totals
    (as ``dpseg ledger init`` does); returns the ``DPSEG_LEDGER`` setting that names them
    (``<folder>/{site}.json``)."""
    from dpseg.ledger import Ledger

    for site in sites:
        Ledger.create(Path(folder) / f"{site}.json", total_epsilon, total_delta)
    return str(Path(folder) / "{site}.json")
