"""Gradient-inversion attack on one site's update (plain PyTorch, no NVFlare).

What the attacker (an honest-but-curious server) has: the global model the update was computed
from, the update itself (weight difference, after every site-side filter, noisy under DP), the
public training settings (local learning rate, local steps, batch size, optimiser) and the loss.
It does not have the site's images. Under DP it sees only the clipped, noised update; nothing
else is given to it.

The attack, in the style of Geiping et al. 2020 ("Inverting Gradients"): candidate images (and, in
the weaker setting, label masks) are optimised so that the update they would produce matches the
observed one. Matching loss: the mean over parameter tensors of the cosine distance between the
candidate's and the observed update (tensors whose gradient is structurally zero, such as a
convolution bias followed by instance norm, are skipped), plus a total-variation prior; Adam with
signed gradients; a box constraint to [0, 1] (the bundle's intensity window); several restarts,
keeping the one with the lowest matching loss.

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
from typing import Callable

import torch
from torch.func import functional_call

LABEL_MODES = ("known", "joint")
SIMULATIONS = ("single", "unroll")


@dataclass
class AttackSettings:
    """Attack hyper-parameters (defaults: the canonical audit, one image per update).

    iterations: optimisation steps per restart; restarts: independent random starts;
    step_size: Adam learning rate on image intensities ([0, 1] units); tv_weight: weight of the
    total-variation prior; label: "known" (the true mask is given: worst case) or "joint" (the mask
    is optimised too); simulate: "single" or "unroll"; local_steps, local_lr: the site's public
    local training settings (used by "unroll"); batch_size: images to reconstruct per update;
    smooth_beta, smooth_beta_end: the activation surrogate's sharpness at the first and last
    iteration (0: the exact activation).
    """

    iterations: int = 2000
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

    def __post_init__(self):
        if self.label not in LABEL_MODES:
            raise ValueError(f"label must be one of {LABEL_MODES}, got {self.label!r}")
        if self.simulate not in SIMULATIONS:
            raise ValueError(f"simulate must be one of {SIMULATIONS}, got {self.simulate!r}")
        if self.iterations < 1 or self.restarts < 1 or self.batch_size < 1 or self.local_steps < 1:
            raise ValueError(f"iterations, restarts, batch_size and local_steps must be >= 1: {asdict(self)}")


@dataclass
class Reconstruction:
    """images (B, 1, H, W) in [0, 1]; labels (B, 1, H, W) in {0, 1} (known or estimated);
    matching_loss of the kept restart; seconds of wall time; iterations in all restarts;
    initial: the first restart's random start (B, 1, H, W), the uninformed guess."""

    images: torch.Tensor
    labels: torch.Tensor
    matching_loss: float
    seconds: float
    iterations: int
    initial: torch.Tensor


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


def invert(network: torch.nn.Module, loss_fn: torch.nn.Module, update: dict[str, torch.Tensor],
           settings: AttackSettings, image_shape: tuple[int, int], label: torch.Tensor | None = None,
           progress: Callable[[str], None] | None = None) -> Reconstruction:
    """Reconstruct ``settings.batch_size`` images (1, H, W) from one update.

    ``update``: new minus old weights, by parameter name (buffers ignored); ``network`` holds the
    old (global) weights; ``label`` (B, 1, H, W): the true masks for ``label="known"``.
    """
    if settings.label == "known" and label is None:
        raise ValueError("label='known' needs the true label masks")
    start = time.perf_counter()
    exact = UpdateModel(network, loss_fn)
    surrogates: list[SmoothLeakyReLU] = []
    if settings.smooth_beta > 0:
        smooth, surrogates = smooth_copy(network, settings.smooth_beta)
        model = UpdateModel(smooth, loss_fn)
    else:
        model = exact
    observed = observed_descent(update, model.names)
    shape = (settings.batch_size, 1, *image_shape)
    generator = torch.Generator().manual_seed(settings.seed)
    keep = informative(model, shape, generator)
    observed = [o for o, k in zip(observed, keep) if k]
    joint_loss = one_hot_loss(loss_fn) if settings.label == "joint" else None
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    initial = None
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
            for surrogate in surrogates:  # geometric annealing towards the exact activation
                end = settings.smooth_beta_end or settings.smooth_beta
                surrogate.beta = settings.smooth_beta * (end / settings.smooth_beta) ** (it / max(1, settings.iterations - 1))
            target = soft_target(mask_logits) if mask_logits is not None else label
            candidate = model.descent(images, target, settings, joint_loss)
            match = cosine_distance([c for c, k in zip(candidate, keep) if k], observed)
            objective = match + settings.tv_weight * total_variation(images)
            grads = torch.autograd.grad(objective, variables)
            for v, g in zip(variables, grads):
                v.grad = g.sign()
            optimiser.step()
            schedule.step()
            with torch.no_grad():
                images.clamp_(0, 1)
            if progress and (it + 1) % max(1, settings.iterations // 4) == 0:
                progress(f"restart {restart + 1}/{settings.restarts}, iteration {it + 1}/{settings.iterations}: "
                         f"matching loss {float(match):.4f}")
        with torch.no_grad():
            target = soft_target(mask_logits) if mask_logits is not None else label
        final = float(cosine_distance([c.detach() for c, k in zip(
            exact.descent(images.detach(), target.detach(), settings, joint_loss, create_graph=False), keep) if k],
            observed))
        if best is None or final < best[0]:
            estimated = (target[:, 1:2] > 0.5).float() if mask_logits is not None else label
            best = (final, images.detach().clone(), estimated.detach().clone())
    seconds = time.perf_counter() - start
    return Reconstruction(best[1], best[2], best[0], seconds, settings.iterations * settings.restarts, initial)

