"""The attacker's public image prior: principal components of public slices, starting candidates
by mask, kept on disk, and the default synthetic public cohort."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpseg.prior import PUBLIC_SEED, ImagePrior, load_prior, synthetic_prior


def small_set(n: int = 12, size: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    slices = rng.uniform(0, 1, (n, size, size)).astype(np.float32)
    labels = (rng.uniform(0, 1, (n, size, size)) > 0.6).astype(np.float32)
    return slices, labels


def test_components_represent_the_public_slices():
    slices, labels = small_set()
    prior = ImagePrior.fit(slices, labels, components=len(slices))
    assert prior.components.shape == (len(slices), 64) and prior.shape == (8, 8)
    assert np.allclose(prior.components @ prior.components.T, np.eye(len(slices)), atol=1e-4)
    back = prior.decode(prior.encode(slices)).numpy()[:, 0]
    assert np.abs(back - slices).max() < 1e-4
    few = ImagePrior.fit(slices, labels, components=3)
    assert np.abs(few.decode(few.encode(slices)).numpy()[:, 0] - slices).max() > 0.1  # 3 components lose detail


def test_starting_candidates_by_mask_and_spread():
    slices, labels = small_set()
    prior = ImagePrior.fit(slices, labels, components=4)
    assert prior.closest_masks(labels[5], 3)[0] == 5
    assert len(prior.closest_masks(labels[5], 3)) == 3
    spread = prior.spread(4)
    assert spread[0] == 0 and spread[-1] == len(slices) - 1 and len(spread) == 4
    assert len(prior.spread(100)) == len(slices)


def test_saved_prior_loads_and_a_bad_file_is_named(tmp_path):
    slices, labels = small_set()
    prior = ImagePrior.fit(slices, labels, components=5, source="test set")
    path = prior.save(tmp_path / "prior.npz")
    again = ImagePrior.load(path)
    assert again.source == "test set" and np.array_equal(again.components, prior.components)
    assert np.array_equal(again.labels, prior.labels) and not list(tmp_path.glob("*.tmp"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a prior")
    with pytest.raises(ValueError, match="bad.npz"):
        ImagePrior.load(bad)
    with pytest.raises(ValueError, match="at least 2"):
        ImagePrior.fit(slices[:1], labels[:1], components=1)


def test_prior_specs(tmp_path, bundle):
    assert load_prior("none", tmp_path, bundle.volume_transforms(), 8) is None
    with pytest.raises(ValueError, match="nothere.json.*not a built-in prior"):
        load_prior(str(tmp_path / "nothere.json"), tmp_path, bundle.volume_transforms(), 8)


def test_a_prior_named_by_a_file_is_refused_even_where_the_file_exists(tmp_path, bundle, cohort):
    public = cohort / "site-2" / "datalist.json"
    with pytest.raises(ValueError, match="not a built-in prior"):
        load_prior(str(public), tmp_path, bundle.volume_transforms(), 8)
    with pytest.raises(ValueError, match="prior_components must be a positive integer"):
        load_prior("synthetic", tmp_path, bundle.volume_transforms(), "8/../../x")
    assert not list(tmp_path.iterdir())  # nothing built, nothing read


def test_synthetic_prior_is_built_once_and_kept(tmp_path, bundle):
    messages = []
    prior = synthetic_prior(tmp_path, bundle.volume_transforms(), components=16, patients=(3,), progress=messages.append)
    assert messages and f"seed {PUBLIC_SEED}" in prior.source
    assert prior.shape == (128, 128) and prior.components.shape[0] == 16 and len(prior.slices) > 16
    assert prior.labels.max() == 1 and 0 <= prior.slices.min() and prior.slices.max() <= 1
    assert not list(tmp_path.glob("public_*"))  # the public cohort's files are not kept
    kept = list(tmp_path.glob("prior_*.npz"))
    assert len(kept) == 1
    messages.clear()
    again = synthetic_prior(tmp_path, bundle.volume_transforms(), components=16, patients=(3,), progress=messages.append)
    assert not messages and np.array_equal(again.slices, prior.slices)  # loaded, not rebuilt
    z = torch.zeros(2, 16)
    assert prior.decode(z).shape == (2, 1, 128, 128)
