"""Per-sample gradients for DP-SGD without the batch weight gradient that DP-SGD throws away.

Opacus' GradSampleModule lets autograd compute every parameter's batch gradient, which DP-SGD
discards, and computes the per-sample gradients again in module hooks. Here the parameters are
taken out of autograd for the backward pass (``requires_grad`` off, the input on instead), so
autograd computes only the gradients that flow between layers; a hook on each layer's output
receives that layer's output gradient and computes its per-sample parameter gradients with
Opacus' own grad samplers (Conv2d, InstanceNorm2d, GroupNorm, Linear) or, for ConvTranspose2d, the
unfold formula below. The result lands in ``p.grad_sample``, where Opacus' DPOptimizer clips,
noises and scales it exactly as it would Opacus' own.

Several slices per patient (``slices_per_patient`` K > 1): the batch holds K consecutive rows per
patient, (B*K, ...), and each patient's row of ``p.grad_sample`` (B, *p.shape) is the gradient of
the patient's loss, the mean of its K slices' losses (the sum with ``loss_reduction="sum"``). For
Conv2d, ConvTranspose2d and Linear the K slices are summed inside the layer formula (as more
spatial positions), so no B*K per-slice weight gradients exist; other layers (norm affines: a few
numbers per sample) compute per-slice rows and add them up per patient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.utils.tensor_utils import unfold2d
from torch import nn

# patients per forward / backward pass of a DP step: a pass's activations, not the batch's, set its memory
PATIENTS_PER_PASS = 8


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


def checked_slices_per_patient(value) -> int:
    """``value`` if it is an integer >= 1 (not a bool); else ValueError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"slices_per_patient must be an integer >= 1, got {value!r}")
    return value


def _by_patient(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B*K, ...) -> (B, K, ...): the K consecutive rows of each patient."""
    return t.reshape(t.shape[0] // k, k, *t.shape[1:])


def _summed_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over k and l of a[:, k, p, l] * b[:, k, q, l]: (B, K, P, L), (B, K, Q, L) -> (B, P, Q),
    accumulated slice by slice into one (B, P, Q) buffer (no (B, K, P, Q) product, no copy of the
    operands as a permuted einsum would make)."""
    out = torch.bmm(a[:, 0], b[:, 0].transpose(1, 2))
    for k in range(1, a.shape[1]):
        out.baddbmm_(a[:, k], b[:, k].transpose(1, 2))
    return out


def conv2d_patient_grad_sample(layer: nn.Conv2d, activations: list, backprops: torch.Tensor, k: int) -> dict:
    """Per-patient gradients of a Conv2d (groups 1) from K consecutive slices per patient: weight
    (B, Cout, Cin, kh, kw), bias (B, Cout); each the sum over the patient's slices and positions."""
    x = unfold2d(activations[0].to(backprops.dtype), kernel_size=layer.kernel_size, padding=layer.padding,
                 stride=layer.stride, dilation=layer.dilation)  # (B*K, Cin*kh*kw, L)
    g = backprops.reshape(backprops.shape[0], backprops.shape[1], -1)  # (B*K, Cout, L)
    x, g = _by_patient(x, k), _by_patient(g, k)
    grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = _summed_products(g, x).reshape(x.shape[0], *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = g.sum(dim=(1, 3))
    return grads


def conv_transpose2d_patient_grad_sample(layer: nn.ConvTranspose2d, activations: list, backprops: torch.Tensor,
                                         k: int) -> dict:
    """``conv_transpose2d_grad_sample`` summed over K consecutive slices per patient: weight
    (B, Cin, Cout, kh, kw), bias (B, Cout)."""
    x = activations[0]
    g = F.unfold(backprops, kernel_size=layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                 stride=layer.stride)  # (B*K, Cout*kh*kw, L)
    x, g = _by_patient(x.reshape(x.shape[0], x.shape[1], -1), k), _by_patient(g, k)
    grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = _summed_products(x, g).reshape(x.shape[0], *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = _by_patient(backprops, k).sum(dim=(1, 3, 4))
    return grads


def linear_patient_grad_sample(layer: nn.Linear, activations: list, backprops: torch.Tensor, k: int) -> dict:
    """Per-patient gradients of a Linear layer from K consecutive slices per patient: weight
    (B, out, in), bias (B, out)."""
    x, g = _by_patient(activations[0].to(backprops.dtype), k), _by_patient(backprops, k)
    grads = {}
    if layer.weight.requires_grad:
        grads[layer.weight] = torch.einsum("bk...i,bk...j->bij", g, x)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = torch.einsum("bk...o->bo", g)
    return grads


def summed_by_patient(sampler):
    """A K-slices-per-patient sampler from a per-sample one: its (B*K, ...) rows summed per patient
    (for layers whose per-sample gradients are small, e.g. norm affines)."""
    def summed(layer: nn.Module, activations: list, backprops: torch.Tensor, k: int) -> dict:
        return {p: _by_patient(gs, k).sum(dim=1) for p, gs in sampler(layer, activations, backprops).items()}
    return summed


def patient_sampler(module: nn.Module, sampler):
    """The per-patient version of ``module``'s per-sample ``sampler`` (see the module docstring)."""
    if isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros":
        return conv2d_patient_grad_sample
    if isinstance(module, nn.ConvTranspose2d) and module.groups == 1:
        return conv_transpose2d_patient_grad_sample
    if isinstance(module, nn.Linear):
        return linear_patient_grad_sample
    return summed_by_patient(sampler)


class PerSampleGrads:
    """Hooks that fill ``p.grad_sample`` (shape (B, *p.shape)) on every trainable parameter
    (``requires_grad`` when built; frozen parameters get none).

    ``loss_reduction``: "mean" if the loss is the batch mean of per-sample losses (each row then
    is the gradient of that sample's own loss), "sum" otherwise. ``slices_per_patient`` K: the
    batch's rows come in K consecutive slices per patient and B is the number of patients (each
    row the gradient of the patient's mean slice loss; see the module docstring).
    ``patients_per_pass``: patients per forward and backward pass (bounds the memory of a step).
    """

    def __init__(self, network: nn.Module, loss_reduction: str = "mean", slices_per_patient: int = 1,
                 patients_per_pass: int = PATIENTS_PER_PASS):
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.network, self.loss_reduction = network, loss_reduction
        self.k = checked_slices_per_patient(slices_per_patient)
        if patients_per_pass < 1:
            raise ValueError(f"patients_per_pass must be >= 1, got {patients_per_pass}")
        self.patients_per_pass = int(patients_per_pass)
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
            if self.k > 1:
                self.samplers[module] = patient_sampler(module, self.samplers[module])
        self.handles = [m.register_forward_hook(self._forward_hook) for m in self.samplers]
        self.active = False

    def _forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (self.active and torch.is_grad_enabled() and output.requires_grad):
            return
        activations = [t.detach() for t in inputs]

        def on_grad(grad: torch.Tensor) -> None:
            # "mean": the loss is the mean over B*K slices; B * the slice's gradient is its patient's
            # share (1/K of the gradient of the slice's own loss), and the sampler sums the K shares
            backprops = grad.detach() * (grad.shape[0] // self.k) if self.loss_reduction == "mean" else grad.detach()
            own = [p for p in module.parameters(recurse=False) if p in self.param_ids]
            for p in own:  # Opacus' samplers skip parameters that do not require grad
                p.requires_grad_(True)
            try:
                grads = self.samplers[module](module, activations, backprops, *(() if self.k == 1 else (self.k,)))
            finally:
                for p in own:
                    p.requires_grad_(False)
            for param, gs in grads.items():
                if param not in self.param_ids:  # a frozen parameter of a trained layer
                    continue
                param.grad_sample = gs if getattr(param, "grad_sample", None) is None else param.grad_sample + gs
        output.register_hook(on_grad)

    def backward(self, inputs: torch.Tensor, targets: torch.Tensor, loss_fn) -> torch.Tensor:
        """Forward and backward one batch of (B*K, ...) slices, K consecutive per patient, in passes
        of at most ``patients_per_pass`` patients (each row's gradient is its own, so the passes
        give the rows of one pass over all; the activations held at once are a pass's); returns the
        loss (the mean over all slices). ``p.grad`` is left untouched."""
        if inputs.shape[0] % self.k:
            raise ValueError(f"a batch of {inputs.shape[0]} slices is not {self.k} slices per patient")
        rows = self.patients_per_pass * self.k
        for p in self.params:
            p.requires_grad_(False)
        parts: dict[torch.nn.Parameter, list[torch.Tensor]] = {p: [] for p in self.params}
        total = inputs.new_zeros(())
        self.active = True
        try:
            for start in range(0, inputs.shape[0], rows):
                for p in self.params:
                    p.grad_sample = None
                x, y = inputs[start:start + rows], targets[start:start + rows]
                loss = loss_fn(self.network(x.detach().requires_grad_(True)), y)
                loss.backward()
                total = total + loss.detach() * x.shape[0]
                for p in self.params:
                    parts[p].append(p.grad_sample)
        finally:
            self.active = False
            for p in self.params:
                p.requires_grad_(True)
        for p in self.params:
            p.grad_sample = parts[p][0] if len(parts[p]) == 1 else torch.cat(parts[p])
        return total / inputs.shape[0]

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
