"""NVFlare job folders: copies of the shipped jobs (``jobs/``) with other job arguments.

A job's arguments are the variables at the top of its config JSONs (``"num_rounds": 20`` used as
``"{num_rounds}"``); components' own arguments (the persistor's ``seed``, the learner's
``seed``) are set by component id or class.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dpseg.shipped import shipped
from dpseg.simulator import SIMULATOR_RACE, WORKER_MIXUP
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


def simulator_command(job: Path, workspace: Path, clients: list[str], prepare: bool = True) -> list[str]:
    """``nvflare simulator JOB -w WORKSPACE -c CLIENTS -t N`` (one process per client), in a
    workspace prepared as ``dpseg init-workspace`` does. ``prepare=False``: the command as a new
    user types it, ``nvflare simulator JOB -w WORKSPACE -n N -t N`` (clients site-1 .. site-N) on
    the workspace as it is."""
    nvflare = Path(sys.executable).parent / "nvflare"
    if not prepare:
        if clients != [f"site-{i + 1}" for i in range(len(clients))]:
            raise ValueError(f"-n {len(clients)} names the sites site-1 .. site-{len(clients)}, not {clients}")
        return [str(nvflare), "simulator", str(job), "-w", str(workspace), "-n", str(len(clients)),
                "-t", str(len(clients))]
    from dpseg.workspace import init_workspace

    init_workspace(workspace)
    return [str(nvflare), "simulator", str(job), "-w", str(workspace), "-c", ",".join(clients),
            "-t", str(len(clients))]


def run_watched(cmd: list[str], env: dict, timeout: float, log: Path | None = None,
                abort_on: tuple[str, ...] = (SIMULATOR_RACE, WORKER_MIXUP), watch: Callable[[], bool] | None = None
                ) -> tuple[subprocess.CompletedProcess, bool]:
    """Run ``cmd`` in a session of its own with ``env`` added, its output (stdout and stderr) to
    ``log`` or captured. ``watch`` is called about every 0.2 s; once it returns True the process is
    killed (SIGKILL to its session) and its result returned. Returns (result, aborted): aborted is
    True if a line containing one of ``abort_on`` appeared (the process is then killed too). Raises
    ``subprocess.TimeoutExpired`` after ``timeout`` s (process killed)."""
    out = open(log, "w") if log is not None else None
    lines: list[str] = []
    seen = threading.Event()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env}, start_new_session=True)

    def pump() -> None:
        for line in proc.stdout:
            out.write(line) if out else lines.append(line)
            if any(text in line for text in abort_on):
                seen.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and not seen.is_set() and not (watch and watch()):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout, output="".join(lines))
            seen.wait(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
        if out:
            out.close()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout=None if log else "".join(lines)), seen.is_set()


def run_simulator(job: Path, workspace: Path, env: dict, clients: list[str], timeout: float = 3600,
                  log: Path | None = None, attempts: int = 3, watch: Callable[[], bool] | None = None,
                  prepare: bool = True) -> subprocess.CompletedProcess:
    """``simulator_command`` (``prepare``: see there) run to the end (or until ``watch`` returns
    True, see ``run_watched``) with the given site environment. Output goes to ``log`` if given,
    else is captured. If the simulator builds two workers as one site (``SIMULATOR_RACE``,
    ``WORKER_MIXUP``), the run is killed and started again in an emptied workspace, at most
    ``attempts`` times in all; what a killed attempt spent stays in the sites' ledgers (each attempt
    is a ledger entry of its own)."""
    cmd = simulator_command(job, workspace, clients, prepare)
    for attempt in range(1, attempts + 1):
        result, raced = run_watched(cmd, env, timeout, log, watch=watch)
        if not raced:
            return result
        kept = ""
        if log is not None:
            kept = f", its log kept as {log.rename(log.with_name(f'{log.name}.attempt{attempt}')).name}"
        print(f"simulator: two workers started as one site (NVFlare simulator race), attempt {attempt} of "
              f"{attempts} killed{kept}; starting again", file=sys.stderr, flush=True)
        for item in Path(workspace).iterdir():
            if item.name != "local":  # keep the workspace settings, drop the run
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    raise RuntimeError(f"the NVFlare simulator started two workers as one site in {attempts} attempts "
                       f"running {job}")
