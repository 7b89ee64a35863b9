import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.optimizers import DPOptimizer

from dpseg.fastdp import PerSampleGrads, conv_transpose2d_grad_sample


def _batch(bundle, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, *bundle.roi_size(), generator=g)
    y = (torch.rand(n, 1, *bundle.roi_size(), generator=g) > 0.8).float()
    return x, y


def _clipped_noised_grads(bundle, net, x, y, fast: bool):
    """p.grad after DPOptimizer's clipping, noise (seeded) and scaling, as Opacus would apply it."""
    opt = DPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_multiplier=1.3, max_grad_norm=0.5,
                      expected_batch_size=len(x), loss_reduction="mean", generator=torch.Generator().manual_seed(42))
    if fast:
        hooks = PerSampleGrads(net, loss_reduction="mean")
        hooks.backward(x, y, bundle.loss())
    else:
        model = GradSampleModule(net, batch_first=True, loss_reduction="mean")
        bundle.loss()(model(x), y).backward()
    assert opt.pre_step()
    return [p.grad.clone() for p in net.parameters()]


def test_fast_path_gives_the_same_clipped_noised_gradient_as_opacus(bundle):
    x, y = _batch(bundle)
    torch.manual_seed(0)
    net_a = bundle.network()
    net_b = bundle.network()
    net_b.load_state_dict(net_a.state_dict())
    ref = _clipped_noised_grads(bundle, net_a, x, y, fast=False)
    ours = _clipped_noised_grads(bundle, net_b, x, y, fast=True)
    for a, b in zip(ref, ours):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    # and it is really noised and clipped: not the plain batch gradient
    plain = bundle.network()
    plain.load_state_dict(net_a.state_dict())
    bundle.loss()(plain(x), y).backward()
    assert not all(torch.allclose(a, p.grad, atol=1e-4) for a, p in zip(ours, plain.parameters()))


def test_fast_path_leaves_no_batch_gradient_and_restores_requires_grad(bundle):
    x, y = _batch(bundle, n=3)
    net = bundle.network()
    hooks = PerSampleGrads(net)
    loss = hooks.backward(x, y, bundle.loss())
    assert torch.isfinite(loss)
    for p in net.parameters():
        assert p.grad is None and p.requires_grad
        assert p.grad_sample.shape == (3, *p.shape)
    hooks.close()
    bundle.loss()(net(x), y).backward()  # a plain module again
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("stride,padding,output_padding", [(2, 1, 1), (1, 1, 0), (2, 0, 0)])
def test_conv_transpose_per_sample_gradient_matches_functorch(stride, padding, output_padding):
    torch.manual_seed(0)
    layer = torch.nn.ConvTranspose2d(4, 3, 3, stride=stride, padding=padding, output_padding=output_padding)
    x = torch.randn(5, 4, 7, 6)
    out = layer(x)
    g = torch.randn_like(out)
    ours = conv_transpose2d_grad_sample(layer, [x], g)
    prepare_layer(layer)
    ref = ft_compute_per_sample_gradient(layer, [x], g)
    for p in (layer.weight, layer.bias):
        assert torch.allclose(ours[p], ref[p], atol=1e-5)


def test_unsupported_layer_is_refused():
    with pytest.raises(ValueError, match="no per-sample gradient for layer 1"):
        PerSampleGrads(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3), torch.nn.PReLU()))
