"""The informed adversary's identification attack (Balle, Cherubin and Hayes 2022; Hayes,
Mahloujifar and Balle 2023): the attacker holds the candidate set (here the site's training slices
with their masks, the strongest such attacker) and the round's global model, and names the
candidate that best explains an update.

Each candidate's own gradient at the global model (one per-sample backward pass, through the
site's step code: ``dpseg.fastdp.PerSampleGrads``) is scored against the descent direction the
update reveals (``dpseg.inversion.observed_descent``; one SGD step of the canonical audit):

- without DP, by cosine (the update is the mean gradient of the batch, so the true slice's is
  parallel to it when the batch holds one slice);
- with DP, by the log-likelihood ratio of the Gaussian mechanism for "the candidate is in the
  noised sum" against "it is not": <S, g> - |g|^2 / 2, with g the candidate's gradient clipped to
  the clip norm and S the noised sum the update reveals (descent x expected batch / learning
  rate). Poisson subsampling turns it into a monotone function of the same ratio, so the ranking
  is the same.

The reconstruction (``dpseg.inversion``) stays beside it: it is what a person looks at.
"""

from __future__ import annotations

import numpy as np
import torch

from dpseg.fastdp import PerSampleGrads
from dpseg.wire import PrivacyMeta


def candidate_gradients(network: torch.nn.Module, loss_fn, images: torch.Tensor, labels: torch.Tensor,
                        names: list[str], chunk: int = 32):
    """Yield, per chunk of candidates (``images``, ``labels``: (K, 1, H, W)), their gradients at the
    network's weights flattened over the parameters ``names``: (chunk, P) tensors, in order."""
    params = dict(network.named_parameters())
    per_sample = PerSampleGrads(network, loss_reduction="mean")
    network.train()
    try:
        for start in range(0, len(images), chunk):
            per_sample.backward(images[start:start + chunk], labels[start:start + chunk], loss_fn)
            yield torch.cat([params[n].grad_sample.reshape(params[n].grad_sample.shape[0], -1) for n in names], dim=1)
    finally:
        per_sample.close()
        for p in network.parameters():
            p.grad_sample = None


def candidate_scores(network: torch.nn.Module, loss_fn, descent: list[torch.Tensor], names: list[str],
                     images: torch.Tensor, labels: torch.Tensor, privacy: PrivacyMeta | None = None,
                     learning_rate: float = 1.0, chunk: int = 32) -> np.ndarray:
    """The informed attacker's score of each candidate (K,), higher meaning more likely in the
    update: cosine with ``descent`` without DP; with DP (``privacy``), the Gaussian log-likelihood
    ratio of the candidate's clipped gradient given the noised sum (see the module docstring)."""
    d = torch.cat([t.reshape(-1) for t in descent]).to(torch.float64)
    dp = privacy is not None and privacy.dp
    if dp:
        noised_sum = d * float(privacy.batch_size) / learning_rate
    scores = []
    with torch.enable_grad():
        for grads in candidate_gradients(network, loss_fn, images, labels, names, chunk):
            g = grads.to(torch.float64)
            norms = g.norm(dim=1).clamp_min(1e-12)
            if dp:
                g = g * (privacy.max_grad_norm / norms).clamp(max=1.0)[:, None]
                scores.append(g @ noised_sum - 0.5 * (g * g).sum(dim=1))
            else:
                scores.append((g @ d) / (norms * d.norm().clamp_min(1e-12)))
    return torch.cat(scores).numpy()


def identification(scores: np.ndarray, true_indices: list[int], owners: np.ndarray) -> dict:
    """The attack's result against the truth: ``informed_slice_rank`` (mean over the update's true
    slices; 1 is the top score), ``informed_identified`` (share of true slices ranked first) and
    ``informed_patient_identified`` (the top candidate is a slice of a true patient)."""
    order = np.argsort(-scores, kind="stable")
    ranks = [1 + int(np.flatnonzero(order == i)[0]) for i in true_indices]
    patients = {int(owners[i, 0]) for i in true_indices}
    return {"informed_slice_rank": float(np.mean(ranks)),
            "informed_identified": float(np.mean([r == 1 for r in ranks])),
            "informed_patient_identified": float(int(owners[order[0], 0]) in patients)}
