"""Running a job in the NVFlare simulator, as the study, the benchmarks and the end-to-end tests do:
the command (``nvflare simulator``, on a workspace prepared as ``dpseg init-workspace`` does), a
watched run of it, and starting again a run in which the simulator built two workers as one site
(``dpseg.simulator``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from dpseg.simulator import SIMULATOR_RACE, WORKER_MIXUP


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
