"""Local training of one site, with or without DP-SGD (plain PyTorch and Opacus, no NVFlare).

Each step draws a Poisson sample of the site's training PATIENTS (each patient independently with
probability ``sample_rate``), takes one random axial slice of each (the bundle's training
transforms), computes per-sample gradients, clips each to ``max_grad_norm``, adds Gaussian noise of
std ``noise_multiplier * max_grad_norm`` to their sum and divides by the expected batch size
(Opacus' DPOptimizer). Empty samples still take a step (noise only), as the analysis assumes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.data import CacheDataset
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from dpseg.fastdp import PerSampleGrads
from dpseg.privacy import Accountant

# "fast": dpseg.fastdp (no wasted batch weight gradient); "hooks" / "functorch": Opacus' GradSampleModule
GRAD_SAMPLE_MODES = ("fast", "hooks", "functorch")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# "poisson": each patient independently with the sample rate (what the DP analysis assumes);
# "fixed": exactly batch_size distinct patients per step (non-DP audits only: one known slice per update)
SAMPLINGS = ("poisson", "fixed")


def make_private(network: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, generator: torch.Generator):
    """Wrap a network and its optimiser for DP-SGD: (model to call, PerSampleGrads or None, DPOptimizer).

    ``mode`` is one of GRAD_SAMPLE_MODES; with "fast" the network itself is called and
    ``PerSampleGrads.backward`` fills the per-sample gradients.
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    per_sample, model = None, network
    if mode == "fast":
        per_sample = PerSampleGrads(network, loss_reduction="mean")
    else:
        model = GradSampleModule(network, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    dp_optimizer = DPOptimizer(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                               expected_batch_size=expected_batch_size, loss_reduction="mean", generator=generator)
    return model, per_sample, dp_optimizer


class PatientSlices:
    """A site's patients as a dataset: ``batch(indices)`` gives one random slice per patient.

    The deterministic part of the bundle's transforms (load, orient, resample, window) is cached
    once; the random slice draw runs on every access, seeded by ``seed`` if given.
    """

    def __init__(self, items: list[dict], train_transforms, seed: int | None = None):
        self.data = CacheDataset(items, train_transforms, cache_rate=1.0, num_workers=0, progress=False)
        if seed is not None:  # the random slice draws and intensity shifts (else MONAI's global state)
            train_transforms.set_random_state(seed=seed)

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 1, H, W) in [0, 1] and labels (B, 1, H, W) for the given patients."""
        samples = [self.data[i] for i in indices]
        samples = [s[0] if isinstance(s, list) else s for s in samples]
        return torch.stack([torch.as_tensor(s["image"]) for s in samples]), \
            torch.stack([torch.as_tensor(s["label"]) for s in samples])


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of a Poisson sample: each of ``n`` items independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def fixed_sample(n: int, size: int, generator: torch.Generator) -> list[int]:
    """Indices of ``min(size, n)`` distinct items drawn uniformly (not a DP sampler)."""
    return sorted(torch.randperm(n, generator=generator)[:size].tolist())


@dataclass
class StepStats:
    steps: int = 0
    samples: int = 0
    empty_steps: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")


class LocalTrainer:
    """Runs local steps on a network in place. ``accountant`` None means no DP (the baseline).

    Without DP, batches are Poisson samples of the same expected size, so the two modes differ
    only by clipping and noise. The network keeps plain state-dict keys throughout.
    ``optimizer``: "adam" (default) or "sgd"; ``sampling``: "poisson" (default; the only one
    allowed with DP) or "fixed". With ``record`` the images and labels of every step's batch are
    kept in ``self.batches`` (for a site's own audit; they never leave the site).
    """

    def __init__(self, network: torch.nn.Module, loss_fn, data: PatientSlices, lr: float, batch_size: int,
                 accountant: Accountant | None = None, seed: int = 0, grad_sample_mode: str = "fast",
                 optimizer: str = "adam", sampling: str = "poisson", record: bool = False):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:  # also without DP: a typo must not pass silently
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if accountant is not None and sampling != "poisson":
            raise ValueError("DP training needs Poisson sampling (the accountant assumes it); "
                             f"sampling={sampling!r} is only allowed without DP")
        self.network, self.loss_fn, self.data = network, loss_fn, data
        self.accountant, self.batch_size, self.sampling = accountant, batch_size, sampling
        self.sample_rate = accountant.settings.sample_rate if accountant else batch_size / len(data)
        self.sampler = torch.Generator().manual_seed(seed)
        self.per_sample: PerSampleGrads | None = None
        self.record, self.batches = record, []
        base = OPTIMIZERS[optimizer](network.parameters(), lr=lr)
        if accountant is None:
            self.model, self.optimizer = network, base
        else:
            s = accountant.settings
            self.model, self.per_sample, self.optimizer = make_private(
                network, base, grad_sample_mode, s.noise_multiplier, s.max_grad_norm, s.batch_size,
                torch.Generator().manual_seed(seed + 1))

    def step(self, stats: StepStats) -> None:
        """One optimizer step on a fresh Poisson sample of patients."""
        self.model.train()
        if self.sampling == "fixed":
            indices = fixed_sample(len(self.data), self.batch_size, self.sampler)
        else:
            indices = poisson_sample(len(self.data), self.sample_rate, self.sampler)
        self.optimizer.zero_grad(set_to_none=True)
        if self.record:
            self.batches.append({"patients": indices})
        if indices:
            x, y = self.data.batch(indices)
            if self.record:
                self.batches[-1].update(images=x.as_subclass(torch.Tensor).clone(),
                                        labels=y.as_subclass(torch.Tensor).clone())
            if self.per_sample is not None:
                loss = self.per_sample.backward(x, y, self.loss_fn)
            else:
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
            stats.loss_sum += float(loss) * len(indices)
            stats.loss_count += len(indices)
        elif self.accountant is not None:
            for p in self.network.parameters():  # no patient: clipped sum is zero, noise still added
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
        else:
            stats.empty_steps += 1
            stats.steps += 1
            return
        self.optimizer.step()
        if self.accountant is not None:
            self.accountant.step()
        stats.steps += 1
        stats.samples += len(indices)
        stats.empty_steps += not indices

    def run(self, steps: int, abort=lambda: False) -> StepStats:
        """Run ``steps`` steps (fewer if ``abort()`` turns true); the optimiser state persists.

        With ``record``, ``self.batches`` holds this run's batches only."""
        stats = StepStats()
        self.batches = []
        for _ in range(steps):
            if abort():
                break
            self.step(stats)
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def close(self) -> None:
        """Detach the per-sample gradient hooks so the network is a plain module again."""
        if isinstance(self.model, GradSampleModule):
            self.model._close()
        if self.per_sample is not None:
            self.per_sample.close()
