"""dpseg.tools.simulation: watching a simulator-like process (race signature, watch callback, timeout)."""

import subprocess
import sys
import time

import pytest

from dpseg.simulator import SIMULATOR_RACE, check_simulator_worker
from dpseg.tools.simulation import run_watched


def script(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_finished_process_gives_its_code_and_output(tmp_path):
    result, aborted = run_watched(script("print('round 0 done'); raise SystemExit(3)"), {}, timeout=60)
    assert (result.returncode, aborted) == (3, False)
    assert result.stdout == "round 0 done\n"
    log = tmp_path / "run.log"
    result, _ = run_watched(script("import os; print(os.environ['DPSEG_X'])"), {"DPSEG_X": "site-1"}, 60, log)
    assert result.returncode == 0 and result.stdout is None and log.read_text() == "site-1\n"


def test_the_race_line_kills_the_process_at_once():
    start = time.monotonic()
    code = f"import time; print('Connection CN5 is evicted {SIMULATOR_RACE} 1', flush=True); time.sleep(60)"
    result, aborted = run_watched(script(code), {}, timeout=60)
    assert aborted and result.returncode == -9 and time.monotonic() - start < 20


def test_watch_stops_the_process_and_timeout_raises(tmp_path):
    flag = tmp_path / "flag"
    code = f"import time, pathlib; time.sleep(1); pathlib.Path({str(flag)!r}).touch(); time.sleep(60)"
    start = time.monotonic()
    result, aborted = run_watched(script(code), {}, timeout=60, watch=flag.exists)
    assert not aborted and result.returncode == -9 and time.monotonic() - start < 20
    with pytest.raises(subprocess.TimeoutExpired):
        run_watched(script("import time; time.sleep(60)"), {}, timeout=1)


def test_a_worker_built_as_another_site_stops_the_simulator():
    simulator = subprocess.Popen(script("import time; time.sleep(60)"))
    worker = ["/x/simulator_worker.py", "-o", "ws/site-2", "--client", "site-2", "--parent_pid", str(simulator.pid)]
    check_simulator_worker("site-2", worker)  # built as the site it was started for: nothing happens
    check_simulator_worker("site-1", ["/x/nvflare", "simulator", "job"])  # not a worker: nothing happens
    assert simulator.poll() is None
    with pytest.raises(RuntimeError, match="started for site-2 was built as site-1"):
        check_simulator_worker("site-1", worker)
    assert simulator.wait(timeout=10) == -9


def test_the_server_components_the_jobs_name_load_no_site_code_and_no_opacus():
    import json

    from conftest import REPO

    paths = sorted({c["path"] for f in REPO.glob("jobs/*/app/config/config_fed_server.json")
                    for part in ("components", "workflows") for c in json.loads(f.read_text()).get(part, [])
                    if c["path"].startswith("dpseg.")}
                   | {f["path"] for f in REPO.glob("jobs/*/app/config/config_fed_server.json")
                      for group in json.loads(f.read_text()).get("task_result_filters", []) for f in group["filters"]
                      if f["path"].startswith("dpseg.")}
                   | {"dpseg.updatesums.UpdateSums"})  # named by the one-run audit's copies of a job
    assert {"dpseg.server.BundlePersistor", "dpseg.updatefilter.UpdateFilter", "dpseg.auditjob.AuditController"} <= set(paths)
    code = ("import importlib, json, sys\n"
            f"for path in {paths!r}:\n"
            "    module, name = path.rsplit('.', 1)\n"
            "    getattr(importlib.import_module(module), name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus' or m in "
            "('dpseg.learner', 'dpseg.auditor', 'dpseg.dptrain', 'dpseg.fastdp', 'dpseg.privacy', 'dpseg.site', 'dpseg.canaries'))))")
    done = subprocess.run(script(code), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []
