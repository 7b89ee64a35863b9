"""Local training of one site, with or without DP-SGD (plain PyTorch and Opacus, no NVFlare).

Each step draws a Poisson sample of the site's training PATIENTS (each patient independently with
probability ``sample_rate``, a public setting), takes ``slices_per_patient`` K random axial slices
of each (each from one of the patient's scans, by the bundle's training transforms), computes
per-patient gradients (of the mean of the patient's K slice losses), clips each to
``max_grad_norm``, adds Gaussian noise of std ``noise_multiplier * max_grad_norm`` to their sum and
divides by the public ``batch_size`` (Opacus' DPOptimizer). A patient's K slices are clipped
together, once, so K changes neither the sensitivity nor the accounting, only the variance of a
patient's gradient. Empty samples still take a step (noise only), as the analysis assumes.

``train_layers`` (``set_trained_layers``) freezes part of the network: frozen parameters get
neither per-sample gradients nor noise, so the noise has the dimension of the trained ones.

With DP, the Poisson sample, the noise and the slice draws come from ``dpseg.securerandom`` (a
fresh OS key per trainer; nothing can seed them). Without DP, everything follows ``seed``, so the
same seed gives the same run.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import get_track_meta, set_track_meta
from monai.transforms import Compose, Randomizable
from monai.networks.layers import SkipConnection
from monai.networks.nets import UNet
from torch import nn
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

from dpseg.datalist import patient_id
from dpseg.fastdp import PerSampleGrads, checked_slices_per_patient
from dpseg.privacy import Accountant
from dpseg.securerandom import SecureRandom

# "fast": dpseg.fastdp (no wasted batch weight gradient); "hooks" / "functorch": Opacus' GradSampleModule
GRAD_SAMPLE_MODES = ("fast", "hooks", "functorch")
OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
# "poisson": each patient independently with the sample rate (what the DP analysis assumes);
# "fixed": exactly batch_size distinct patients per step (non-DP audits only: one known slice per update)
SAMPLINGS = ("poisson", "fixed")
TRAIN_LAYERS = ("all", "decoder", "norm")
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def unet_paths(network: nn.Module) -> tuple[list[str], str, list[str]]:
    """Module paths of a MONAI UNet: (down path, top level first; bottom level; up path, top level
    first, whose first entry is the output layer). For the bundle's network: down ``model.0``,
    ``model.1.submodule.0``, ``model.1.submodule.1.submodule.0``; bottom
    ``model.1.submodule.1.submodule.1.submodule``; up ``model.2``, ``model.1.submodule.2``,
    ``model.1.submodule.1.submodule.2``."""
    if not isinstance(network, UNet):
        raise ValueError(f"train_layers other than 'all' needs the bundle's MONAI UNet, got {type(network).__name__}")
    down, up, prefix, level = [], [], "model", network.model
    while isinstance(level, nn.Sequential) and len(level) == 3 and isinstance(level[1], SkipConnection):
        down.append(f"{prefix}.0")
        up.append(f"{prefix}.2")
        prefix, level = f"{prefix}.1.submodule", level[1].submodule
    if not up:
        raise ValueError("train_layers: the network is not a MONAI UNet of down / skip / up levels")
    return down, prefix, up


def set_trained_layers(network: nn.Module, train_layers: str) -> int:
    """Train only part of ``network``: every other parameter gets ``requires_grad`` False (no
    per-sample gradient, no noise, no update). Returns the number of trained parameters.

    For the bundle's UNet (channels 16, 32, 64, 128; 206,188 parameters; paths in ``unet_paths``):

    - "all": every parameter (206,188);
    - "decoder": the up path (``model.1.submodule.1.submodule.2``, ``model.1.submodule.2`` and
      the output layer ``model.2``) and the affine weight and bias of every norm layer, the
      encoder's included (77,420); the down path and the bottom level stay as loaded;
    - "norm": the affine weight and bias of every norm layer and the output layer ``model.2``
      (its transposed convolution, norm and final convolution) (1,292).
    """
    if train_layers not in TRAIN_LAYERS:
        raise ValueError(f"train_layers must be one of {TRAIN_LAYERS}, got {train_layers!r}")
    if train_layers == "all":
        trained = set(network.parameters())
    else:
        _, _, up = unet_paths(network)
        kept = up if train_layers == "decoder" else up[:1]
        trained = {p for name, p in network.named_parameters() if any(name.startswith(f"{k}.") for k in kept)}
        trained |= {p for m in network.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    for p in network.parameters():
        p.requires_grad_(p in trained)
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


class SecureDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer whose Gaussian noise comes from a SecureRandom: one draw per step for
    all parameters, never from a torch generator."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, noise_source: SecureRandom, **kwargs):
        super().__init__(optimizer, generator=None, secure_mode=False, **kwargs)
        self.noise_source = noise_source

    def add_noise(self) -> None:
        """p.grad = p.summed_grad + N(0, (noise_multiplier * max_grad_norm)^2) per coordinate."""
        sizes = [p.summed_grad.numel() for p in self.params]
        noise = self.noise_source.gaussian(sum(sizes), self.noise_multiplier * self.max_grad_norm)
        for p, chunk in zip(self.params, torch.split(noise, sizes)):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + chunk.view_as(p.summed_grad).to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


def make_private(network: torch.nn.Module, optimizer: torch.optim.Optimizer, mode: str, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, noise_source: SecureRandom,
                 slices_per_patient: int = 1):
    """Wrap a network and its optimiser for DP-SGD: (model to call, PerSampleGrads or None, SecureDPOptimizer).

    ``mode`` is one of GRAD_SAMPLE_MODES; with "fast" the network itself is called and
    ``PerSampleGrads.backward`` fills the per-sample (per-patient, with ``slices_per_patient`` > 1)
    gradients; Opacus' modes take one slice per patient only. The summed, noised gradient is
    divided by ``expected_batch_size`` (a public constant, never the realised batch size).
    """
    if mode not in GRAD_SAMPLE_MODES:
        raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {mode!r}")
    if slices_per_patient != 1 and mode != "fast":
        raise ValueError(f"slices_per_patient={slices_per_patient} needs grad_sample_mode 'fast' (Opacus' "
                         f"{mode!r} mode clips every slice on its own), got {mode!r}")
    per_sample, model = None, network
    if mode == "fast":
        per_sample = PerSampleGrads(network, loss_reduction="mean", slices_per_patient=slices_per_patient)
    else:
        model = GradSampleModule(network, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch")
    dp_optimizer = SecureDPOptimizer(optimizer, noise_source=noise_source, noise_multiplier=noise_multiplier,
                                     max_grad_norm=max_grad_norm, expected_batch_size=expected_batch_size,
                                     loss_reduction="mean")
    return model, per_sample, dp_optimizer


class PatientSlices:
    """A site's training patients as a dataset: ``batch(indices, k)`` gives ``k`` random slices of
    each given patient, each from one of the patient's scans chosen at random.

    Items of the datalist are scans; the items of this dataset are patients (``patient_id``), so a
    patient with several scans is one unit of sampling and of sensitivity. The deterministic part
    of the bundle's transforms (load, orient, resample, window: up to the first random transform)
    is cached once, compactly (``compact``: each label as uint8 where that is exact, each image as
    uint16 levels; both float32 again before the random part); the scan and slice draws (and
    intensity shifts) run on every access from ``random_state`` (if None, numpy's and MONAI's
    global state).
    """

    def __init__(self, items: list[dict], train_transforms, random_state: np.random.RandomState | None = None):
        steps = list(train_transforms.transforms)
        first_random = next((i for i, t in enumerate(steps) if isinstance(t, Randomizable)), len(steps))
        deterministic, self.random_part = Compose(steps[:first_random]), Compose(steps[first_random:])
        self.cache = [compact(deterministic(item)) for item in items]
        scans: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            scans.setdefault(patient_id(item), []).append(index)
        self.patients = list(scans.values())
        self.random_state = random_state if random_state is not None else np.random.RandomState()
        if random_state is not None:
            train_transforms.set_random_state(state=random_state)

    def __len__(self) -> int:
        return len(self.patients)

    def batch(self, indices: list[int], slices_per_patient: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B*K, 1, H, W) in [0, 1] and labels (B*K, 1, H, W) for the B given patients, K =
        ``slices_per_patient`` consecutive rows per patient, each slice drawn on its own (scan,
        crop, intensity shift)."""
        with plain_tensors():
            samples = [self.random_part(expanded(self.cache[self._scan(i)]))
                       for i in indices for _ in range(slices_per_patient)]
        samples = [s[0] if isinstance(s, list) else s for s in samples]
        return torch.stack([torch.as_tensor(s["image"]) for s in samples]), \
            torch.stack([torch.as_tensor(s["label"]) for s in samples])

    def _scan(self, patient: int) -> int:
        scans = self.patients[patient]
        return scans[0] if len(scans) == 1 else scans[int(self.random_state.randint(len(scans)))]


@contextmanager
def plain_tensors():
    """MONAI transforms inside return plain tensors, without the metadata (affine, applied
    operations) they would otherwise copy at every step: the same values, a quarter less time for
    a training slice's draw. Restores the setting before (MONAI's, one for the process)."""
    before = get_track_meta()
    set_track_meta(False)
    try:
        yield
    finally:
        set_track_meta(before)


IMAGE_LEVELS = 65535  # a cached image in [0, 1] is q / IMAGE_LEVELS, q a uint16


def compact(volume: dict) -> dict:
    """A preprocessed volume to cache in under half of float32's memory: its label as uint8 where
    that keeps every value exactly; its image, where every value lies in [0, 1] (the bundle's
    window clips to it), as uint16 levels q = round(x * 65535): an error of at most 7.7e-6, under
    0.01 HU for any HU window narrower than 1,300 HU (``expanded`` turns both back into float32)."""
    out = dict(volume)
    label = volume.get("label")
    if isinstance(label, torch.Tensor) and label.is_floating_point():
        small = label.to(torch.uint8)
        if torch.equal(small.to(label.dtype), label):
            out["label"] = small
    image = volume.get("image")
    if isinstance(image, torch.Tensor) and image.is_floating_point() and image.numel() \
            and float(image.min()) >= 0.0 and float(image.max()) <= 1.0:
        out["image"] = torch.round(image * IMAGE_LEVELS).to(torch.uint16)
    return out


def expanded(volume: dict) -> dict:
    """A cached volume ready for the transforms after the cache: new tensors (the cache's are never
    handed out), float32 again; each tensor is copied once."""
    def fresh(key: str, value):
        if not isinstance(value, torch.Tensor):
            return value
        if key == "label" and value.dtype == torch.uint8:
            return value.to(torch.float32)
        if key == "image" and value.dtype == torch.uint16:
            return value.to(torch.float32).div_(IMAGE_LEVELS)
        return value.clone()
    return {k: fresh(k, v) for k, v in volume.items()}


def seeded_slices(items: list[dict], train_transforms, seed: int) -> PatientSlices:
    """Patients whose scan and slice draws follow ``seed`` (training without DP, tests)."""
    return PatientSlices(items, train_transforms, np.random.RandomState(seed))


def secure_slices(items: list[dict], train_transforms, source: SecureRandom) -> PatientSlices:
    """Patients whose scan and slice draws no party can predict (training with DP)."""
    return PatientSlices(items, train_transforms, source.numpy_state())


def poisson_sample(n: int, rate: float, generator: torch.Generator) -> list[int]:
    """Indices of a seeded Poisson sample (training without DP): each of ``n`` items
    independently with probability ``rate``."""
    return torch.nonzero(torch.rand(n, generator=generator) < rate).flatten().tolist()


def fixed_sample(n: int, size: int, generator: torch.Generator) -> list[int]:
    """Indices of ``min(size, n)`` distinct items drawn uniformly (not a DP sampler)."""
    return sorted(torch.randperm(n, generator=generator)[:size].tolist())


@dataclass
class StepStats:
    steps: int = 0
    samples: int = 0
    empty_steps: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.loss_count if self.loss_count else float("nan")


class LocalTrainer:
    """Runs local steps on a network in place. ``accountant`` None means no DP (the baseline).

    ``sample_rate``: the Poisson rate per patient; with DP it is the accountant's (a public
    setting); without DP, None means ``batch_size`` / patients. ``batch_size``: the expected batch
    the summed gradient is divided by (with DP, a public constant) and the size of a "fixed" sample.
    Without DP, batches are Poisson samples too, so the two modes differ only by clipping and noise;
    with DP the sample and the noise come from a SecureRandom of this trainer, without DP from
    ``seed``. The network keeps plain state-dict keys throughout.
    ``optimizer``: "adam" (default) or "sgd"; ``sampling``: "poisson" (default; the only one
    allowed with DP) or "fixed". With ``record`` the images and labels of every step's batch are
    kept in ``self.batches`` (for a site's own audit; they never leave the site), K rows per patient.
    ``slices_per_patient`` K: slices per sampled patient; the step's loss is the mean over patients
    of each patient's mean slice loss, and with DP each patient's gradient is clipped once.
    ``train_layers``: which parameters train (``set_trained_layers``); ``self.trained_parameters``
    is their number. ``per_sample_hook(indices, params)``: called in every DP step (grad-sample
    mode "fast") after the per-sample gradients (``p.grad_sample``) of the sampled patients
    ``indices`` are computed (also when none is sampled) and before they are clipped: the privacy
    audits' way in (their canaries: ``dpseg.tools.privacyaudit``, ``dpseg.canaries``); None in
    training.
    """

    def __init__(self, network: torch.nn.Module, loss_fn, data: PatientSlices, lr: float, batch_size: int,
                 accountant: Accountant | None = None, seed: int = 0, grad_sample_mode: str = "fast",
                 optimizer: str = "adam", sampling: str = "poisson", record: bool = False,
                 sample_rate: float | None = None, slices_per_patient: int = 1, train_layers: str = "all",
                 per_sample_hook=None):
        if grad_sample_mode not in GRAD_SAMPLE_MODES:  # also without DP: a typo must not pass silently
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {tuple(OPTIMIZERS)}, got {optimizer!r}")
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if accountant is not None and sampling != "poisson":
            raise ValueError("DP training needs Poisson sampling (the accountant assumes it); "
                             f"sampling={sampling!r} is only allowed without DP")
        self.network, self.loss_fn, self.data = network, loss_fn, data
        self.accountant, self.batch_size, self.sampling = accountant, batch_size, sampling
        self.slices_per_patient = checked_slices_per_patient(slices_per_patient)
        self.per_sample: PerSampleGrads | None = None
        self.record, self.batches = record, []
        self.per_sample_hook = per_sample_hook
        self.trained_parameters = set_trained_layers(network, train_layers)
        base = OPTIMIZERS[optimizer]([p for p in network.parameters() if p.requires_grad], lr=lr)
        if accountant is None:
            self.sample_rate = sample_rate if sample_rate is not None else batch_size / len(data)
            generator = torch.Generator().manual_seed(seed)
            self._poisson = lambda n, rate: poisson_sample(n, rate, generator)
            self._fixed = lambda n, size: fixed_sample(n, size, generator)
            self.model, self.optimizer = network, base
        else:
            s = accountant.plan
            self.sample_rate = s.sample_rate
            self.random = SecureRandom()
            self._poisson = self.random.bernoulli
            self.model, self.per_sample, self.optimizer = make_private(
                network, base, grad_sample_mode, s.noise_multiplier, s.max_grad_norm, s.batch_size, self.random,
                slices_per_patient)

    def step(self, stats: StepStats) -> None:
        """One optimizer step on a fresh Poisson sample of patients."""
        self.model.train()
        if self.sampling == "fixed":
            indices = self._fixed(len(self.data), self.batch_size)
        else:
            indices = self._poisson(len(self.data), self.sample_rate)
        self.optimizer.zero_grad(set_to_none=True)
        if self.record:
            self.batches.append({"patients": indices})
        if indices:
            x, y = self.data.batch(indices, self.slices_per_patient)
            if self.record:
                self.batches[-1].update(images=x.as_subclass(torch.Tensor).clone(),
                                        labels=y.as_subclass(torch.Tensor).clone())
            if self.per_sample is not None:
                loss = self.per_sample.backward(x, y, self.loss_fn)
                if self.per_sample_hook is not None:
                    self.per_sample_hook(indices, self.per_sample.params)
            else:
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
            stats.loss_sum += float(loss.detach()) * len(indices)
            stats.loss_count += len(indices)
        elif self.accountant is not None:
            for p in self.optimizer.params:  # no patient: clipped sum is zero, noise still added
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            if self.per_sample_hook is not None:
                self.per_sample_hook(indices, self.optimizer.params)
        else:
            stats.empty_steps += 1
            stats.steps += 1
            return
        self.optimizer.step()
        if self.accountant is not None:
            self.accountant.step()
        stats.steps += 1
        stats.samples += len(indices)
        stats.empty_steps += not indices

    def poisson(self, n: int) -> list[int]:
        """A Poisson sample of ``range(n)`` at this trainer's rate, from its own sampler (with DP the
        secure one): how an audit's canaries are sampled like patients."""
        return self._poisson(n, self.sample_rate)

    def run(self, steps: int, abort=lambda: False) -> StepStats:
        """Run ``steps`` steps (fewer if ``abort()`` turns true); the optimiser state persists.

        With ``record``, ``self.batches`` holds this run's batches only."""
        stats = StepStats()
        self.batches = []
        for _ in range(steps):
            if abort():
                break
            self.step(stats)
        self.optimizer.zero_grad(set_to_none=True)
        return stats

    def close(self) -> None:
        """Detach the per-sample gradient hooks so the network is a plain module again."""
        if isinstance(self.model, GradSampleModule):
            self.model._close()
        if self.per_sample is not None:
            self.per_sample.close()
