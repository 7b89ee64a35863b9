"""A set of patients' axial slices after the bundle's deterministic preprocessing (no augmentation).

The auditor identifies a reconstruction among the site's own training slices; the attacker's
prior (``dpseg.prior``) is fitted on public slices prepared the same way.
"""

from __future__ import annotations

import numpy as np
import torch


class SliceSet:
    """All axial slices of a list of patients (datalist items): ``slices`` (K, H, W) in [0, 1]
    (the bundle's HU window), ``owners`` (K, 2): (patient index, slice index), ``mean_image``
    (H, W); with ``with_labels``, ``labels`` (K, H, W) in {0, 1} too."""

    def __init__(self, items: list[dict], volume_transforms, with_labels: bool = False):
        slices, labels, owners = [], [], []
        for p, item in enumerate(items):
            data = volume_transforms(item)
            volume = torch.as_tensor(data["image"])[0]  # (H, W, D)
            for z in range(volume.shape[-1]):
                slices.append(volume[..., z].numpy())
                owners.append((p, z))
            if with_labels:
                mask = torch.as_tensor(data["label"])[0]
                labels.extend((mask[..., z] > 0.5).numpy() for z in range(mask.shape[-1]))
        self.slices = np.stack(slices).astype(np.float32)
        self.labels = np.stack(labels).astype(np.float32) if with_labels else None
        self.owners = np.asarray(owners)
        self.mean_image = self.slices.mean(axis=0)

    def __len__(self) -> int:
        return len(self.slices)

    def locate(self, image: np.ndarray, patient: int) -> int:
        """Index of ``patient``'s slice that ``image`` (H, W) was drawn from (closest after
        removing the mean: training applies a random intensity shift)."""
        rows = np.flatnonzero(self.owners[:, 0] == patient)
        centred = image - image.mean()
        errors = [np.mean((self.slices[r] - self.slices[r].mean() - centred) ** 2) for r in rows]
        return int(rows[int(np.argmin(errors))])
