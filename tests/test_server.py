"""Server components without a running server: the persistor's initial global model."""

import pytest
import torch

from dpseg.server import BundlePersistor


def test_the_same_seed_gives_the_same_initial_global_model():
    a, b, c = (BundlePersistor(initial_model="random", seed=s) for s in (3, 3, 4))
    sa, sb, sc = (p.model.state_dict() for p in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_a_job_starts_from_the_bundle_weights_unless_it_asks_for_a_random_start(tmp_path):
    from dpseg.bundle import Bundle

    shipped = Bundle().load_weights(Bundle().network()).state_dict()
    start = BundlePersistor().model.state_dict()  # the default: the bundle's weights
    assert all(torch.equal(start[k], shipped[k]) for k in shipped)
    random = BundlePersistor(initial_model="random", seed=3).model.state_dict()
    assert any(not torch.equal(random[k], shipped[k]) for k in shipped)
    with pytest.raises(ValueError, match="initial_model"):
        BundlePersistor(initial_model="pretrained")


def test_a_bundle_start_without_weights_fails_naming_the_missing_file(tmp_path, monkeypatch):
    import shutil

    from dpseg.bundle import ENV_BUNDLE_DIR, Bundle

    copy = tmp_path / "bundle"
    shutil.copytree(Bundle().root, copy, ignore=shutil.ignore_patterns("model.pt"))
    monkeypatch.setenv(ENV_BUNDLE_DIR, str(copy))
    with pytest.raises(FileNotFoundError, match="model.pt"):
        BundlePersistor(initial_model="bundle")
    BundlePersistor(initial_model="random")  # a random start needs no weights
