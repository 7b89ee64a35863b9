"""The attacker's image prior: what a CT slice looks like, learned from public images.

A curious server can hold public CT of other people. The audit gives its attack such a prior: the
leading principal components of public slices (after the bundle's preprocessing, intensities in
[0, 1]), with those slices and their liver masks as starting points. The attack then searches
images of the form ``mean + sum_k z_k s_k v_k`` (``v_k``: component k, ``s_k``: the standard
deviation of its coefficient over the public slices, ``z``: the unknowns), which look like CT,
instead of all pixel arrays.

Default public images: a synthetic cohort drawn by our generator with a seed of its own
(``PUBLIC_SEED``), so other patients and other scanners than any site's. For the default
(synthetic) cohort this is as close to the sites' data as public data can be: the worst case for
privacy. With real data, ``dpseg audit --prior`` takes public CT of the same kind (any datalist in
the sites' format); an audit job can only name a built-in prior (``PRIOR_SPECS``), so a job never
makes a site read a file of its choosing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dpseg.datalist import resolve
from dpseg.files import write_whole
from dpseg.slices import SliceSet

PUBLIC_SEED = 4242
PUBLIC_PATIENTS = (12, 12, 12)
PRIOR_SPECS = ("none", "synthetic")  # the built-in priors a job may name


@dataclass
class ImagePrior:
    """mean (P,) and components (K, P) (orthonormal rows) over P = H * W pixels; scales (K,): the
    standard deviation of each coefficient over the public slices; slices (N, H, W) in [0, 1] and
    labels (N, H, W) in {0, 1}: the public slices themselves; source: where they came from."""

    mean: np.ndarray
    components: np.ndarray
    scales: np.ndarray
    slices: np.ndarray
    labels: np.ndarray
    source: str = ""

    @classmethod
    def fit(cls, slices: np.ndarray, labels: np.ndarray, components: int, source: str = "") -> "ImagePrior":
        """The ``components`` leading principal components of public slices (N, H, W)."""
        if len(slices) < 2 or slices.shape != labels.shape:
            raise ValueError(f"need at least 2 public slices with masks of the same shape, got {slices.shape} "
                             f"and {labels.shape}")
        flat = slices.reshape(len(slices), -1).astype(np.float32)
        mean = flat.mean(axis=0)
        _, singular, vt = np.linalg.svd(flat - mean, full_matrices=False)
        k = min(components, len(vt))
        scales = singular[:k] / np.sqrt(len(flat))
        return cls(mean, vt[:k].astype(np.float32), scales.astype(np.float32), slices.astype(np.float32),
                   (labels > 0.5).astype(np.float32), source)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.slices.shape[-2:])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Coefficients (B, K) -> images (B, 1, H, W), clamped to [0, 1]."""
        mean, basis = torch.from_numpy(self.mean), torch.from_numpy(self.components)
        flat = mean + (z * torch.from_numpy(self.scales)) @ basis
        return flat.reshape(len(z), 1, *self.shape).clamp(0, 1)

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """Images (B, H, W) -> coefficients (B, K) of their projection on the components."""
        flat = torch.as_tensor(np.asarray(images, dtype=np.float32)).reshape(len(images), -1)
        return ((flat - torch.from_numpy(self.mean)) @ torch.from_numpy(self.components).T) / torch.from_numpy(self.scales)

    def closest_masks(self, mask: np.ndarray, n: int) -> np.ndarray:
        """Indices of the ``n`` public slices whose mask has the highest Dice with ``mask`` (H, W)."""
        query = np.asarray(mask).reshape(-1) > 0.5
        public = self.labels.reshape(len(self.labels), -1) > 0.5
        dice = 2 * (public & query).sum(1) / (public.sum(1) + query.sum() + 1e-9)
        return np.argsort(-dice, kind="stable")[:n]

    def spread(self, n: int) -> np.ndarray:
        """``n`` public slices evenly spaced through the set (every patient, every level)."""
        return np.unique(np.linspace(0, len(self.slices) - 1, min(n, len(self.slices))).astype(int))

    def save(self, path: Path) -> Path:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, mean=self.mean, components=self.components, scales=self.scales,
                                    slices=self.slices, labels=self.labels.astype(np.uint8), source=self.source)
        return write_whole(Path(path), write)

    @classmethod
    def load(cls, path: Path) -> "ImagePrior":
        try:
            with np.load(Path(path)) as f:
                return cls(f["mean"], f["components"], f["scales"], f["slices"], f["labels"].astype(np.float32),
                           str(f["source"]))
        except (OSError, KeyError, ValueError) as err:
            raise ValueError(f"{path}: not an image prior ({err})") from err


def _all_items(datalist: Path) -> list[dict]:
    return [it for split in ("training", "validation", "test") for it in resolve(Path(datalist), split)]


def prior_from_datalist(datalist: Path, volume_transforms, components: int) -> ImagePrior:
    """The prior of every patient (all splits) of a public datalist."""
    items = _all_items(datalist)
    if not items:
        raise ValueError(f"{datalist}: no patient in any split")
    cohort = SliceSet(items, volume_transforms, with_labels=True)
    return ImagePrior.fit(cohort.slices, cohort.labels, components, source=f"datalist {Path(datalist).name}, "
                                                                            f"{len(items)} patients")


def synthetic_prior(folder: Path, volume_transforms, components: int, seed: int = PUBLIC_SEED,
                    patients: tuple[int, ...] = PUBLIC_PATIENTS, progress: Callable[[str], None] | None = None) -> ImagePrior:
    """The default prior: a synthetic public cohort (``seed``; sites of ``patients`` patients) is
    written under ``folder``, fitted, and kept as ``folder/prior_<seed>_<patients>_<components>.npz``
    (reused when present; the cohort's NIfTI files are removed afterwards)."""
    from dpseg.synthetic import write_cohort

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cached = folder / f"prior_{seed}_{'-'.join(map(str, patients))}_{components}.npz"
    if cached.exists():
        return ImagePrior.load(cached)
    if progress:
        progress(f"building the attacker's public prior: synthetic cohort (seed {seed}, {sum(patients)} patients) "
                 f"in {folder}")
    public = Path(tempfile.mkdtemp(prefix=f"public_{seed}_", dir=folder))  # its own for each builder
    try:
        datalists = write_cohort(public, n_sites=len(patients), patients=list(patients), seed=seed)
        cohorts = [SliceSet(_all_items(d), volume_transforms, with_labels=True) for d in datalists]
    finally:
        shutil.rmtree(public, ignore_errors=True)
    prior = ImagePrior.fit(np.concatenate([c.slices for c in cohorts]), np.concatenate([c.labels for c in cohorts]),
                           components, source=f"synthetic public cohort, seed {seed}, {sum(patients)} patients")
    prior.save(cached)
    return prior


def load_prior(name: str, folder: Path, volume_transforms, components: int,
               progress: Callable[[str], None] | None = None) -> ImagePrior | None:
    """The built-in prior ``name`` (one of ``PRIOR_SPECS``): ``"none"`` (no prior: the attack
    searches pixels) or ``"synthetic"`` (``synthetic_prior``, built once and kept in ``folder``).
    It comes from this installed package, never from a file: a job names a prior, it cannot point
    a site at one. Public CT of one's own (``prior_from_datalist``) is for ``dpseg audit`` only.

    Raises:
        ValueError: ``name`` is not a built-in prior, or ``components`` not a positive integer
            (it names the kept file).
    """
    if isinstance(components, bool) or not isinstance(components, int) or components < 1:
        raise ValueError(f"attack prior_components must be a positive integer, got {components!r}")
    if name == "none":
        return None
    if name == "synthetic":
        return synthetic_prior(folder, volume_transforms, components, progress=progress)
    raise ValueError(f"attack prior {name!r}: not a built-in prior ({', '.join(PRIOR_SPECS)}); a job names one "
                     "of these, never a file")
