"""The one place the code reads the MONAI bundle: network, transforms, loss, inferer.

The bundle (``bundles/ct_liver_seg``) is the single source of truth; nothing here redefines a
layer or a transform. The bundle is found at ``$DPSEG_BUNDLE_DIR`` or next to this package's
source tree (the installed copy of a site). Its own Python code (``scripts/``, the plausibility
check of its inference) is imported as ``scripts`` with the bundle root on the path, as MONAI's
bundle runner and MONAI Label import it.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import torch
from monai.bundle import ConfigParser

from dpseg.shipped import shipped

BUNDLE_NAME = "ct_liver_seg"
ENV_BUNDLE_DIR = "DPSEG_BUNDLE_DIR"


def default_bundle_dir() -> Path:
    """The installed bundle: ``$DPSEG_BUNDLE_DIR`` if set, else the shipped ``bundles/ct_liver_seg``
    (``dpseg.shipped``: the checkout's, or the installed copy)."""
    configured = os.environ.get(ENV_BUNDLE_DIR)
    path = Path(configured) if configured else shipped(f"bundles/{BUNDLE_NAME}")
    if not (path / "configs" / "train.json").is_file():
        source = f"${ENV_BUNDLE_DIR}={configured}" if configured else "the package's bundles/ folder"
        raise FileNotFoundError(f"no MONAI bundle at {path} (from {source}): configs/train.json is missing")
    return path


SCRIPTS = "scripts"


@contextmanager
def bundle_scripts(root: Path):
    """Within the block, ``import scripts`` imports ``root/scripts`` (a ``scripts`` package of another
    bundle is unloaded first, as MONAI Label does); the root leaves ``sys.path`` afterwards, the
    imported modules stay loaded."""
    root = Path(root).resolve()
    if not (root / SCRIPTS / "__init__.py").is_file():
        raise FileNotFoundError(f"the bundle {root} has no {SCRIPTS}/__init__.py")
    loaded = sys.modules.get(SCRIPTS)
    origin = getattr(loaded, "__file__", None)
    if loaded is not None and (origin is None or Path(origin).resolve().parent.parent != root):
        for name in [m for m in sys.modules if m == SCRIPTS or m.startswith(SCRIPTS + ".")]:
            del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))


class Bundle:
    """Parsed configs of the bundle; every getter builds a fresh object from the bundle's JSON.

    ``dataset_dir`` is only needed for the bundle's own datasets (not for the getters here).
    """

    def __init__(self, root: Path | None = None, device: str | torch.device = "cpu"):
        self.root = Path(root) if root else default_bundle_dir()
        self.device = torch.device(device)

    def _parser(self, name: str) -> ConfigParser:
        parser = ConfigParser()
        parser.read_meta(str(self.root / "configs" / "metadata.json"))
        parser.read_config(str(self.root / "configs" / name))
        parser["bundle_root"] = str(self.root)
        parser["device"] = f"$torch.device('{self.device}')"
        return parser

    @cached_property
    def train_config(self) -> ConfigParser:
        return self._parser("train.json")

    @cached_property
    def inference_config(self) -> ConfigParser:
        return self._parser("inference.json")

    @cached_property
    def metadata(self) -> dict:
        return self.train_config.get("_meta_")

    def _build(self, parser: ConfigParser, key: str):
        return parser.get_parsed_content(key, instantiate=True, lazy=False)

    def network(self) -> torch.nn.Module:
        """A new, randomly initialised network (2D: input (B, 1, H, W) -> logits (B, 2, H, W))."""
        return self._build(self.train_config, "network_def").to(self.device)

    def loss(self) -> torch.nn.Module:
        """The training loss: mean over the batch of per-sample losses (no batch coupling)."""
        return self._build(self.train_config, "loss")

    def train_transforms(self):
        """Patient volume -> one random axial slice: dict with image (1, H, W) in [0, 1] and label."""
        return self._build(self.train_config, "train#preprocessing")

    def volume_transforms(self):
        """Patient volume -> whole preprocessed volume (1, H, W, D), for validation."""
        return self._build(self.train_config, "validate#preprocessing")

    def intensity_shift(self) -> float:
        """The largest random intensity shift training adds to a slice, in window units ([0, 1]
        spans the HU window): RandShiftIntensityd's offsets, 0 without one. Public: the auditor's
        attacker knows it."""
        from monai.transforms import RandShiftIntensityd

        shifts = [t for t in self.train_transforms().transforms if isinstance(t, RandShiftIntensityd)]
        return float(max((max(abs(o) for o in t.shifter.offsets) for t in shifts), default=0.0))

    def roi_size(self) -> tuple[int, int]:
        """In-plane size (voxels) of the network's input slices."""
        return tuple(self.train_config["roi_size"])

    def inferer(self):
        """Applies the 2D network slice by slice to (B, 1, H, W, D) volumes."""
        return self._build(self.inference_config, "inferer")

    def inference_pipeline(self):
        """(preprocessing, inferer, postprocessing) of the inference config, without saving to disk.

        Built from one fresh parse, so postprocessing's Invertd refers to this preprocessing:
        predictions come back in the input volume's own shape and affine.
        """
        from monai.transforms import Compose, SaveImaged

        parser = self._parser("inference.json")
        with bundle_scripts(self.root):
            pre, inferer, post = (parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))
        return pre, inferer, Compose([t for t in post.transforms if not isinstance(t, SaveImaged)])

    def plausibility_key(self) -> str:
        """Where the inference postprocessing puts its plausibility report (the prediction's meta)."""
        return self.inference_config["plausibility_key"]

    def scripts_module(self, name: str):
        """The module ``scripts.<name>`` of the bundle's own Python code (``scripts/<name>.py``)."""
        with bundle_scripts(self.root):
            return importlib.import_module(f"{SCRIPTS}.{name}")

    def model_path(self) -> Path:
        return self.root / "models" / "model.pt"

    def load_weights(self, network: torch.nn.Module, path: Path | None = None) -> torch.nn.Module:
        """Load a plain state dict (strictly: every key must match) into ``network``."""
        state = torch.load(path or self.model_path(), map_location=self.device, weights_only=True)
        network.load_state_dict(state, strict=True)
        return network
