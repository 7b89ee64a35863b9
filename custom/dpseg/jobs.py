"""NVFlare job folders: copies of the shipped jobs (``jobs/``) with other job arguments.

A job's arguments are the variables at the top of its config JSONs (``"num_rounds": 20`` used as
``"{num_rounds}"``); components' own arguments (the persistor's ``seed``, the learner's
``seed``) are set by component id or class.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

JOBS_DIR = Path(__file__).resolve().parents[2] / "jobs"
SERVER_CONFIG = Path("app") / "config" / "config_fed_server.json"
CLIENT_CONFIG = Path("app") / "config" / "config_fed_client.json"


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
                                          (CLIENT_CONFIG, client_args, "dpseg.learner.SiteLearner", learner_args)):
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


def simulator_command(job: Path, workspace: Path, clients: list[str]) -> list[str]:
    """``nvflare simulator JOB -w WORKSPACE -c CLIENTS -t N`` (one process per client), with dpseg
    allowed in the workspace."""
    from dpseg.workspace import allow_dpseg

    allow_dpseg(workspace)
    nvflare = Path(sys.executable).parent / "nvflare"
    return [str(nvflare), "simulator", str(job), "-w", str(workspace), "-c", ",".join(clients),
            "-t", str(len(clients))]


def run_simulator(job: Path, workspace: Path, env: dict, clients: list[str], timeout: float = 3600,
                  log: Path | None = None) -> subprocess.CompletedProcess:
    """``simulator_command`` run to the end with the given site environment. Output goes to
    ``log`` if given, else is captured."""
    cmd = simulator_command(job, workspace, clients)
    if log is None:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env})
    with open(log, "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              env={**os.environ, **env})
