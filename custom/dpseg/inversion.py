"""Gradient-inversion attack on one site's update (plain PyTorch, no NVFlare).

What the attacker (an honest-but-curious server) has: the global model the update was computed
from, the update itself (weight difference, after every site-side filter, noisy under DP), the
public training settings (local learning rate, local steps, batch size, optimiser, the random
intensity shift) and the loss, and it may hold public CT of other people (``dpseg.prior``). It
does not have the site's images. Under DP it sees only the clipped, noised update; nothing else
is given to it.

The attack, in the style of Geiping et al. 2020 ("Inverting Gradients"): candidate images (and, in
the weaker setting, label masks) are optimised so that the update they would produce matches the
observed one. Matching loss: the mean over parameter tensors of the cosine distance between the
candidate's and the observed update (tensors whose gradient is structurally zero, such as a
convolution bias followed by instance norm, are skipped). With ``noise`` > 0 the candidate's
update is averaged over noisy copies of it: a site's slice carries scanner noise, most of a
convolution's weight gradient comes from that fine texture, and matched plainly a smooth candidate
is pulled towards whatever mimics the texture rather than towards the anatomy. Two searches:

- with a prior (``_prior_search``): the images are the prior's mean plus a combination of its
  principal components, plus a per-image intensity shift; starts from public slices ranked by the
  matching loss; Adam on the coefficients; then (``_refine``) Adam on the pixels inside the body;
- without (``_pixel_search``): pixels from random starts, plus a total-variation prior; Adam with
  signed gradients; a box constraint to [0, 1] (the bundle's intensity window).

Either way several restarts, keeping the one with the lowest matching loss.

The attacker's copy of the network has every LeakyReLU replaced by a smooth surrogate,
``a x + (1 - a) softplus(beta x) / beta`` with beta annealed geometrically from ``smooth_beta`` to
``smooth_beta_end`` over the iterations: with the exact activation the weight gradient (and so the
matching loss) jumps whenever a pre-activation changes sign, and no optimiser finds a direction
(finite differences disagree with autograd beyond steps of 1e-7 per pixel). The matching loss
reported, and used to pick among restarts, is always the exact network's.

Local training of several steps is simulated differentiably with SGD on the candidate batch
(``simulate="unroll"``, knowing the learning rate and the number of steps); ``"single"`` treats the
update as one gradient step (cheap, and the only option for an Adam optimiser, whose state the
attacker does not know).
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable

import numpy as np

import torch
from torch.func import functional_call

from dpseg.prior import ImagePrior

LABEL_MODES = ("known", "joint")
SHIFT_STEP = 0.002  # Adam step of the estimated intensity shift (window units)
EXACT_DRAWS = 8  # noisy copies (the same draws for every candidate) behind the exact matching loss
AIR_MARGIN = 0.01  # pixels within this of an image's minimum (window units) are air: no noise, no refinement
SIMULATIONS = ("single", "unroll")


@dataclass
class AttackSettings:
    """Attack hyper-parameters. The defaults are the canonical audit's (one image per update,
    the synthetic public prior, noise-aware matching, warp and refinement): the audit job's
    ``attack_*`` arguments and ``dpseg audit``'s defaults are these (a test pins the job to them).

    iterations: optimisation steps per restart; restarts: independent random starts;
    step_size: Adam learning rate on image intensities ([0, 1] units); tv_weight: weight of the
    total-variation prior; label: "known" (the true mask is given: worst case) or "joint" (the mask
    is optimised too); simulate: "single" or "unroll"; local_steps, local_lr: the site's public
    local training settings (used by "unroll"); batch_size: images to reconstruct per update;
    smooth_beta, smooth_beta_end: the activation surrogate's sharpness at the first and last
    iteration (0: the exact activation); intensity_shift: the largest random intensity shift the
    site's training adds (public, from the bundle), estimated per image with a prior;
    prior: "none" (search pixels) or the name of the attacker's public image prior
    (``dpseg.prior``), with prior_components (its principal components), prior_candidates (public
    slices with the masks closest to the known one) and prior_spread (public slices spread through
    the set) as starting candidates; warp_grid: control points per side of a smooth displacement
    field that deforms the prior's image, so that a public slice's anatomy can be moved onto the
    patient's (0: none), warp_step: the field's Adam step (half the image width = 1); noise: the
    standard deviation (window units) of the image noise the attacker assumes in the site's slices
    (0: match the update of the candidate itself; > 0: match the update averaged over
    ``noise_draws`` noisy copies of it, so that the search looks for the anatomy rather than for a
    noise pattern); refine_iterations, refine_step: a last stage
    of the prior search that adjusts the kept reconstruction's pixels inside the body (Adam,
    ``refine_step`` per iteration; 0: none).
    """

    iterations: int = 300
    restarts: int = 1
    step_size: float = 0.05
    tv_weight: float = 0.02
    label: str = "known"
    simulate: str = "single"
    local_steps: int = 1
    local_lr: float = 0.005
    batch_size: int = 1
    seed: int = 0
    smooth_beta: float = 20.0
    smooth_beta_end: float = 100.0
    intensity_shift: float = 0.0
    prior: str = "synthetic"
    prior_components: int = 256
    prior_candidates: int = 20
    prior_spread: int = 60
    noise: float = 0.03
    noise_draws: int = 4
    refine_iterations: int = 200
    refine_step: float = 0.005
    warp_grid: int = 6
    warp_step: float = 0.01

    def __post_init__(self):
        if self.label not in LABEL_MODES:
            raise ValueError(f"label must be one of {LABEL_MODES}, got {self.label!r}")
        if self.simulate not in SIMULATIONS:
            raise ValueError(f"simulate must be one of {SIMULATIONS}, got {self.simulate!r}")
        if self.iterations < 1 or self.restarts < 1 or self.batch_size < 1 or self.local_steps < 1 \
                or self.noise_draws < 1 or min(self.refine_iterations, self.noise, self.warp_grid) < 0 \
                or self.warp_grid == 1 or self.warp_step <= 0:
            raise ValueError("iterations, restarts, batch_size, local_steps and noise_draws must be >= 1, "
                             "refine_iterations and noise >= 0, warp_grid 0 or >= 2, warp_step > 0: "
                             f"{asdict(self)}")
        if self.prior != "none" and min(self.prior_components, self.prior_candidates + self.prior_spread) < 1:
            raise ValueError(f"a prior needs prior_components >= 1 and starting candidates: {asdict(self)}")


@dataclass
class Reconstruction:
    """images (B, 1, H, W) in [0, 1]; labels (B, 1, H, W) in {0, 1} (known or estimated);
    matching_loss of the kept restart; seconds of wall time; iterations in all restarts and the
    refinement;
    initial (B, 1, H, W): the guess made without the update, the uninformed baseline (the first
    random start, or the prior's guess); initial_kind: "random" or "prior"; shifts (B,): the
    estimated random intensity shift in each image (``images - shifts`` is the attacker's estimate
    of the stored, unshifted slice)."""

    images: torch.Tensor
    labels: torch.Tensor
    matching_loss: float
    seconds: float
    iterations: int
    initial: torch.Tensor
    initial_kind: str = "random"
    shifts: torch.Tensor | None = None

    def unshifted(self) -> torch.Tensor:
        """The reconstructions without their estimated intensity shift, (B, 1, H, W)."""
        return self.images if self.shifts is None else self.images - self.shifts.view(-1, 1, 1, 1)


class SmoothLeakyReLU(torch.nn.Module):
    """The attacker's smooth stand-in for LeakyReLU(a): a x + (1 - a) softplus(beta x) / beta
    (the exact activation as beta grows)."""

    def __init__(self, negative_slope: float, beta: float):
        super().__init__()
        self.negative_slope, self.beta = negative_slope, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.negative_slope
        return a * x + (1 - a) * torch.nn.functional.softplus(x, beta=self.beta)


def smooth_copy(network: torch.nn.Module, beta: float) -> tuple[torch.nn.Module, list[SmoothLeakyReLU]]:
    """A copy of ``network`` with every LeakyReLU replaced by SmoothLeakyReLU(beta) (same
    parameter names); returns the copy and its surrogate modules (to anneal beta)."""
    copy_ = copy.deepcopy(network)
    surrogates = []
    for module in list(copy_.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.LeakyReLU):
                surrogate = SmoothLeakyReLU(child.negative_slope, beta)
                setattr(module, name, surrogate)
                surrogates.append(surrogate)
    return copy_, surrogates


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels of (B, C, H, W) images."""
    return (images[..., 1:, :] - images[..., :-1, :]).abs().mean() + \
        (images[..., :, 1:] - images[..., :, :-1]).abs().mean()


def cosine_distance(candidate: list[torch.Tensor], observed: list[torch.Tensor]) -> torch.Tensor:
    """Mean over tensors of 1 - cos(candidate_i, observed_i)."""
    terms = [1 - (a * b).sum() / (a.norm() * b.norm() + 1e-12) for a, b in zip(candidate, observed)]
    return torch.stack(terms).mean()


def soft_target(mask_logits: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) logits -> (B, 2, H, W) class probabilities (background, liver)."""
    p = torch.sigmoid(mask_logits)
    return torch.cat([1 - p, p], dim=1)


def one_hot_loss(loss_fn: torch.nn.Module) -> torch.nn.Module:
    """The same loss for (B, 2, H, W) probability targets (no one-hot conversion)."""
    loss = copy.deepcopy(loss_fn)
    if hasattr(loss, "dice"):
        loss.dice.to_onehot_y = False
    if hasattr(loss, "to_onehot_y"):
        loss.to_onehot_y = False
    return loss


class UpdateModel:
    """The network as a function of its parameters: the update a batch would produce."""

    def __init__(self, network: torch.nn.Module, loss_fn: torch.nn.Module):
        self.network, self.loss_fn = network, loss_fn
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in network.named_parameters()}
        self.buffers = {k: v.detach() for k, v in network.named_buffers()}
        self.names = list(self.params)

    def gradient(self, params: dict, images: torch.Tensor, target: torch.Tensor, loss_fn=None,
                 create_graph: bool = True) -> list[torch.Tensor]:
        out = functional_call(self.network, (params, self.buffers), (images,))
        loss = (loss_fn or self.loss_fn)(out, target)
        return list(torch.autograd.grad(loss, list(params.values()), create_graph=create_graph))

    def descent(self, images: torch.Tensor, target: torch.Tensor, settings: AttackSettings, loss_fn=None,
                create_graph: bool = True) -> list[torch.Tensor]:
        """The parameters' descent direction the batch gives: the gradient ("single") or
        (theta_0 - theta_T) / lr after ``local_steps`` differentiable SGD steps ("unroll")."""
        if settings.simulate == "single" or settings.local_steps == 1:
            return self.gradient(self.params, images, target, loss_fn, create_graph)
        current = dict(self.params)
        for _ in range(settings.local_steps):
            grads = self.gradient(current, images, target, loss_fn, create_graph)
            current = {k: v - settings.local_lr * g for (k, v), g in zip(current.items(), grads)}
        return [(self.params[k] - current[k]) / settings.local_lr for k in self.names]


def observed_descent(update: dict[str, torch.Tensor], names: list[str]) -> list[torch.Tensor]:
    """The descent direction an update (new - old weights) reveals: -update, per parameter."""
    missing = [n for n in names if n not in update]
    if missing:
        raise KeyError(f"update lacks parameters {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return [-torch.as_tensor(update[n], dtype=torch.float32) for n in names]


def informative(model: UpdateModel, shape: tuple[int, ...], generator: torch.Generator) -> list[bool]:
    """Which parameter tensors have a gradient that is not structurally zero (probed on a random
    image and mask: e.g. a convolution bias followed by instance norm gets ~1e-8)."""
    probe = torch.rand(shape, generator=generator)
    mask = (torch.rand(shape, generator=generator) > 0.5).float()
    grads = model.gradient(model.params, probe, mask, create_graph=False)
    norms = torch.stack([g.norm() for g in grads])
    return [bool(n > 1e-5 * norms.max()) for n in norms]


def body(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> 1.0 where a pixel is above its image's air level (the minimum + AIR_MARGIN)."""
    air = images.detach().flatten(1).amin(1).view(-1, 1, 1, 1)
    return (images.detach() > air + AIR_MARGIN).float()


class Matching:
    """The attack's objective for one update: the cosine distance between the update candidate
    images would produce and the observed one (informative tensors only), on the attacker's smooth
    copy of the network (``loss``, differentiable) or on the exact network (``exact``, to choose).
    With ``settings.noise`` > 0 the candidate's update is averaged over noisy copies of it (noise in
    the body only; air is clipped to the window's bound in a CT slice): fresh draws at each
    ``loss``, the same EXACT_DRAWS draws at every ``exact_loss``."""

    def __init__(self, network: torch.nn.Module, loss_fn: torch.nn.Module, update: dict[str, torch.Tensor],
                 settings: AttackSettings, image_shape: tuple[int, int], generator: torch.Generator):
        self.settings = settings
        self.exact = UpdateModel(network, loss_fn)
        self.surrogates: list[SmoothLeakyReLU] = []
        if settings.smooth_beta > 0:
            smooth, self.surrogates = smooth_copy(network, settings.smooth_beta)
            self.model = UpdateModel(smooth, loss_fn)
        else:
            self.model = self.exact
        self.shape = (settings.batch_size, 1, *image_shape)
        self.keep = informative(self.model, self.shape, generator)
        self.observed = [o for o, k in zip(observed_descent(update, self.model.names), self.keep) if k]
        self.joint_loss = one_hot_loss(loss_fn) if settings.label == "joint" else None
        self.draws = torch.Generator().manual_seed(settings.seed + 1)

    def noisy(self, images: torch.Tensor, target: torch.Tensor, draws: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``draws`` noisy copies of each image (B * draws, 1, H, W) and their targets (with noise
        0: the images and targets as they are). The loss of that batch (a mean over its images)
        has as gradient, per image, the mean of its copies' gradients."""
        if self.settings.noise <= 0:
            return images, target
        copies = images.repeat_interleave(draws, 0)
        noise = torch.randn(copies.shape, generator=generator) * self.settings.noise
        return copies + noise * body(copies), target.repeat_interleave(draws, 0)

    def anneal(self, iteration: int, iterations: int) -> None:
        """Geometric annealing of the surrogate's beta towards the exact activation."""
        start = self.settings.smooth_beta
        end = self.settings.smooth_beta_end or start
        for surrogate in self.surrogates:
            surrogate.beta = start * (end / start) ** (iteration / max(1, iterations - 1))

    def loss(self, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        images, target = self.noisy(images, target, self.settings.noise_draws, self.draws)
        candidate = self.model.descent(images, target, self.settings, self.joint_loss)
        return cosine_distance([c for c, k in zip(candidate, self.keep) if k], self.observed)

    def exact_loss(self, images: torch.Tensor, target: torch.Tensor) -> float:
        fixed = torch.Generator().manual_seed(self.settings.seed + 2)
        images, target = self.noisy(images.detach(), target.detach(), EXACT_DRAWS, fixed)
        candidate = self.exact.descent(images, target, self.settings, self.joint_loss, create_graph=False)
        return float(cosine_distance([c.detach() for c, k in zip(candidate, self.keep) if k], self.observed))


def invert(network: torch.nn.Module, loss_fn: torch.nn.Module, update: dict[str, torch.Tensor],
           settings: AttackSettings, image_shape: tuple[int, int], label: torch.Tensor | None = None,
           progress: Callable[[str], None] | None = None, prior: ImagePrior | None = None) -> Reconstruction:
    """Reconstruct ``settings.batch_size`` images (1, H, W) from one update.

    ``update``: new minus old weights, by parameter name (buffers ignored); ``network`` holds the
    old (global) weights; ``label`` (B, 1, H, W): the true masks for ``label="known"``; ``prior``:
    the attacker's public image prior, required when ``settings.prior`` is not ``"none"``.
    """
    if settings.label == "known" and label is None:
        raise ValueError("label='known' needs the true label masks")
    if (settings.prior != "none") != (prior is not None):
        raise ValueError(f"settings.prior is {settings.prior!r} but {'no' if prior is None else 'an'} ImagePrior was given")
    if prior is not None and prior.shape != tuple(image_shape):
        raise ValueError(f"the prior's slices are {prior.shape}, the images {tuple(image_shape)}")
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    matching = Matching(network, loss_fn, update, settings, image_shape, generator)
    search = _pixel_search if prior is None else partial(_prior_search, prior=prior)
    loss, images, labels, initial, shifts = search(matching, label, generator, progress)
    iterations = settings.iterations * settings.restarts + (settings.refine_iterations if prior is not None else 0)
    return Reconstruction(images, labels, loss, time.perf_counter() - start, iterations,
                          initial, "random" if prior is None else "prior", shifts)


def _pixel_search(matching: Matching, label: torch.Tensor | None, generator: torch.Generator, progress) -> tuple:
    """Restarts from uniform random images, Adam on signed gradients of matching + TV, box [0, 1]."""
    settings, shape = matching.settings, matching.shape
    best, initial = None, None
    for restart in range(settings.restarts):
        images = torch.rand(shape, generator=generator).requires_grad_(True)
        if initial is None:
            initial = images.detach().clone()
        variables = [images]
        mask_logits = None
        if settings.label == "joint":
            mask_logits = torch.zeros(shape).requires_grad_(True)
            variables.append(mask_logits)
        optimiser = torch.optim.Adam(variables, lr=settings.step_size)
        milestones = [int(settings.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones, gamma=0.1)
        for it in range(settings.iterations):
            matching.anneal(it, settings.iterations)
            target = soft_target(mask_logits) if mask_logits is not None else label
            match = matching.loss(images, target)
            objective = match + settings.tv_weight * total_variation(images)
            grads = torch.autograd.grad(objective, variables)
            for v, g in zip(variables, grads):
                v.grad = g.sign()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                images.clamp_(0, 1)
            _report(progress, restart, it, settings, match)
        target = (soft_target(mask_logits) if mask_logits is not None else label).detach()
        final = matching.exact_loss(images, target)
        if best is None or final < best[0]:
            estimated = (target[:, 1:2] > 0.5).float() if mask_logits is not None else label
            best = (final, images.detach().clone(), estimated.clone())
    return (*best, initial, None)


def _prior_guess(prior: ImagePrior, label: torch.Tensor | None, batch: int) -> torch.Tensor:
    """The prior's guess without the update, (B, 1, H, W): per image the public slice whose mask is
    closest to the known one, or the public mean image where the label is not known."""
    if label is None:
        return prior.decode(torch.zeros(batch, len(prior.scales)))
    reference = [int(prior.closest_masks(label[b, 0].numpy(), 1)[0]) for b in range(batch)]
    return torch.cat([torch.from_numpy(prior.slices[i])[None, None] for i in reference])


def _ranked_candidates(matching: Matching, label: torch.Tensor | None, prior: ImagePrior,
                       initial: torch.Tensor) -> list[list[int]]:
    """Per image of the batch, the public slices to start from (those with the masks closest to the
    known one and ``prior_spread`` spread through the public set), best first by the exact
    matching loss with the other images held at ``initial``."""
    settings = matching.settings
    targets = label if label is not None else torch.zeros(matching.shape)
    ranked = []
    for b in range(matching.shape[0]):
        pool = prior.spread(settings.prior_spread)
        if label is not None:
            pool = np.unique(np.concatenate([prior.closest_masks(label[b, 0].numpy(), settings.prior_candidates), pool]))
        scores = []
        for i in pool:
            images, target = initial.clone(), targets.clone()
            images[b] = torch.from_numpy(prior.slices[i])[None]
            if label is None:
                target[b] = torch.from_numpy(prior.labels[i])[None]
            scores.append((matching.exact_loss(images, _as_target(target, label)), int(i)))
        ranked.append([i for _, i in sorted(scores)])
    return ranked


def _prior_search(matching: Matching, label: torch.Tensor | None, generator: torch.Generator, progress,
                  prior: ImagePrior) -> tuple:
    """Search in the prior's coefficients. Starting points: public slices (those whose mask is
    closest to the known one, and slices spread through the public set), ranked by the exact
    matching loss; restart r starts from each image's r-th best. Adam on the coefficients, on a
    per-image intensity shift within +-``intensity_shift``, on a smooth displacement field that
    deforms the prior's image (``warp_grid`` > 0; ``warp``) (and on the mask logits, for
    ``label="joint"``) with a cosine-annealed step; the exact matching loss,
    checked every 50 iterations, picks the result. ``initial``: the prior's guess without the
    update (the public slice whose mask is closest to the known one; the public mean image for a
    joint label)."""
    settings, batch = matching.settings, matching.shape[0]
    initial = _prior_guess(prior, label, batch)
    ranked = _ranked_candidates(matching, label, prior, initial)
    bound = settings.intensity_shift
    best = None
    for restart in range(settings.restarts):
        picks = [r[restart % len(r)] for r in ranked]
        z = prior.encode(prior.slices[picks]).clone().requires_grad_(True)
        shift = torch.zeros(batch, requires_grad=True)
        groups = [{"params": [z]}, {"params": [shift], "lr": SHIFT_STEP}]
        field = torch.zeros(batch, 2, settings.warp_grid, settings.warp_grid, requires_grad=True)
        if settings.warp_grid:
            groups.append({"params": [field], "lr": settings.warp_step})
        mask_logits = None
        if label is None:
            mask_logits = (4.0 * (2 * torch.from_numpy(prior.labels[picks])[:, None] - 1)).requires_grad_(True)
            groups.append({"params": [mask_logits]})
        optimiser = torch.optim.Adam(groups, lr=settings.step_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.iterations, eta_min=settings.step_size / 100)

        def image() -> torch.Tensor:
            return warp(prior.decode(z), field) + shift.clamp(-bound, bound).view(-1, 1, 1, 1)

        def keep_if_better(best):
            with torch.no_grad():
                images = image()
                target = (soft_target(mask_logits) if mask_logits is not None else label).detach()
            final = matching.exact_loss(images, target)
            if best is None or final < best[0]:
                estimated = (target[:, 1:2] > 0.5).float() if mask_logits is not None else label
                best = (final, images.clone(), estimated.clone(), shift.detach().clamp(-bound, bound).clone())
            return best

        best = keep_if_better(best)  # the start itself (a public slice's projection) may already fit best
        for it in range(settings.iterations):
            matching.anneal(it, settings.iterations)
            target = soft_target(mask_logits) if mask_logits is not None else label
            match = matching.loss(image(), target)
            optimiser.zero_grad()
            match.backward()
            optimiser.step()
            schedule.step()
            _report(progress, restart, it, settings, match)
            if (it + 1) % 50 == 0 or it + 1 == settings.iterations:
                best = keep_if_better(best)
    if settings.refine_iterations:
        best = _refine(matching, best, label, progress)
    loss, images, labels, shifts = best
    return loss, images, labels, initial, shifts


def warp(images: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``images`` (B, 1, H, W) resampled (bilinear) at positions displaced by ``field`` (B, 2, G, G):
    x and y displacements at G x G control points, in units of half the image width and height,
    interpolated bicubically to every pixel; outside the image, the border's value (air). G = 0:
    the images as they are."""
    if field.shape[-1] == 0:
        return images
    identity = torch.nn.functional.affine_grid(torch.eye(2, 3).expand(len(images), 2, 3), list(images.shape),
                                               align_corners=False)
    dense = torch.nn.functional.interpolate(field, size=images.shape[-2:], mode="bicubic", align_corners=True)
    return torch.nn.functional.grid_sample(images, identity + dense.permute(0, 2, 3, 1), mode="bilinear",
                                           padding_mode="border", align_corners=False)


def _refine(matching: Matching, best: tuple, label: torch.Tensor | None, progress) -> tuple:
    """Adjust the kept reconstruction's pixels inside the body (air stays as it is): Adam on a
    residual, with the surrogate at its final sharpness; the exact matching loss, checked every 50
    iterations, keeps the refinement only where it fits better. ``best``: (loss, images, masks,
    shifts) as the search keeps them."""
    settings = matching.settings
    images, masks = best[1], best[2]
    target = _as_target(masks, label)
    inside = body(images)
    residual = torch.zeros_like(images, requires_grad=True)
    optimiser = torch.optim.Adam([residual], lr=settings.refine_step)
    matching.anneal(1, 2)
    for it in range(settings.refine_iterations):
        match = matching.loss(images + residual * inside, target)
        optimiser.zero_grad()
        match.backward()
        optimiser.step()
        if progress and (it + 1) % max(1, settings.refine_iterations // 4) == 0:
            progress(f"refinement, iteration {it + 1}/{settings.refine_iterations}: matching loss {float(match):.4f}")
        if (it + 1) % 50 == 0 or it + 1 == settings.refine_iterations:
            candidate = (images + residual * inside).detach()
            final = matching.exact_loss(candidate, target)
            if final < best[0]:
                best = (final, candidate.clone(), *best[2:])
    return best


def _as_target(masks: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
    """Known labels as they are; for a joint label, (B, 1, H, W) masks as soft (B, 2, H, W) targets."""
    return masks if label is not None else torch.cat([1 - masks, masks], dim=1)


def _report(progress, restart: int, it: int, settings: AttackSettings, match: torch.Tensor) -> None:
    if progress and (it + 1) % max(1, settings.iterations // 4) == 0:
        progress(f"restart {restart + 1}/{settings.restarts}, iteration {it + 1}/{settings.iterations}: "
                 f"matching loss {float(match):.4f}")
