"""dpseg.wire: one home for the names site, server and tools share, and the typed privacy meta."""

import re

import pytest

from conftest import REPO
from dpseg import wire
from dpseg.wire import PrivacyMeta

DP = dict(dp=True, adjacency="add/remove one patient", epsilon=7.99, delta=1e-5, target_epsilon=8.0,
          noise_multiplier=2.476, sample_rate=0.25, steps=240, planned_steps=240, max_grad_norm=1.0, batch_size=16,
          accountant="prv", ledger_entry="job-1")


def test_the_privacy_meta_goes_to_a_dict_and_back_and_refuses_anything_else():
    meta = PrivacyMeta(**DP)
    assert PrivacyMeta.from_dict(meta.to_dict()) == meta and meta.to_dict() == {**DP, "unit": "patient"}
    assert PrivacyMeta(dp=False).to_dict() == {"dp": False, "unit": "patient"}
    for bad, message in (({**DP, "patients": 40}, "unknown key"), ({**DP, "steps": 2.5}, "steps must be"),
                         ({**DP, "dp": 1}, "dp must be"), ({"dp": True, "epsilon": 1.0}, "without its epsilon"),
                         ({"epsilon": 1.0}, "without 'dp'"), ("dp", "must be a mapping")):
        with pytest.raises(ValueError, match=message):
            PrivacyMeta.from_dict(bad)


def test_each_shared_name_is_written_out_once_in_the_package():
    names = {k: v for k, v in vars(wire).items() if k.isupper() and isinstance(v, str) and v.startswith("dpseg_")}
    assert {"ERROR_HEADER", "ROUNDS_FILE", "REJECTED_FILE", "AUDIT_FILE", "RESUME_FILE", "SITE_ROUNDS_FILE"} <= set(names)
    for path in (REPO / "custom" / "dpseg").glob("*.py"):
        if path.name == "wire.py":
            continue
        text = path.read_text()
        for name, value in names.items():
            assert not re.search(rf"[\"']{re.escape(value)}[\"']", text), f"{path.name} writes {value!r} out: use wire.{name}"
