"""The NVFlare simulator, as the code that runs in it sees it: its job id and its worker race.

Site code (the learner, the auditor) runs unchanged in the simulator, where every site is a worker
process of one machine; what it needs to know about that is here, apart from the tooling that
starts simulator runs (``dpseg.tools.simulation``).
"""

from __future__ import annotations

import os
import signal
import sys

SIMULATOR_JOB_ID = "simulate_job"  # the job id of every simulator run


# NVFlare 2.9's simulator hands each worker process its site name through one dict shared by its
# worker threads (SimulatorClientRunner.do_one_task sets build_ctx["client_name"] just before sending
# it). When two threads hand a worker its site at about the same time, both workers can be built as
# the same site: the server then evicts one connection after the other with this message and waits
# forever for the site nobody plays.
SIMULATOR_RACE = "for exceeding limit"
# What a worker built as the wrong site prints (``check_simulator_worker``) before ending the run.
WORKER_MIXUP = "simulator worker built as the wrong site"


def check_simulator_worker(site: str, argv: list[str] | None = None) -> None:
    """In an NVFlare simulator worker process (``argv``: ``simulator_worker ... --client NAME
    --parent_pid PID``), check that NVFlare built it as the site it was started for. If not (the
    race above), print ``WORKER_MIXUP`` with both names, SIGKILL the simulator (whose run could only
    hang) and raise RuntimeError. Does nothing outside a simulator worker."""
    argv = sys.argv if argv is None else argv
    if not argv or "simulator_worker" not in argv[0] or "--client" not in argv:
        return
    started_for = argv[argv.index("--client") + 1]
    if started_for == site:
        return
    message = (f"{WORKER_MIXUP}: the worker started for {started_for} was built as {site} (a race in "
               f"NVFlare's simulator); the run cannot complete and is stopped; start it again")
    print(message, flush=True)
    if "--parent_pid" in argv:
        os.kill(int(argv[argv.index("--parent_pid") + 1]), signal.SIGKILL)
    raise RuntimeError(message)
