import numpy as np
import pytest
import torch

from dpseg.canaries import CANARY_NORM, CanaryInjector, CanarySet, trained_parameters
from dpseg.datalist import resolve
from dpseg.dptrain import LocalTrainer, PatientSlices
from dpseg.privacy import Accountant, PrivacyPlan


def test_canary_directions_are_unit_reproducible_per_site_and_each_canary_is_in_by_a_fair_coin():
    canaries = CanarySet(400, 3, "site-1", [10, 20])
    u = canaries.direction(7)
    assert u.shape == (30,) and float(u.norm()) == pytest.approx(1.0)
    assert torch.equal(u, CanarySet(400, 3, "site-1", [10, 20]).direction(7))
    assert not torch.equal(u, CanarySet(400, 3, "site-2", [10, 20]).direction(7))
    assert not torch.equal(u, CanarySet(400, 4, "site-1", [10, 20]).direction(7))
    assert 0.4 < canaries.member.mean() < 0.6
    assert not np.array_equal(canaries.member, CanarySet(400, 3, "site-2", [10, 20]).member)
    scores = canaries.scores(3.0 * u)
    assert scores[7] == pytest.approx(1.0) and scores.shape == (400,)
    with pytest.raises(ValueError, match="at least 2"):
        CanarySet(1, 0, "site-1", [3])


def test_a_sampled_canary_is_clipped_to_c_and_enters_the_step_like_a_patient(bundle, cohort):
    data = PatientSlices(resolve(cohort / "site-1" / "datalist.json", "training"), bundle.train_transforms())
    net = bundle.network()
    # no patient is ever sampled and the noise is ~0: the step's update is the canary's alone
    plan = PrivacyPlan(8.0, 1e-5, 1.0, 2, 1e-9, 4, "rdp", 1e-9)
    trainer = LocalTrainer(net, bundle.loss(), data, 1.0, 2, Accountant(plan), optimizer="sgd")
    named = trained_parameters(net)
    canaries = CanarySet(20, 5, "site-1", [p.numel() for _, p in named])
    first_in = int(np.flatnonzero(canaries.member)[0])
    trainer.per_sample_hook = injector = CanaryInjector(canaries, [p for _, p in named], 1.0, lambda n: [0])
    before = torch.cat([p.detach().reshape(-1).clone() for _, p in named])
    trainer.run(1)
    after = torch.cat([p.detach().reshape(-1) for _, p in named])
    trainer.close()
    step = (before - after) * 2  # SGD at lr 1 divided by the expected batch 2: the clipped sum
    assert injector.sampled == 1
    assert float(step.norm()) == pytest.approx(1.0, rel=1e-4)  # CANARY_NORM x C, clipped to C
    assert float(step @ canaries.direction(first_in)) == pytest.approx(1.0, rel=1e-4)
    assert CANARY_NORM > 1
    with pytest.raises(ValueError, match="do not match"):
        CanaryInjector(canaries, [p for _, p in named][1:], 1.0, lambda n: [])
