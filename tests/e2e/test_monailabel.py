"""The bundle in the real MONAI Label 0.8.5 server (its own environment, built by make when its
cache folder is absent): /info lists the model with the label liver, /infer returns a label volume
with the input's shape and affine and a Dice >= 0.8 with the shipped weights, and the bundle's
plausibility report in its params (no flag on the synthetic abdomens; a report for the head
phantom too), /train completes."""

import json
import subprocess

from conftest import REPO
from test_provisioned import free_port, leftover_pids


def test_make_monailabel_check(tmp_path):
    work = tmp_path / "mlc"
    done = subprocess.run(["make", "-C", str(REPO), "monailabel-check", f"MLCHECK={work}",
                           f"MLCHECK_PORT={free_port()}"], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    assert "ct_liver_seg labels ['liver']" in out and "shape and affine of the input" in out
    figures = json.loads(out[out.index("{\n"):out.rindex("}") + 1])
    assert figures["patients"] == 3 and min(figures["dice"]) >= 0.8 and figures["train_status"] == "DONE"
    assert figures["plausibility_flags"] == [[], [], []] and isinstance(figures["head_flags"], list)
    assert "(a head, the wrong input): plausibility flags" in out
    assert not leftover_pids(str(work))  # the server was stopped
