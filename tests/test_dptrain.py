import pytest
import torch

from dpseg.datalist import resolve
from dpseg.dptrain import LocalTrainer, PatientSlices, StepStats, poisson_sample
from dpseg.privacy import Accountant, calibrate


def _data(bundle, cohort):
    return PatientSlices(resolve(cohort / "site-1" / "datalist.json", "training"), bundle.train_transforms())


def test_poisson_sample_rate():
    g = torch.Generator().manual_seed(0)
    sizes = [len(poisson_sample(100, 0.2, g)) for _ in range(300)]
    assert abs(sum(sizes) / len(sizes) - 20) < 1.0
    assert len({tuple(poisson_sample(10, 0.5, g)) for _ in range(20)}) > 10


def test_empty_poisson_batches_still_add_noise_under_dp(bundle, cohort):
    data = _data(bundle, cohort)
    net = bundle.network()
    settings = calibrate(8.0, 1e-5, 1.0, 1, 4, 3)
    settings = type(settings)(**{**settings.__dict__, "sample_rate": 1e-9})  # force empty samples
    acc = Accountant(settings)
    trainer = LocalTrainer(net, bundle.loss(), data, 1e-3, 1, acc, seed=0)
    before = [p.detach().clone() for p in net.parameters()]
    stats = trainer.run(3)
    trainer.close()
    assert stats.steps == 3 and stats.empty_steps == 3 and stats.samples == 0
    assert acc.steps == 3  # every step is accounted for
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_empty_batches_without_dp_change_nothing(bundle, cohort):
    data = _data(bundle, cohort)
    net = bundle.network()
    trainer = LocalTrainer(net, bundle.loss(), data, 1e-3, 1, None, seed=0)
    trainer.sample_rate = 1e-9
    before = [p.detach().clone() for p in net.parameters()]
    stats = trainer.run(2)
    assert stats.empty_steps == 2
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_dp_training_keeps_plain_state_dict_keys(bundle, cohort):
    data = _data(bundle, cohort)
    net = bundle.network()
    keys = list(net.state_dict())
    acc = Accountant(calibrate(8.0, 1e-5, 1.0, 2, 4, 2))
    trainer = LocalTrainer(net, bundle.loss(), data, 1e-3, 2, acc, seed=1)
    stats = trainer.run(2)
    trainer.close()
    assert stats.steps == 2 and acc.steps == 2
    assert list(net.state_dict()) == keys
    assert not any(k.startswith("_module.") for k in net.state_dict())
    fresh = bundle.network()
    fresh.load_state_dict(net.state_dict(), strict=True)


def test_step_stats_mean_loss():
    s = StepStats(loss_sum=3.0, loss_count=2)
    assert s.mean_loss == 1.5



def test_fixed_sampling_is_refused_with_dp_and_records_exact_batches_without(bundle, cohort):
    data = _data(bundle, cohort)
    acc = Accountant(calibrate(8.0, 1e-5, 1.0, 1, 4, 2))
    with pytest.raises(ValueError, match="Poisson"):
        LocalTrainer(bundle.network(), bundle.loss(), data, 1e-3, 1, acc, sampling="fixed")
    trainer = LocalTrainer(bundle.network(), bundle.loss(), data, 0.01, 1, None, seed=0, sampling="fixed",
                           record=True)
    stats = trainer.run(2)
    assert stats.samples == 2 and len(trainer.batches) == 2
    for batch in trainer.batches:
        assert len(batch["patients"]) == 1 and type(batch["images"]) is torch.Tensor  # plain tensors
        assert batch["images"].shape == (1, 1, 128, 128) and batch["labels"].shape == (1, 1, 128, 128)
    # SGD: one step's update is exactly -lr * the gradient of the recorded batch
    net = bundle.network()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    trainer = LocalTrainer(net, bundle.loss(), data, 0.01, 1, None, seed=3, optimizer="sgd", sampling="fixed",
                           record=True)
    trainer.run(1)
    replay = bundle.network()
    replay.load_state_dict({**replay.state_dict(), **start})
    batch = trainer.batches[0]
    bundle.loss()(replay(batch["images"]), batch["labels"]).backward()
    for name, p in replay.named_parameters():
        assert torch.allclose(net.state_dict()[name] - start[name], -0.01 * p.grad, atol=1e-7), name
    with pytest.raises(ValueError, match="optimizer"):
        LocalTrainer(bundle.network(), bundle.loss(), data, 1e-3, 1, None, optimizer="rmsprop")
