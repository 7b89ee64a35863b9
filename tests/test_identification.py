"""The informed adversary's identification attack: it names the true slice of an update among
the candidates, without DP (cosine) and with the DP mechanism's likelihood ratio."""

import numpy as np
import torch

from dpseg.datalist import resolve
from dpseg.identification import candidate_scores, identification
from dpseg.slices import SliceSet
from dpseg.wire import PrivacyMeta


def _candidates(bundle, cohort, patients: int = 2):
    items = resolve(cohort / "site-1" / "datalist.json", "training")[:patients]
    slices = SliceSet(items, bundle.volume_transforms(), with_labels=True)
    return slices, torch.from_numpy(slices.slices[:, None]), torch.from_numpy(slices.labels[:, None].astype(np.float32))


def _gradient(network, loss_fn, image, label) -> list[torch.Tensor]:
    network.train()
    network.zero_grad()
    loss_fn(network(image[None]), label[None]).backward()
    grads = [p.grad.detach().clone() for p in network.parameters()]
    network.zero_grad()
    return grads


def test_the_informed_attack_identifies_the_true_slice_of_an_un_noised_update(bundle, cohort):
    network, loss_fn = bundle.network(), bundle.loss()
    slices, images, labels = _candidates(bundle, cohort)
    names = [n for n, _ in network.named_parameters()]
    true = int(np.flatnonzero(slices.labels.reshape(len(slices), -1).any(axis=1))[3])  # a slice with liver
    # the update of one SGD step on the trained slice (with training's intensity shift): lr x gradient
    descent = [0.01 * g for g in _gradient(network, loss_fn, images[true] + 0.05, labels[true])]
    scores = candidate_scores(network, loss_fn, descent, names, images, labels, chunk=8)
    assert scores.shape == (len(slices),) and scores[true] > 0.99 and np.all(scores <= 1.0 + 1e-9)
    result = identification(scores, [true], slices.owners)
    assert result == {"informed_slice_rank": 1.0, "informed_identified": 1.0, "informed_patient_identified": 1.0}
    # a wrong truth is ranked below the true slice
    assert identification(scores, [true + 1], slices.owners)["informed_slice_rank"] > 1


def test_with_dp_it_scores_by_the_likelihood_ratio_of_the_clipped_gradient(bundle, cohort):
    network, loss_fn = bundle.network(), bundle.loss()
    slices, images, labels = _candidates(bundle, cohort)
    names = [n for n, _ in network.named_parameters()]
    true = int(np.flatnonzero(slices.labels.reshape(len(slices), -1).any(axis=1))[5])
    clip, batch, lr = 1.0, 4, 0.5
    g = _gradient(network, loss_fn, images[true], labels[true])
    norm = torch.sqrt(sum((t ** 2).sum() for t in g))
    generator = torch.Generator().manual_seed(0)
    # the noised sum holds the true slice's clipped gradient and noise of std sigma * clip (sigma 1e-3)
    noised = [t * min(1.0, clip / float(norm)) + 1e-3 * clip * torch.randn(t.shape, generator=generator) for t in g]
    descent = [lr * t / batch for t in noised]
    meta = PrivacyMeta(dp=True, adjacency="add/remove one patient", epsilon=8.0, delta=1e-5, target_epsilon=8.0,
                       noise_multiplier=1e-3, sample_rate=0.1, steps=1, planned_steps=1, max_grad_norm=clip,
                       batch_size=batch, accountant="prv")
    scores = candidate_scores(network, loss_fn, descent, names, images, labels, meta, learning_rate=lr, chunk=8)
    assert identification(scores, [true], slices.owners)["informed_identified"] == 1.0
    # the true slice's score is the ratio of its own clipped gradient: |g_c|^2 / 2 = clip^2 / 2 where clipped
    assert abs(scores[true] - 0.5 * min(float(norm), clip) ** 2) < 0.05
