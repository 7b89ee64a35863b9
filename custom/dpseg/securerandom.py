"""The randomness of the DP mechanism: AES-256 in counter mode keyed with 256 bits from the OS.

The guarantee assumes the server can predict neither the Gaussian noise a site adds nor which
patients a step samples. An integer-seeded torch or numpy generator does not give that: torch's
CPU generator (MT19937) keeps only the low 32 bits of a seed, so a server can search the seeds,
regenerate the noise and subtract it. Here every draw of the mechanism comes from the AES-256-CTR
keystream (``cryptography``, OpenSSL's implementation) under a key read from ``os.urandom``, fresh
for every ``SecureRandom``; nothing can seed it.

Gaussian noise follows Opacus' ``secure_mode``: each coordinate is the sum of four float32
Gaussian draws divided by two (Holohan and Braghin 2021, section 5.1), which defeats the
floating-point attack on a single textbook Gaussian sample (Jin et al. 2022). Each draw is
Box-Muller on 24-bit uniforms, as torch's own float32 sampler.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 32
# float32 Gaussian draws summed per noise coordinate (the sum is divided by sqrt of this)
GAUSSIAN_DRAWS = 4


class SecureRandom:
    """Uniform, Bernoulli and Gaussian draws from an AES-256-CTR keystream under a fresh OS key.

    Not seedable by design: two instances never produce the same stream.
    """

    def __init__(self) -> None:
        # the key is fresh per instance, so the counter block may start at zero
        self._stream = Cipher(algorithms.AES(os.urandom(KEY_BYTES)), modes.CTR(bytes(16))).encryptor()

    def random_bytes(self, n: int) -> bytearray:
        """``n`` keystream bytes."""
        out = bytearray(n + 15)  # OpenSSL may write up to one block past the input's length
        self._stream.update_into(bytes(n), out)
        del out[n:]
        return out

    def uniform(self, n: int) -> np.ndarray:
        """``n`` float64 draws, uniform on the open interval (0, 1), 53 random bits each."""
        words = np.frombuffer(self.random_bytes(8 * n), dtype=np.uint64)
        return ((words >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0 ** -53

    def bernoulli(self, n: int, rate: float) -> list[int]:
        """Indices in [0, n) each kept independently with probability ``rate`` (a Poisson sample)."""
        return np.flatnonzero(self.uniform(n) < rate).tolist()

    def gaussian(self, n: int, std: float) -> torch.Tensor:
        """``n`` float32 draws of N(0, std^2), each the scaled sum of GAUSSIAN_DRAWS draws."""
        total = GAUSSIAN_DRAWS * n + (GAUSSIAN_DRAWS * n) % 2
        half = total // 2
        words = torch.frombuffer(self.random_bytes(4 * total), dtype=torch.int32)
        u = ((words >> 8) & 0xFFFFFF).to(torch.float32).add_(0.5).mul_(2.0 ** -24)  # (0, 1), 24 bits
        radius = u[:half].log_().mul_(-2.0).sqrt_()
        angle = u[half:].mul_(2.0 * math.pi)
        draws = torch.empty(total, dtype=torch.float32)
        torch.mul(radius, torch.cos(angle), out=draws[:half])
        torch.mul(radius, angle.sin_(), out=draws[half:])
        return draws[:GAUSSIAN_DRAWS * n].view(GAUSSIAN_DRAWS, n).sum(0).mul_(std / math.sqrt(GAUSSIAN_DRAWS))

    def numpy_state(self) -> np.random.RandomState:
        """A numpy RandomState keyed with 256 keystream bits, for MONAI's random transforms (which
        slice of a sampled patient is drawn): not part of the mechanism's randomness, since the
        sensitivity bound holds for any slice, but no party can predict it either."""
        return np.random.RandomState(np.frombuffer(self.random_bytes(KEY_BYTES), dtype=np.uint32))
