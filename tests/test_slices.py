"""SliceSet: the mask digests and the best guess an attacker makes from a mask alone."""

import numpy as np

from dpseg.datalist import resolve
from dpseg.slices import SliceSet, mask_key


def test_mask_chances_are_those_of_the_best_guess_from_the_mask_alone(bundle, cohort):
    slices = SliceSet(resolve(cohort / "site-1" / "datalist.json", "training"), bundle.volume_transforms(),
                      with_labels=True)
    assert slices.labels.dtype == bool and slices.labels.shape == slices.slices.shape
    assert [mask_key(m) for m in slices.labels] == list(slices.mask_keys)
    empty = int(np.flatnonzero(~slices.labels.reshape(len(slices), -1).any(axis=1))[0])
    n_empty = int((~slices.labels.reshape(len(slices), -1).any(axis=1)).sum())
    chance, patient = slices.mask_chances(empty)  # slices without liver share one (empty) mask
    assert chance == 1 / n_empty and 1 / n_empty <= patient < 1
    liver = int(np.flatnonzero(slices.labels.reshape(len(slices), -1).sum(axis=1) > 50)[0])
    assert slices.mask_chances(liver) == (1.0, 1.0)  # a liver mask of many voxels is its slice's own
    assert mask_key(np.zeros((4, 4))) == mask_key(np.zeros((4, 4), dtype=bool)) != mask_key(np.eye(4))
