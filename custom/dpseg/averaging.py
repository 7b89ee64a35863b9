"""Averaging of the global models across rounds, at the server: an exponential moving average.

    average_1 = w_1 (the global model after the first round)
    average_t = decay * average_{t-1} + (1 - decay) * w_t

It is computed from the global models alone, which the server holds anyway (with DP: from the
sites' noised updates), so it is post-processing and costs no privacy. The sites keep training
from the plain global model w_t; the average is only the job's output (``dpseg.server``).
"""

from __future__ import annotations

import numpy as np


def checked_decay(decay: float) -> float:
    """``decay`` as a float in [0, 1); 0 means no averaging (the output is the last global model)."""
    decay = float(decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"average_decay must be in [0, 1) (0: no averaging), got {decay}")
    return decay


def averaged(previous: dict[str, np.ndarray] | None, current: dict[str, np.ndarray],
             decay: float) -> dict[str, np.ndarray]:
    """The next average of global models: ``current`` where there is no ``previous`` (the first
    round), else ``decay * previous + (1 - decay) * current``, key by key (same keys and shapes, or
    a ValueError naming the first that differs). Arrays of floats; returns new float32 arrays."""
    if previous is None:
        return {k: np.array(v, dtype=np.float32) for k, v in current.items()}
    if previous.keys() != current.keys():
        raise ValueError(f"the global model's keys changed: {sorted(previous.keys() ^ current.keys())[:3]}")
    out = {}
    for key, value in current.items():
        value, before = np.asarray(value, dtype=np.float32), np.asarray(previous[key], dtype=np.float32)
        if value.shape != before.shape:
            raise ValueError(f"the global model's {key} changed shape: {before.shape} -> {value.shape}")
        out[key] = (decay * before + (1.0 - decay) * value).astype(np.float32)
    return out
