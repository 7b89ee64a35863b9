"""Per-sample gradients for DP-SGD without the batch weight gradient that DP-SGD throws away.

Opacus' GradSampleModule lets autograd compute every parameter's batch gradient, which DP-SGD
discards, and computes the per-sample gradients again in module hooks. Here the parameters are
taken out of autograd for the backward pass (``requires_grad`` off, the input on instead), so
autograd computes only the gradients that flow between layers; a hook on each layer's output
receives that layer's output gradient and computes its per-sample parameter gradients with
Opacus' own grad samplers (Conv2d, InstanceNorm2d, GroupNorm, Linear) or, for ConvTranspose2d, the
unfold formula below. The result lands in ``p.grad_sample``, where Opacus' DPOptimizer clips,
noises and scales it exactly as it would Opacus' own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from torch import nn


def conv_transpose2d_grad_sample(layer: nn.ConvTranspose2d, activations: list, backprops: torch.Tensor) -> dict:
    """Per-sample gradients of a ConvTranspose2d (groups 1): weight (B, Cin, Cout, kh, kw), bias (B, Cout).

    dW[ci, co, a, b] = sum_{h, w} x[ci, h, w] * g[co, h*s - p + a*d, w*s - p + b*d], which is the
    unfold of the output gradient at the layer's stride, padding and dilation.
    """
    x = activations[0]
    batch, c_in = x.shape[:2]
    g = F.unfold(backprops, kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                 stride=layer.stride)
    grads = {layer.weight: torch.einsum("bil,bjl->bij", x.reshape(batch, c_in, -1), g).reshape(
        batch, *layer.weight.shape)}
    if layer.bias is not None:
        grads[layer.bias] = backprops.sum(dim=(2, 3))
    return grads


class PerSampleGrads:
    """Hooks that fill ``p.grad_sample`` (shape (B, *p.shape)) on every trainable parameter.

    ``loss_reduction``: "mean" if the loss is the batch mean of per-sample losses (each row then
    is the gradient of that sample's own loss), "sum" otherwise.
    """

    def __init__(self, network: nn.Module, loss_reduction: str = "mean"):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.network, self.loss_reduction = network, loss_reduction
        self.params = [p for p in network.parameters() if p.requires_grad]
        self.param_ids = set(self.params)
        self.samplers = {}
        for name, module in network.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if isinstance(module, nn.ConvTranspose2d) and module.groups == 1:
                self.samplers[module] = conv_transpose2d_grad_sample
            elif type(module) in GradSampleModule.GRAD_SAMPLERS:
                self.samplers[module] = GradSampleModule.GRAD_SAMPLERS[type(module)]
            else:
                raise ValueError(f"no per-sample gradient for layer {name} ({type(module).__name__})")
        self.handles = [m.register_forward_hook(self._forward_hook) for m in self.samplers]
        self.active = False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self.active and torch.is_grad_enabled() and output.requires_grad):
            return
        activations = [t.detach() for t in inputs]

        def on_grad(grad: torch.Tensor) -> None:
            backprops = grad.detach() * grad.shape[0] if self.loss_reduction == "mean" else grad.detach()
            own = [p for p in module.parameters(recurse=False) if p in self.param_ids]
            for p in own:  # Opacus' samplers skip parameters that do not require grad
                p.requires_grad_(True)
            try:
                grads = self.samplers[module](module, activations, backprops)
            finally:
                for p in own:
                    p.requires_grad_(False)
            for param, gs in grads.items():
                param.grad_sample = gs if getattr(param, "grad_sample", None) is None else param.grad_sample + gs
        output.register_hook(on_grad)

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn) -> torch.Tensor:
        """Forward and backward one batch; returns the loss. ``p.grad`` is left untouched."""
        for p in self.params:
            p.grad_sample = None
            p.requires_grad_(False)
        self.active = True
        try:
            loss = loss_fn(self.network(inputs.detach().requires_grad_(True)), targets)
            loss.backward()
        finally:
            self.active = False
            for p in self.params:
                p.requires_grad_(True)
        return loss

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
