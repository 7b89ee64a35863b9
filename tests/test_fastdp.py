import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.optimizers import DPOptimizer

from dpseg.dptrain import SecureDPOptimizer
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


class _Tiny(torch.nn.Module):
    """Every layer kind PerSampleGrads knows: Conv2d, InstanceNorm2d, ConvTranspose2d, GroupNorm, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.norm = torch.nn.InstanceNorm2d(3, affine=True)
        self.up = torch.nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1)
        self.group = torch.nn.GroupNorm(1, 2)
        self.linear = torch.nn.Linear(8, 8)  # along the last (W) axis

    def forward(self, x):
        h = self.norm(torch.nn.functional.leaky_relu(self.conv(x), 0.1))  # conv bias gradients non-zero
        return self.linear(self.group(self.up(h)))


def _tiny(seed=0):
    torch.manual_seed(seed)
    net = _Tiny()
    for p in net.parameters():  # away from the identity init of the norms, so every gradient is non-trivial
        p.data.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    return net, g


def _patient_reference(net, loss_fn, x, y, k):
    """Per patient, the mean of its K slices' gradients, each by plain autograd on that slice alone:
    a list over patients of [gradient per parameter]."""
    grads = []
    for b in range(len(x) // k):
        total = [torch.zeros_like(p) for p in net.parameters()]
        for i in range(b * k, (b + 1) * k):
            net.zero_grad()
            loss_fn(net(x[i:i + 1]), y[i:i + 1]).backward()
            total = [t + p.grad / k for t, p in zip(total, net.parameters())]
        grads.append(total)
    net.zero_grad(set_to_none=True)
    return grads


class _CountingNoise:
    """A noise source for SecureDPOptimizer that draws seeded Gaussians and keeps each draw."""

    def __init__(self):
        self.draws, self.generator = [], torch.Generator().manual_seed(5)

    def gaussian(self, n, std):
        self.draws.append(std * torch.randn(n, generator=self.generator))
        return self.draws[-1].clone()


@pytest.mark.parametrize("k, per_pass", [(1, 8), (4, 8), (4, 2), (1, 1)])  # 3 patients in 1, 2 or 3 passes
def test_a_patients_clipped_gradient_is_the_clipped_mean_of_its_slices_gradients(bundle, k, per_pass):
    net, g = _tiny()
    patients, loss_fn = 3, bundle.loss()
    x = torch.rand(patients * k, 1, 8, 8, generator=g)
    y = (torch.rand(patients * k, 1, 8, 8, generator=g) > 0.5).float()
    reference = _patient_reference(net, loss_fn, x, y, k)
    hooks = PerSampleGrads(net, slices_per_patient=k, patients_per_pass=per_pass)
    loss = hooks.backward(x, y, loss_fn)
    assert torch.isclose(loss, torch.stack([loss_fn(net(x[i:i + 1]), y[i:i + 1]) for i in range(len(x))]).mean())
    for j, p in enumerate(net.parameters()):
        assert p.grad_sample.shape == (patients, *p.shape)  # one row per patient, not per slice
        for b in range(patients):
            assert torch.allclose(p.grad_sample[b], reference[b][j], rtol=1e-4, atol=1e-6), (j, b)
    # Opacus' clipping and our noise: (sum over patients of clip(patient gradient) + noise) / batch_size
    norms = [float(torch.cat([t.flatten() for t in r]).norm()) for r in reference]
    noise, batch_size, clip = _CountingNoise(), 4, (min(norms) + max(norms)) / 2  # some patients clipped, some not
    opt = SecureDPOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), noise_source=noise, noise_multiplier=1.3,
                            max_grad_norm=clip, expected_batch_size=batch_size, loss_reduction="mean")
    assert opt.pre_step()
    assert len(noise.draws) == 1 and noise.draws[0].numel() == sum(p.numel() for p in net.parameters())
    offset = 0
    for j, p in enumerate(net.parameters()):
        clipped = sum(r[j] * min(1.0, clip / (n + 1e-6)) for r, n in zip(reference, norms))
        chunk = noise.draws[0][offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        assert torch.allclose(p.grad, (clipped + chunk) / batch_size, rtol=1e-4, atol=1e-6), j


def test_slices_per_patient_must_divide_the_batch_and_be_a_positive_integer():
    net, _ = _tiny()
    with pytest.raises(ValueError, match="slices_per_patient"):
        PerSampleGrads(net, slices_per_patient=0)
    hooks = PerSampleGrads(net, slices_per_patient=2)
    with pytest.raises(ValueError, match="not 2 slices per patient"):
        hooks.backward(torch.rand(3, 1, 8, 8), torch.zeros(3, 1, 8, 8), lambda out, y: out.mean())


def test_frozen_parameters_get_no_per_sample_gradient():
    net, g = _tiny()
    for p in (*net.conv.parameters(), net.linear.bias):
        p.requires_grad_(False)
    hooks = PerSampleGrads(net, slices_per_patient=2)
    hooks.backward(torch.rand(4, 1, 8, 8, generator=g), torch.rand(4, 2, 8, 8, generator=g),
                   lambda out, y: ((out - y) ** 2).mean())
    assert getattr(net.conv.weight, "grad_sample", None) is None
    assert getattr(net.linear.bias, "grad_sample", None) is None
    assert not net.conv.weight.requires_grad and net.linear.weight.requires_grad
    assert net.linear.weight.grad_sample.shape == (2, 8, 8) and net.up.weight.grad_sample.shape == (2, 3, 2, 3, 3)
