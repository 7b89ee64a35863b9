"""Audit canaries for the one-run privacy audit of a real job (Steinke, Nasr and Jagielski 2023;
Andrew et al. 2024): never part of a training job, only of the audit copy of one.

A site holds ``count`` canaries. Canary i is a unit direction u_i over the network's trained
parameters (dense, Gaussian, from its own seed); each canary is in the site's cohort by a fair
coin. In every DP step each included canary is Poisson-sampled at the job's rate, by the step's
own secure sampler, like every patient; a sampled canary adds the per-sample gradient
``CANARY_NORM`` x C x u_i (far above the clip norm C) after the patients' per-sample gradients are
computed and before they are clipped (``LocalTrainer``'s ``per_sample_hook``). From there the
site's own clipping, summation, noise and division by the expected batch treat it as a patient.

Everything about the canaries (directions, coins) follows from a public ``canary_seed`` and the
site's name: the auditor scores each canary against the updates the server received. The
patients' guarantee is untouched: canary rows do not depend on any patient, and the expected
batch the sum is divided by stays the job's. Units: C and the gradients in the network's
parameter units; directions have unit L2 norm.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

CANARY_NORM = 10.0  # a canary's gradient norm, in clip norms (clipping must bring it to C)
INCLUSION = 0.5  # each canary is in the site's cohort by a fair coin


def _seed(*parts) -> int:
    """A 63-bit seed derived from ``parts`` (public: the canaries are no secret to the auditor)."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


class CanarySet:
    """One site's canaries: ``count`` directions over ``sizes`` (the trained parameters' numbers
    of elements, in ``network.named_parameters()`` order) and their membership."""

    def __init__(self, count: int, canary_seed: int, site: str, sizes: list[int]):
        if count < 2:
            raise ValueError(f"canaries: need at least 2, got {count}")
        self.count, self.canary_seed, self.site, self.sizes = int(count), int(canary_seed), site, list(sizes)
        self.member = np.random.default_rng(_seed(canary_seed, site, "membership")).random(count) < INCLUSION

    @property
    def dimension(self) -> int:
        return sum(self.sizes)

    def direction(self, index: int) -> torch.Tensor:
        """u_index, shape (dimension,), unit L2 norm."""
        generator = torch.Generator().manual_seed(_seed(self.canary_seed, self.site, index))
        u = torch.randn(self.dimension, generator=generator)
        return u / u.norm()

    def scores(self, update: torch.Tensor, chunk: int = 64) -> np.ndarray:
        """Per canary (count,), the cosine between ``update`` (dimension,) and its direction."""
        update = update.float() / max(float(update.norm()), 1e-30)
        out = np.empty(self.count)
        for start in range(0, self.count, chunk):
            block = torch.stack([self.direction(i) for i in range(start, min(start + chunk, self.count))])
            out[start:start + len(block)] = (block @ update).numpy()
        return out


class CanaryInjector:
    """The per-sample hook of a site's DP step that adds its included canaries' gradients.

    ``sample(n)``: the step's Poisson sampler (indices among n, at the job's rate); ``parameters``:
    the trained parameters in ``CanarySet.sizes`` order; ``clip``: the clip norm C."""

    def __init__(self, canaries: CanarySet, parameters: list[torch.Tensor], clip: float, sample):
        if [p.numel() for p in parameters] != canaries.sizes:
            raise ValueError("canaries: the trained parameters do not match the canaries' directions")
        self.canaries, self.parameters, self.clip, self.sample = canaries, list(parameters), float(clip), sample
        self.included = np.flatnonzero(canaries.member)
        self.sampled = 0  # canary-steps so far (for the audit's inclusion check)

    def __call__(self, indices: list[int], params: list[torch.Tensor]) -> None:
        chosen = self.sample(len(self.included))
        if not chosen:
            return
        self.sampled += len(chosen)
        rows = torch.stack([self.canaries.direction(int(self.included[i])) for i in chosen]) * (CANARY_NORM * self.clip)
        blocks = dict(zip(map(id, self.parameters), torch.split(rows, self.canaries.sizes, dim=1)))
        for p in params:
            block = blocks[id(p)].reshape(len(chosen), *p.shape).to(p.grad_sample.dtype)
            p.grad_sample = torch.cat([p.grad_sample, block])


def trained_parameters(network: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, parameter) of the parameters that train, in the network's order."""
    return [(n, p) for n, p in network.named_parameters() if p.requires_grad]
