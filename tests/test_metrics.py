"""Image metrics of the audit."""

import numpy as np

from dpseg.metrics import aligned, ssim, ssim_aligned


def test_the_aligned_ssim_forgives_an_affine_change_of_intensity_and_nothing_else():
    rng = np.random.default_rng(0)
    truth = np.clip(rng.random((64, 64)).cumsum(axis=0) / 40, 0, 1)
    changed = 0.8 * truth + 0.1  # what the network barely sees
    assert ssim(changed, truth) < 0.99 and ssim_aligned(changed, truth) > 0.999
    assert np.allclose(aligned(changed, truth), truth, atol=1e-9)
    other = rng.random((64, 64))
    assert ssim_aligned(other, truth) < 0.5  # an unrelated image stays far from it


def test_predicted_labels_are_the_argmax_over_the_classes_ties_included():
    import torch

    from dpseg.metrics import predicted_labels

    logits = torch.randn(2, 2, 8, 8, 3)
    logits[0, 1, 0, 0, 0] = logits[0, 0, 0, 0, 0]  # a tie: class 0, as torch's argmax gives
    assert np.array_equal(predicted_labels(logits), logits.argmax(1).numpy())
    assert predicted_labels(logits)[0, 0, 0, 0] == 0
    three = torch.randn(1, 3, 4, 4)
    assert np.array_equal(predicted_labels(three), three.argmax(1).numpy())
