"""The gradient-inversion attack: it recovers an image from an un-noised one-step update of a small
network, and a DP-noised update (clipped, Gaussian noise) defeats it."""

from __future__ import annotations

import pytest
import torch

from dpseg.inversion import AttackSettings, UpdateModel, cosine_distance, invert, smooth_copy
from dpseg.metrics import ssim

SIZE = 16


class SmallSegNet(torch.nn.Module):
    """A tiny segmentation network (16 x 16 input, 2-class logits) with a dense layer."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.dense = torch.nn.Linear(4 * SIZE * SIZE, 2 * SIZE * SIZE)

    def forward(self, x):
        h = torch.nn.functional.leaky_relu(self.conv(x), 0.1)
        return self.dense(h.flatten(1)).view(-1, 2, SIZE, SIZE)


# the attacks these tests build: the canonical audit's settings without its extras (no prior, no
# noise averaging, no refinement, no warp) unless a test names them
PLAIN = {"prior": "none", "noise": 0.0, "refine_iterations": 0, "warp_grid": 0}


def plain_attack(**settings) -> AttackSettings:
    return AttackSettings(**{**PLAIN, **settings})


def phantom(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16 x 16 'slice': dark background, a body disc, a bright 'liver' blob; and its mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    cy, cx = 7 + torch.randint(-1, 2, (2,), generator=g)
    body = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < 6.5 ** 2
    liver = ((yy - cy) ** 2 / 9 + (xx - cx - 2) ** 2 / 6) < 1
    image = 0.3 * body + 0.35 * liver
    return image.float().view(1, 1, SIZE, SIZE), liver.float().view(1, 1, SIZE, SIZE)


def one_step_update(net, loss_fn, x, y, lr, clip=None, noise=None, seed=0):
    """new - old weights after one SGD step on (x, y); with clip/noise: DP-SGD of a batch of one."""
    net.zero_grad()
    loss_fn(net(x), y).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    if clip is not None:
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads.values()))
        scale = min(1.0, clip / float(norm))
        g = torch.Generator().manual_seed(seed)
        grads = {n: v * scale + noise * clip * torch.randn(v.shape, generator=g) for n, v in grads.items()}
    return {n: -lr * v for n, v in grads.items()}


@pytest.fixture
def setting(bundle):
    torch.manual_seed(0)
    return SmallSegNet(), bundle.loss()


def test_attack_recovers_an_image_from_an_unnoised_single_step_update(setting):
    net, loss_fn = setting
    x, y = phantom(1)
    update = one_step_update(net, loss_fn, x, y, lr=0.01)
    settings = plain_attack(iterations=300, restarts=1, step_size=0.05, tv_weight=0.01)
    rec = invert(net, loss_fn, update, settings, (SIZE, SIZE), label=y)
    baseline = ssim(rec.initial[0, 0].numpy(), x[0, 0].numpy())
    assert ssim(rec.images[0, 0].numpy(), x[0, 0].numpy()) > 0.8 > baseline + 0.3
    assert rec.images.shape == x.shape and 0 <= float(rec.images.min()) <= float(rec.images.max()) <= 1


def test_dp_noise_defeats_the_attack(setting):
    net, loss_fn = setting
    x, y = phantom(1)
    update = one_step_update(net, loss_fn, x, y, lr=0.01, clip=1.0, noise=1.0)
    settings = plain_attack(iterations=300, restarts=1, step_size=0.05, tv_weight=0.01)
    rec = invert(net, loss_fn, update, settings, (SIZE, SIZE), label=y)
    assert ssim(rec.images[0, 0].numpy(), x[0, 0].numpy()) < 0.3


def test_joint_label_mode_returns_a_binary_mask(setting):
    net, loss_fn = setting
    x, y = phantom(2)
    update = one_step_update(net, loss_fn, x, y, lr=0.01)
    rec = invert(net, loss_fn, update, plain_attack(iterations=20, restarts=2, label="joint"), (SIZE, SIZE))
    assert rec.labels.shape == y.shape and set(rec.labels.unique().tolist()) <= {0.0, 1.0}
    assert rec.iterations == 40


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="label"):
        AttackSettings(label="guess")
    with pytest.raises(ValueError, match="simulate"):
        AttackSettings(simulate="magic")
    for bad in ({"warp_grid": 1}, {"warp_grid": -2}, {"warp_step": 0.0}):
        with pytest.raises(ValueError, match="warp_grid 0 or >= 2"):
            AttackSettings(**bad)


def test_metrics_and_identification():
    from dpseg.metrics import mse, psnr, ranking

    g = torch.Generator().manual_seed(0)
    slices = torch.rand(5, SIZE, SIZE, generator=g).numpy()
    noisy = (slices[3] + 0.05 * torch.randn(SIZE, SIZE, generator=g).numpy()).clip(0, 1)
    assert ssim(slices[3], slices[3]) == pytest.approx(1.0) and mse(slices[3], slices[3]) == 0
    order = ranking(noisy, slices)
    assert order[0] == 3 and sorted(order.tolist()) == list(range(5))
    assert 20 < psnr(noisy, slices[3]) < 30
    with pytest.raises(ValueError, match="shape"):
        ssim(slices[0][:8], slices[0])


def _matching(model, x, y, observed):
    return cosine_distance(model.gradient(model.params, x, y), observed)


def test_smooth_surrogate_makes_the_matching_loss_differentiable(bundle):
    torch.manual_seed(0)
    net, loss_fn = bundle.network().double(), bundle.loss()
    smooth, surrogates = smooth_copy(net, beta=20.0)
    assert surrogates and not any(isinstance(m, torch.nn.LeakyReLU) for m in smooth.modules())
    assert any(isinstance(m, torch.nn.LeakyReLU) for m in net.modules())  # the site's network is untouched
    assert [n for n, _ in smooth.named_parameters()] == [n for n, _ in net.named_parameters()]
    x = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    y = (torch.rand(1, 1, 32, 32) > 0.7).double()
    truth = torch.rand(1, 1, 32, 32, dtype=torch.float64)
    direction = torch.randn_like(x)
    errors = {}
    for name, network in (("exact", net), ("smooth", smooth)):
        model = UpdateModel(network, loss_fn)
        observed = [g.detach() for g in model.gradient(model.params, truth, y, create_graph=False)]
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_matching(model, xg, y, observed), xg)
        h = 1e-3  # a small step per pixel
        numeric = (_matching(model, x + h * direction, y, observed) - _matching(model, x - h * direction, y, observed)) / (2 * h)
        analytic = (grad * direction).sum()
        errors[name] = float((numeric - analytic).abs() / analytic.abs())
    # with the exact activation the loss jumps as pre-activations change sign; the surrogate's does not
    assert errors["smooth"] < 0.05 and errors["exact"] > 0.5, errors
    for m in surrogates:
        m.beta = 1e4
    out = smooth(x)
    assert torch.allclose(out, net(x), atol=1e-3)


def two_organ_phantom(seed: int, body_radius: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A 16 x 16 slice with a 'liver' (its mask) and a 'kidney' placed independently of it: the
    mask does not tell where the kidney is; only the image (or its gradient) does. ``body_radius``
    in pixels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    ly, lx = 5 + torch.randint(0, 3, (2,), generator=g)
    ky, kx = 9 + torch.randint(0, 4, (2,), generator=g)
    body = ((yy - 7.5) ** 2 + (xx - 7.5) ** 2) < body_radius ** 2
    liver = ((yy - ly) ** 2 / 6 + (xx - lx) ** 2 / 4) < 1
    kidney = ((yy - ky) ** 2 + (xx - kx) ** 2) < 2.5
    image = 0.3 * body + 0.3 * liver + 0.5 * kidney
    return image.float().view(1, 1, SIZE, SIZE), liver.float().view(1, 1, SIZE, SIZE)


@pytest.fixture(scope="module")
def public_prior():
    from dpseg.prior import ImagePrior

    pairs = [two_organ_phantom(100 + s) for s in range(120)]
    slices = torch.cat([p[0] for p in pairs])[:, 0].numpy()
    labels = torch.cat([p[1] for p in pairs])[:, 0].numpy()
    return ImagePrior.fit(slices, labels, components=40)


def _prior_attack(net, loss_fn, update, y, prior):
    settings = plain_attack(iterations=100, restarts=2, step_size=0.05, prior="public", prior_components=40,
                              prior_candidates=20, prior_spread=20)
    return invert(net, loss_fn, update, settings, (SIZE, SIZE), label=y, prior=prior)


def _prior_variants(setting, x, y, prior, iterations: int, variants: dict) -> dict:
    """The prior attack (40 components, 20 + 20 starting slices, 1 restart, ``iterations``) on the
    plain one-step update of (x, y), once per variant (name: further settings)."""
    net, loss_fn = setting
    update = one_step_update(net, loss_fn, x, y, lr=0.01)
    return {name: invert(net, loss_fn, update,
                         plain_attack(iterations=iterations, restarts=1, prior="public", prior_components=40,
                                        prior_candidates=20, prior_spread=20, **extra),
                         (SIZE, SIZE), label=y, prior=prior)
            for name, extra in variants.items()}


def test_prior_attack_finds_what_the_mask_does_not_tell(setting, public_prior):
    net, loss_fn = setting
    gains = []
    for seed in (1, 2, 3):
        x, y = two_organ_phantom(seed)
        rec = _prior_attack(net, loss_fn, one_step_update(net, loss_fn, x, y, lr=0.01), y, public_prior)
        assert rec.initial_kind == "prior" and rec.images.shape == x.shape
        guess = ssim(rec.initial[0, 0].numpy(), x[0, 0].numpy())  # the public slice with the closest mask
        found = ssim(rec.images[0, 0].numpy(), x[0, 0].numpy())
        assert found > 0.9, (seed, found, guess)
        gains.append(found - guess)
    assert max(gains) > 0.1 and min(gains) > -0.02, gains


def test_warp_moves_identity_and_shifts_by_the_field():
    from dpseg.inversion import warp

    x, _ = two_organ_phantom(1)
    assert torch.equal(warp(x, torch.zeros(1, 2, 0, 0)), x)
    assert torch.allclose(warp(x, torch.zeros(1, 2, 4, 4)), x, atol=1e-6)
    field = torch.zeros(1, 2, 4, 4)
    field[:, 0] = 2 / SIZE  # sample one pixel to the right everywhere: the image moves one pixel left
    moved = warp(x, field)
    assert torch.allclose(moved[..., :-1], x[..., 1:], atol=1e-5)


def test_warp_fits_an_anatomy_the_prior_never_saw(setting, public_prior):
    """The public slices all have a body of radius 7; a patient's body of radius 5.5 is out of the
    prior's reach, but a deformed public slice can take its shape."""
    x, y = two_organ_phantom(1, body_radius=5.5)
    runs = _prior_variants(setting, x, y, public_prior, 150, {0: {"warp_grid": 0}, 4: {"warp_grid": 4, "warp_step": 0.01}})
    fit = {g: ssim(r.images[0, 0].numpy(), x[0, 0].numpy()) for g, r in runs.items()}
    assert runs[4].matching_loss < 0.8 * runs[0].matching_loss, (runs[0].matching_loss, runs[4].matching_loss)
    assert fit[4] > fit[0] + 0.05, fit


def test_dp_noise_defeats_the_prior_attack(setting, public_prior):
    net, loss_fn = setting
    gains = []
    for seed in (1, 2, 3):
        x, y = two_organ_phantom(seed)
        update = one_step_update(net, loss_fn, x, y, lr=0.01, clip=1.0, noise=1.0, seed=seed)
        rec = _prior_attack(net, loss_fn, update, y, public_prior)
        gains.append(ssim(rec.images[0, 0].numpy(), x[0, 0].numpy()) - ssim(rec.initial[0, 0].numpy(), x[0, 0].numpy()))
    assert sum(gains) / len(gains) < 0.05, gains


def test_prior_settings_must_agree(setting, public_prior):
    net, loss_fn = setting
    x, y = two_organ_phantom(1)
    update = one_step_update(net, loss_fn, x, y, lr=0.01)
    with pytest.raises(ValueError, match="ImagePrior"):
        invert(net, loss_fn, update, plain_attack(iterations=1, prior="synthetic"), (SIZE, SIZE), label=y)
    with pytest.raises(ValueError, match="ImagePrior"):
        invert(net, loss_fn, update, plain_attack(iterations=1), (SIZE, SIZE), label=y, prior=public_prior)
    with pytest.raises(ValueError, match="prior's slices"):
        invert(net, loss_fn, update, plain_attack(iterations=1, prior="public"), (8, 8), label=y[..., :8, :8],
               prior=public_prior)


def test_prior_attack_estimates_the_training_intensity_shift(setting, public_prior):
    net, loss_fn = setting
    x, y = two_organ_phantom(2)
    shifted = x + 0.04  # training's random intensity shift (the bundle's RandShiftIntensityd)
    update = one_step_update(net, loss_fn, shifted, y, lr=0.01)
    settings = plain_attack(iterations=100, restarts=2, prior="public", prior_components=40, prior_candidates=20,
                              prior_spread=20, intensity_shift=0.05)
    rec = invert(net, loss_fn, update, settings, (SIZE, SIZE), label=y, prior=public_prior)
    assert abs(float(rec.shifts[0]) - 0.04) < 0.01, rec.shifts
    assert ssim(rec.unshifted()[0, 0].numpy(), x[0, 0].numpy()) > 0.9
    unaware = invert(net, loss_fn, update, AttackSettings(**{**settings.__dict__, "intensity_shift": 0.0}), (SIZE, SIZE),
                     label=y, prior=public_prior)
    assert float(unaware.shifts[0]) == 0.0


def test_prior_attack_with_a_joint_label_estimates_a_binary_mask(setting, public_prior):
    net, loss_fn = setting
    x, y = two_organ_phantom(3)
    update = one_step_update(net, loss_fn, x, y, lr=0.01)
    settings = plain_attack(iterations=5, restarts=2, label="joint", prior="public", prior_components=40,
                              prior_candidates=0, prior_spread=10)
    rec = invert(net, loss_fn, update, settings, (SIZE, SIZE), prior=public_prior)
    assert rec.labels.shape == y.shape and set(rec.labels.unique().tolist()) <= {0.0, 1.0}
    assert rec.initial_kind == "prior" and rec.images.shape == x.shape and rec.iterations == 10


def test_noise_averaging_adds_noise_in_the_body_only_and_scores_with_fixed_draws(setting):
    from dpseg.inversion import EXACT_DRAWS, Matching

    net, loss_fn = setting
    x, y = two_organ_phantom(1)
    shifted = x + 0.03  # air at a training shift, not at 0
    update = one_step_update(net, loss_fn, shifted, y, lr=0.01)
    settings = plain_attack(noise=0.05, noise_draws=3)
    matching = Matching(net, loss_fn, update, settings, (SIZE, SIZE), torch.Generator().manual_seed(0))
    copies, targets = matching.noisy(shifted, y, 3, torch.Generator().manual_seed(1))
    assert copies.shape == (3, 1, SIZE, SIZE) and targets.shape == (3, 1, SIZE, SIZE)
    air = (x == 0).expand_as(copies)
    assert torch.equal(copies[air], shifted.expand_as(copies)[air])  # air as it is
    inside = copies[~air] - shifted.expand_as(copies)[~air]
    assert 0.04 < float(inside.std()) < 0.06
    assert matching.exact_loss(shifted, y) == matching.exact_loss(shifted, y)  # the same draws each time
    many, _ = matching.noisy(shifted, y, EXACT_DRAWS, torch.Generator())
    assert many.shape[0] == EXACT_DRAWS
    plain = Matching(net, loss_fn, update, plain_attack(), (SIZE, SIZE), torch.Generator().manual_seed(0))
    same, _ = plain.noisy(shifted, y, 3, torch.Generator())
    assert same is shifted and plain.exact_loss(shifted, y) < 1e-4  # noise 0: the plain update, matched exactly


def test_refinement_lowers_the_matching_loss_and_leaves_air_alone(setting):
    """A prior that never saw a kidney cannot draw it; the refinement adjusts pixels inside the body,
    and is kept only where the exact matching loss is lower."""
    from dpseg.prior import ImagePrior

    pairs = [two_organ_phantom(100 + s) for s in range(120)]
    without_kidney = torch.cat([p[0] for p in pairs]).clamp(max=0.6)[:, 0].numpy()
    prior = ImagePrior.fit(without_kidney, torch.cat([p[1] for p in pairs])[:, 0].numpy(), components=40)
    x, y = two_organ_phantom(1)
    runs = _prior_variants(setting, x, y, prior, 100, {r: {"refine_iterations": r, "refine_step": 0.01} for r in (0, 200)})
    before, after = runs[0], runs[200]
    assert after.iterations == 300 and before.iterations == 100
    assert after.matching_loss < 0.8 * before.matching_loss, (before.matching_loss, after.matching_loss)
    air = before.images == before.images.min()
    assert torch.equal(after.images[air], before.images[air])
