"""A set of patients' axial slices after the bundle's deterministic preprocessing (no augmentation).

The auditor identifies a reconstruction among the site's own training slices; the attacker's
prior (``dpseg.prior``) is fitted on public slices prepared the same way.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def mask_key(mask: np.ndarray) -> int:
    """A 64-bit digest of a binary mask (H, W): equal masks give equal keys."""
    return int.from_bytes(hashlib.blake2b(np.packbits(np.asarray(mask, dtype=bool)).tobytes(), digest_size=8).digest(),
                          "little")


class SliceSet:
    """All axial slices of a list of patients (datalist items): ``slices`` (K, H, W) in [0, 1]
    (the bundle's HU window), ``owners`` (K, 2): (patient index, slice index), ``mean_image``
    (H, W), ``mask_keys`` (K,): a digest of each slice's label mask (equal masks, equal keys: what an
    attacker given the mask can tell apart); with ``with_labels``, ``labels`` (K, H, W) too (bool)."""

    def __init__(self, items: list[dict], volume_transforms, with_labels: bool = False):
        slices, labels, owners, keys = [], [], [], []
        for p, item in enumerate(items):
            data = volume_transforms(item)
            volume = torch.as_tensor(data["image"])[0]  # (H, W, D)
            for z in range(volume.shape[-1]):
                slices.append(volume[..., z].numpy())
                owners.append((p, z))
            masks = (torch.as_tensor(data["label"])[0] > 0.5).numpy()
            keys.extend(mask_key(masks[..., z]) for z in range(masks.shape[-1]))
            if with_labels:
                labels.extend(masks[..., z] for z in range(masks.shape[-1]))
        self.slices = np.stack(slices).astype(np.float32)
        self.labels = np.stack(labels).astype(bool) if with_labels else None
        self.owners = np.asarray(owners)
        self.mask_keys = np.asarray(keys, dtype=np.uint64)
        self.mean_image = self.slices.mean(axis=0)

    def __len__(self) -> int:
        return len(self.slices)

    def mask_chances(self, index: int) -> tuple[float, float]:
        """The success probabilities of the best guess of slice ``index``, and of its patient, made
        from its label mask alone (the slice drawn uniformly among those with that mask): 1 / the
        slices with the same mask, and the largest share of them that one patient holds."""
        same = np.flatnonzero(self.mask_keys == self.mask_keys[index])
        _, counts = np.unique(self.owners[same, 0], return_counts=True)
        return 1.0 / len(same), float(counts.max()) / len(same)

    def locate(self, image: np.ndarray, patient: int) -> int:
        """Index of ``patient``'s slice that ``image`` (H, W) was drawn from (closest after
        removing the mean: training applies a random intensity shift)."""
        rows = np.flatnonzero(self.owners[:, 0] == patient)
        centred = image - image.mean()
        errors = [np.mean((self.slices[r] - self.slices[r].mean() - centred) ** 2) for r in rows]
        return int(rows[int(np.argmin(errors))])
