"""Segment whole 3D volumes with the bundle (2D network slice by slice) and score them."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dpseg.bundle import Bundle
from dpseg.datalist import patient_id, resolve
from dpseg.metrics import dice


class Segmenter:
    """The bundle's inference path: preprocessing, slice-wise inferer, inverted postprocessing."""

    def __init__(self, bundle: Bundle, network: torch.nn.Module):
        self.pre, self.inferer, self.post = bundle.inference_pipeline()
        self.network = network.eval()
        self.device = bundle.device

    @torch.no_grad()
    def __call__(self, image_path: str | Path) -> np.ndarray:
        """Label volume (uint8) in the input file's own voxel grid (same shape and affine)."""
        data = self.pre({"image": str(image_path)})
        data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0]
        return np.asarray(self.post(data)["pred"].cpu())[0].astype(np.uint8)


def evaluate(datalist: Path, bundle: Bundle, network: torch.nn.Module, split: str = "test",
             progress=None) -> dict:
    """Per-patient Dice of ``network`` on a split of ``datalist``; returns summary and cases."""
    segment = Segmenter(bundle, network)
    cases = []
    for n, item in enumerate(resolve(datalist, split)):
        start = time.perf_counter()
        pred = segment(item["image"])
        truth = np.asanyarray(nib.load(item["label"]).dataobj)
        cases.append({"patient": patient_id(item), "dice": dice(pred, truth), "seconds": time.perf_counter() - start})
        if progress:
            progress(n + 1, cases[-1])
    scores = [c["dice"] for c in cases]
    return {"datalist": str(datalist), "split": split, "patients": len(cases),
            "mean_dice": float(np.mean(scores)) if scores else float("nan"),
            "min_dice": float(np.min(scores)) if scores else float("nan"), "cases": cases}
