"""Server components without a running server: the persistor's initial global model."""

import torch

from dpseg.server import BundlePersistor


def test_the_same_seed_gives_the_same_initial_global_model():
    a, b, c = BundlePersistor(seed=3), BundlePersistor(seed=3), BundlePersistor(seed=4)
    sa, sb, sc = (p.model.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
