"""The server's average of the global models (an exponential moving average across rounds)."""

import numpy as np
import pytest
import torch

from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import make_model_learnable
from nvflare.app_common.app_constant import AppConstants

from dpseg.averaging import averaged, checked_decay
from dpseg.server import BundlePersistor
from dpseg.wire import RESUME_FILE


def test_the_average_starts_at_the_first_model_and_then_moves_by_one_minus_decay():
    w1, w2, w3 = ({"a": np.full((2, 3), v, np.float32), "b": np.array([v], np.float32)} for v in (1.0, 3.0, 7.0))
    a1 = averaged(None, w1, 0.5)
    assert np.array_equal(a1["a"], w1["a"]) and a1["a"] is not w1["a"]
    a2 = averaged(a1, w2, 0.5)
    a3 = averaged(a2, w3, 0.5)
    assert np.allclose(a2["a"], 2.0) and np.allclose(a3["b"], 4.5)  # 0.5 * 2 + 0.5 * 7
    assert np.allclose(averaged(a1, w2, 0.0)["a"], 3.0)  # no decay: the last model
    with pytest.raises(ValueError, match="keys changed"):
        averaged(a1, {"a": w2["a"]}, 0.5)
    with pytest.raises(ValueError, match="a changed shape"):
        averaged(a1, {"a": np.ones(6, np.float32), "b": w2["b"]}, 0.5)
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ValueError, match="average_decay must be in"):
            checked_decay(bad)


def _persisted(persistor: BundlePersistor, tmp_path, rounds: list[dict]) -> None:
    """Let ``persistor`` persist one global model per round, as NVFlare's workflow does after each
    round's aggregation."""
    ctx = FLContext()
    ctx.set_prop(FLContextKey.APP_ROOT, str(tmp_path), private=True, sticky=False)
    ctx.set_prop(AppConstants.START_ROUND, 0, private=True, sticky=False)
    ctx.set_prop(AppConstants.NUM_ROUNDS, len(rounds), private=True, sticky=False)
    persistor._initialize(ctx)
    persistor.load_model(ctx)
    for r, weights in enumerate(rounds):
        ctx.set_prop(AppConstants.CURRENT_ROUND, r, private=True, sticky=False)
        persistor.save_model(make_model_learnable(weights, {}), ctx)


def test_with_averaging_the_final_global_model_is_the_average_and_the_resume_point_keeps_both(tmp_path):
    persistor = BundlePersistor(initial_model="random", average_decay=0.75)
    start = {k: v.numpy() for k, v in persistor.model.state_dict().items()}
    rounds = [{k: v + r for k, v in start.items()} for r in (1.0, 2.0, 3.0)]
    _persisted(persistor, tmp_path, rounds)
    final = torch.load(tmp_path / "FL_global_model.pt", weights_only=True)["model"]
    key = next(iter(start))
    expected = 0.75 * (0.75 * rounds[0][key] + 0.25 * rounds[1][key]) + 0.25 * rounds[2][key]
    assert np.allclose(np.asarray(final[key]), expected, atol=1e-5)
    point = torch.load(tmp_path / RESUME_FILE, weights_only=True)
    assert point["completed_round"] == 2
    assert np.allclose(point["model"][key].numpy(), rounds[2][key])  # training goes on from the plain model
    assert np.allclose(point["average"][key].numpy(), expected, atol=1e-5)

    plain = BundlePersistor(initial_model="random")  # no averaging: the final model is the last one
    (tmp_path / "plain").mkdir()
    _persisted(plain, tmp_path / "plain", rounds)
    final = torch.load(tmp_path / "plain" / "FL_global_model.pt", weights_only=True)["model"]
    assert np.allclose(np.asarray(final[key]), rounds[2][key])
    assert "average" not in torch.load(tmp_path / "plain" / RESUME_FILE, weights_only=True)
    with pytest.raises(ValueError, match="average_decay"):
        BundlePersistor(initial_model="random", average_decay=1.0)
