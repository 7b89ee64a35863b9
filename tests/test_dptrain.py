import numpy as np
import pytest
import torch

from dpseg.datalist import resolve
from dpseg.dptrain import (IMAGE_LEVELS, LocalTrainer, PatientSlices, StepStats, compact, expanded, poisson_sample,
                           secure_slices, seeded_slices, set_trained_layers, unet_paths)
from dpseg.privacy import Accountant, PrivacyPlan, calibrate
from dpseg.securerandom import SecureRandom


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
    settings = calibrate(8.0, 1e-5, 1.0, 1, 1 / 4, 3)
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
    acc = Accountant(calibrate(8.0, 1e-5, 1.0, 2, 2 / 4, 2))
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
    acc = Accountant(calibrate(8.0, 1e-5, 1.0, 1, 1 / 4, 2))
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


class _NoIntegerSeeds:
    """Stands in for torch.Generator while DP trainers are built and step: any use fails the test."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a DP draw would come from an integer-seeded torch generator")


def test_dp_noise_and_sampling_never_come_from_an_integer_seed(bundle, cohort, monkeypatch):
    """Two trainers built with identical arguments, after identical global seeds, must differ in the
    patients they sample and in the noise they add (the attack: regenerate a seeded stream)."""
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    start = bundle.network().state_dict()
    settings = calibrate(8.0, 1e-5, 1.0, 2, 0.5, 20)
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        net = bundle.network()
        net.load_state_dict(start)
        with monkeypatch.context() as m:
            m.setattr(torch, "Generator", _NoIntegerSeeds)
            m.setattr(torch, "manual_seed", _NoIntegerSeeds)
            data = secure_slices(items, bundle.train_transforms(), SecureRandom())
            trainer = LocalTrainer(net, bundle.loss(), data, 1e-3, 2, Accountant(settings), seed=0, record=True)
            trainer.run(6)
            trainer.close()
        results.append(([b["patients"] for b in trainer.batches], torch.cat([p.flatten() for p in net.parameters()])))
    (samples_a, weights_a), (samples_b, weights_b) = results
    assert samples_a != samples_b  # 6 steps of a rate-0.5 sample of 4 patients: equal with probability 2^-24
    assert not torch.allclose(weights_a, weights_b)


def test_a_patient_with_two_scans_is_one_unit_of_sampling(bundle, cohort):
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    items[1] = dict(items[1], patient=items[0]["patient"])  # the first patient has two scans
    data = seeded_slices(items, bundle.train_transforms(), 0)
    assert len(data) == len(items) - 1 and data.patients[0] == [0, 1]
    scans = {data._scan(0) for _ in range(40)}
    assert scans == {0, 1}  # either scan may give the patient's slice, one slice per step
    images, labels = data.batch([0, 1])
    assert images.shape == (2, 1, 128, 128) and labels.shape == (2, 1, 128, 128)


def _count_noise(trainer: LocalTrainer) -> list[int]:
    """Wrap the DP trainer's noise source: the returned list gets the size of every Gaussian draw."""
    sizes, draw = [], trainer.random.gaussian

    def gaussian(n, std):
        sizes.append(n)
        return draw(n, std)
    trainer.random.gaussian = gaussian
    return sizes


def test_k_slices_per_patient_are_drawn_on_their_own_and_noise_is_drawn_once_per_step(bundle, cohort):
    data = seeded_slices(resolve(cohort / "site-1" / "datalist.json", "training"), bundle.train_transforms(), 0)
    images, labels = data.batch([0, 2], 3)
    assert images.shape == (6, 1, 128, 128) and labels.shape == (6, 1, 128, 128)
    assert not torch.equal(images[0], images[1]) or not torch.equal(images[1], images[2])  # independent draws
    net = bundle.network()
    acc = Accountant(PrivacyPlan(8.0, 1e-5, 1.0, 2, 0.5, 2, "rdp", 1.0))  # a fixed noise: no calibration
    trainer = LocalTrainer(net, bundle.loss(), data, 1e-3, 2, acc, slices_per_patient=3, record=True)
    sizes = _count_noise(trainer)
    stats = trainer.run(2)
    trainer.close()
    assert sizes == [sum(p.numel() for p in net.parameters())] * 2 and acc.steps == 2  # one draw per step
    for batch in trainer.batches:
        assert batch.get("images", torch.empty(0)).shape[0] == 3 * len(batch["patients"])
    assert stats.samples == sum(len(b["patients"]) for b in trainer.batches)  # patients, not slices
    with pytest.raises(ValueError, match="slices_per_patient=2 needs grad_sample_mode 'fast'"):
        LocalTrainer(bundle.network(), bundle.loss(), data, 1e-3, 2, acc, grad_sample_mode="hooks",
                     slices_per_patient=2)
    with pytest.raises(ValueError, match="slices_per_patient must be an integer >= 1"):
        LocalTrainer(bundle.network(), bundle.loss(), data, 1e-3, 2, None, slices_per_patient=0)


def test_without_dp_k_slices_per_patient_step_on_the_mean_loss_of_all_slices(bundle, cohort):
    data = seeded_slices(resolve(cohort / "site-1" / "datalist.json", "training"), bundle.train_transforms(), 0)
    net = bundle.network()
    start = {k: v.detach().clone() for k, v in net.named_parameters()}
    trainer = LocalTrainer(net, bundle.loss(), data, 0.01, 2, None, seed=3, optimizer="sgd", sampling="fixed",
                           record=True, slices_per_patient=3)
    trainer.run(1)
    batch = trainer.batches[0]
    assert len(batch["patients"]) == 2 and batch["images"].shape == (6, 1, 128, 128)
    replay = bundle.network()
    replay.load_state_dict({**replay.state_dict(), **start})
    bundle.loss()(replay(batch["images"]), batch["labels"]).backward()
    for name, p in replay.named_parameters():
        assert torch.allclose(net.state_dict()[name] - start[name], -0.01 * p.grad, atol=1e-7), name


def test_the_trained_layers_of_the_bundle_network(bundle):
    down, bottom, up = unet_paths(bundle.network())
    assert down == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule.0"]
    assert bottom == "model.1.submodule.1.submodule.1.submodule"
    assert up == ["model.2", "model.1.submodule.2", "model.1.submodule.1.submodule.2"]
    counts = {}
    for layers in ("all", "decoder", "norm"):
        net = bundle.network()
        counts[layers] = set_trained_layers(net, layers)
        trained = {k for k, p in net.named_parameters() if p.requires_grad}
        assert counts[layers] == sum(p.numel() for k, p in net.named_parameters() if k in trained)
        if layers != "all":
            assert not any(k.startswith(("model.0.conv.unit0.conv.", "model.0.residual.", bottom + ".residual."))
                           for k in trained)  # encoder convolutions frozen
            assert {k for k in trained if ".adn.N." in k} == {k for k, _ in net.named_parameters() if ".adn.N." in k}
            assert "model.2.1.conv.unit0.conv.weight" in trained  # the output layer
        if layers == "decoder":
            assert "model.1.submodule.1.submodule.2.0.conv.weight" in trained
        if layers == "norm":
            assert "model.1.submodule.1.submodule.2.0.conv.weight" not in trained
    assert counts == {"all": 206188, "decoder": 77420, "norm": 1292}  # the counts set_trained_layers documents
    with pytest.raises(ValueError, match="train_layers must be one of"):
        set_trained_layers(bundle.network(), "encoder")
    with pytest.raises(ValueError, match="train_layers other than 'all' needs the bundle's MONAI UNet"):
        set_trained_layers(torch.nn.Linear(2, 2), "decoder")


def test_frozen_layers_are_untouched_by_dp_steps_and_the_noise_has_the_trained_size(bundle, cohort):
    net = bundle.network()
    before = {k: v.detach().clone() for k, v in net.named_parameters()}
    acc = Accountant(PrivacyPlan(8.0, 1e-5, 1.0, 1, 0.25, 2, "rdp", 1.0))
    trainer = LocalTrainer(net, bundle.loss(), _data(bundle, cohort), 1e-2, 1, acc, slices_per_patient=2,
                           train_layers="decoder")
    sizes = _count_noise(trainer)
    trainer.run(2)
    trainer.close()
    trained = {k for k, p in net.named_parameters() if p.requires_grad}
    assert sizes == [trainer.trained_parameters] * 2 and trainer.trained_parameters == 77420
    assert trainer.trained_parameters == sum(p.numel() for k, p in net.named_parameters() if k in trained)
    for name, p in net.named_parameters():
        if name in trained:
            assert not torch.equal(p, before[name]), name  # noised and updated
        else:
            assert torch.equal(p, before[name]), name  # bit-identical


def test_patient_slices_cache_compactly_and_draw_what_the_bundles_transforms_draw(bundle, cohort):
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    data = seeded_slices(items, bundle.train_transforms(), 3)
    assert all(v["label"].dtype == torch.uint8 and v["image"].dtype == torch.uint16 for v in data.cache)
    reference = bundle.train_transforms()
    reference.set_random_state(state=np.random.RandomState(3))
    for patient in (0, 2, 1):  # one scan per patient here: the same draws in the same order
        images, labels = data.batch([patient])
        (expected,) = reference(items[data.patients[patient][0]])
        assert images.dtype == torch.float32 and not torch.equal(images[0], torch.as_tensor(expected["image"]))
        assert torch.allclose(images[0], torch.as_tensor(expected["image"]), rtol=0, atol=0.5 / IMAGE_LEVELS + 1e-7)
        assert torch.equal(labels[0], torch.as_tensor(expected["label"])) and labels.dtype == torch.float32
    from monai.data import get_track_meta

    assert get_track_meta()  # the draws ran without metadata; MONAI's setting is back as it was


def test_only_images_within_the_window_are_cached_as_levels():
    inside, outside = torch.tensor([0.0, 0.25, 1.0]), torch.tensor([-0.5, 0.25, 1.0])
    assert compact({"image": inside})["image"].dtype == torch.uint16
    back = expanded(compact({"image": inside}))["image"]
    assert back[0] == 0.0 and back[2] == 1.0 and abs(float(back[1]) - 0.25) <= 0.5 / IMAGE_LEVELS  # the window's ends exact
    assert compact({"image": outside})["image"] is outside  # kept as it is
    label = torch.tensor([0.0, 0.5])
    assert compact({"label": label})["label"] is label  # not 0/1: not exact as uint8
