"""Segment whole 3D volumes with the bundle (2D network slice by slice) and score them; each
prediction carries the bundle's plausibility report (see :mod:`dpseg.plausibility`)."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dpseg.bundle import Bundle
from dpseg.datalist import patient_id, resolve
from dpseg.metrics import dice
from dpseg.plausibility import case_record, flagged


class Segmenter:
    """The bundle's inference path: preprocessing, slice-wise inferer, inverted postprocessing
    (with its plausibility check)."""

    def __init__(self, bundle: Bundle, network: torch.nn.Module):
        self.pre, self.inferer, self.post = bundle.inference_pipeline()
        self.plausibility_key = bundle.plausibility_key()
        self.config = bundle.root / "configs" / "inference.json"
        self.network = network.eval()
        self.device = bundle.device

    @torch.no_grad()
    def segment(self, image_path: str | Path) -> tuple[np.ndarray, dict]:
        """Label volume (uint8) in the input file's own voxel grid (same shape and affine) and the
        plausibility report the postprocessing put in its meta."""
        data = self.pre({"image": str(image_path)})
        data["pred"] = self.inferer(data["image"].unsqueeze(0).to(self.device), self.network)[0]
        pred = self.post(data)["pred"]
        report = pred.meta.get(self.plausibility_key)
        if report is None:
            raise KeyError(f"the postprocessing of {self.config} put no '{self.plausibility_key}' in the "
                           "prediction's meta (LiverPlausibilityd missing?)")
        return np.asarray(pred.cpu())[0].astype(np.uint8), report

    def __call__(self, image_path: str | Path) -> np.ndarray:
        """Label volume (uint8) in the input file's own voxel grid (same shape and affine)."""
        return self.segment(image_path)[0]


def evaluate(datalist: Path, bundle: Bundle, network: torch.nn.Module, split: str = "test",
             progress=None) -> dict:
    """Per-patient Dice and plausibility report of ``network`` on a split of ``datalist``; returns
    the summary (with ``flagged``: the patients whose prediction is implausible, and the ranges
    checked, ``plausibility_limits``) and the cases."""
    segment = Segmenter(bundle, network)
    cases, limits = [], None
    for n, item in enumerate(resolve(datalist, split)):
        start = time.perf_counter()
        pred, report = segment.segment(item["image"])
        truth = np.asanyarray(nib.load(item["label"]).dataobj)
        cases.append({"patient": patient_id(item), "dice": dice(pred, truth), "seconds": time.perf_counter() - start,
                      "plausibility": case_record(report)})
        limits = report["limits"]
        if progress:
            progress(n + 1, cases[-1])
    scores = [c["dice"] for c in cases]
    return {"datalist": str(datalist), "split": split, "patients": len(cases),
            "mean_dice": float(np.mean(scores)) if scores else float("nan"),
            "min_dice": float(np.min(scores)) if scores else float("nan"),
            "flagged": flagged(cases), "plausibility_limits": limits, "cases": cases}
