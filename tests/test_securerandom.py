import numpy as np
import pytest
import torch

from dpseg.securerandom import GAUSSIAN_DRAWS, SecureRandom


def test_two_sources_never_draw_the_same_stream():
    a, b = SecureRandom(), SecureRandom()
    assert a.random_bytes(64) != b.random_bytes(64)
    assert not torch.equal(a.gaussian(100, 1.0), b.gaussian(100, 1.0))


def test_gaussian_noise_has_the_stated_std_and_no_bias():
    noise = SecureRandom().gaussian(400_001, 2.5)
    assert noise.dtype == torch.float32 and noise.shape == (400_001,)
    assert float(noise.std()) == pytest.approx(2.5, rel=0.01)
    assert abs(float(noise.mean())) < 0.02
    # Gaussian tails: about 0.27 % beyond 3 std, none beyond 8
    beyond = float((noise.abs() > 3 * 2.5).double().mean())
    assert 0.0022 < beyond < 0.0032 and float(noise.abs().max()) < 8 * 2.5
    assert GAUSSIAN_DRAWS == 4  # the sum of four draws defeats the floating-point attack on one


def test_uniforms_are_open_and_poisson_samples_have_the_rate():
    source = SecureRandom()
    u = source.uniform(100_000)
    assert 0.0 < u.min() and u.max() < 1.0 and u.mean() == pytest.approx(0.5, abs=0.01)
    sizes = [len(source.bernoulli(100, 0.2)) for _ in range(400)]
    assert np.mean(sizes) == pytest.approx(20, abs=1.0)


def test_the_slice_state_is_keyed_from_the_stream():
    a, b = SecureRandom().numpy_state(), SecureRandom().numpy_state()
    assert not np.array_equal(a.randint(0, 2**31, 8), b.randint(0, 2**31, 8))
