"""The adjacency the guarantee states (add/remove one patient) matches what a site sends: nothing
the server receives besides the DP-protected weights depends on the number of training patients."""

import json
import shutil

from conftest import datalist_items
from dpseg.jobs import site_ledgers
from dpseg.report import find_run_dir
from dpseg.wire import ROUNDS_FILE
from test_simulator import prepare_job, run_simulator


def test_two_cohorts_one_training_patient_apart_send_the_same_meta(cohort, tmp_path):
    """site-2 holds site-1's data plus one training patient (same validation patients): in a DP
    round both must report identical meta (privacy, steps, FedAvg weight, validation metrics)."""
    root = tmp_path / "data"
    shutil.copytree(cohort / "site-1", root / "site-1")
    shutil.copytree(cohort / "site-1", root / "site-2")
    extra = datalist_items(cohort / "site-2" / "datalist.json")[0]
    for key in ("image", "label"):
        (root / "site-2" / extra[key]).write_bytes((cohort / "site-2" / extra[key]).read_bytes())
    datalist = json.loads((root / "site-2" / "datalist.json").read_text())
    datalist["training"].append({**extra, "patient": "extra-patient"})
    (root / "site-2" / "datalist.json").write_text(json.dumps(datalist))
    assert len(datalist["training"]) == len(datalist_items(root / "site-1" / "datalist.json")) + 1

    job = prepare_job("fed_dp", tmp_path, rounds=1, batch_size=2, sample_rate=0.5, local_steps=2)
    env = {"DPSEG_DATA_ROOT": str(root),
           "DPSEG_LEDGER": site_ledgers(tmp_path / "ledgers", ["site-1", "site-2"], total_epsilon=20)}
    result = run_simulator(job, tmp_path / "ws", env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (round0,) = json.loads((find_run_dir(tmp_path / "ws") / ROUNDS_FILE).read_text())
    small, large = (round0["sites"][site]["meta"] for site in ("site-1", "site-2"))
    assert small["privacy"]["adjacency"] == "add/remove one patient" and small["privacy"]["epsilon"] > 0
    for meta in (small, large):  # the ledger entry's name: the simulator's job id, a time and a random token
        assert meta["privacy"].pop("ledger_entry").startswith("simulate_job-")
    assert small == large
