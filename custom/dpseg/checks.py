"""Input validation of a site's data: every problem is reported on one line naming the file.

Training runs the same checks before it starts, so bad data never reaches a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from dpseg.datalist import SPLITS, DatalistError, patient_id, read_datalist

LABEL_VALUES = {0, 1}
# A CT volume in Hounsfield units holds air or fat (well below -200 HU) and soft tissue or bone
# (above 100 HU), and nothing outside the scanners' stored range.
HU_MIN_RANGE = (-3100.0, -200.0)
HU_MAX_RANGE = (100.0, 4100.0)
AFFINE_TOL_MM = 1e-3


@dataclass
class Report:
    """The outcome of checking one datalist."""

    datalist: Path
    problems: list[str] = field(default_factory=list)
    patients: dict[str, int] = field(default_factory=dict)  # split -> distinct patients (not scans)
    spacings: set = field(default_factory=set)
    hu_range: tuple[float, float] = (np.inf, -np.inf)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        """A short human-readable summary of good data (patients, spacing, HU)."""
        splits = ", ".join(f"{k} {v}" for k, v in self.patients.items())
        spacing = "; ".join("x".join(f"{s:.2f}" for s in sp) for sp in sorted(self.spacings))
        lo, hi = self.hu_range
        return (f"{self.datalist}: OK\n  patients: {splits}\n  spacing (mm): {spacing}\n"
                f"  intensity range (HU): {lo:.0f} .. {hi:.0f}")


def check_datalist(path: Path, splits: tuple[str, ...] = SPLITS) -> Report:
    """Check a datalist and every volume it lists; never raises for bad data, reports it."""
    path = Path(path)
    report = Report(path)
    try:
        data = read_datalist(path)
    except DatalistError as err:
        report.problems.append(str(err))
        return report
    base = path.resolve().parent
    seen: dict[str, str] = {}  # patient -> split
    images: dict[Path, str] = {}  # image file -> where it is listed first
    for split in splits:
        items = data.get(split)
        if not isinstance(items, list) or not items:
            report.problems.append(f"{path}: split '{split}' is missing or empty")
            continue
        patients = set()
        for n, item in enumerate(items):
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                report.problems.append(f"{path}: {split}[{n}] needs 'image' and 'label'")
                continue
            pid = patient_id(item)
            patients.add(pid)
            if pid in seen and seen[pid] != split:
                report.problems.append(f"{path}: patient {pid} is in both '{seen[pid]}' and '{split}'")
            seen.setdefault(pid, split)
            image = (base / item["image"]).resolve()
            if image in images:
                report.problems.append(f"{path}: {split}[{n}] lists image {item['image']} again (first in "
                                       f"{images[image]}): each scan once, a patient's scans share its 'patient'")
                continue
            images[image] = f"{split}[{n}]"
            report.problems += _check_pair(base / item["image"], base / item["label"], report)
        report.patients[split] = len(patients)
    return report


def _load(path: Path) -> tuple[nib.Nifti1Image | None, np.ndarray | None, str | None]:
    """Load a NIfTI volume fully (so truncation is found); returns (image, data, problem)."""
    if not path.exists():
        return None, None, f"{path}: file missing"
    try:
        img = nib.load(str(path))
        return img, np.asanyarray(img.dataobj), None
    except Exception as err:  # nibabel raises many kinds for damaged files
        return None, None, f"{path}: unreadable or truncated NIfTI ({type(err).__name__}: {err})"


def _check_pair(image_path: Path, label_path: Path, report: Report) -> list[str]:
    """Problems of one image / label pair; records spacing and HU range into ``report``."""
    problems = []
    img, image, err = _load(image_path)
    lab, label, lerr = _load(label_path)
    problems += [e for e in (err, lerr) if e]
    if image is not None:
        if not np.all(np.isfinite(image)):
            problems.append(f"{image_path}: non-finite voxels (NaN or Inf)")
        else:
            lo, hi = float(image.min()), float(image.max())
            report.hu_range = (min(report.hu_range[0], lo), max(report.hu_range[1], hi))
            if not (HU_MIN_RANGE[0] <= lo <= HU_MIN_RANGE[1] and HU_MAX_RANGE[0] <= hi <= HU_MAX_RANGE[1]):
                problems.append(f"{image_path}: intensities {lo:.4g} .. {hi:.4g} do not look like Hounsfield units "
                                f"(expected a minimum in {HU_MIN_RANGE} and a maximum in {HU_MAX_RANGE})")
        report.spacings.add(tuple(round(float(s), 3) for s in img.header.get_zooms()[:3]))
    if label is not None:
        if not np.all(np.isfinite(label)):
            problems.append(f"{label_path}: non-finite voxels (NaN or Inf)")
        else:
            values = set(np.unique(label).tolist())
            if not values <= LABEL_VALUES:
                bad = sorted(values - LABEL_VALUES)[:5]
                problems.append(f"{label_path}: label values {bad} outside the allowed set {sorted(LABEL_VALUES)}")
    if image is not None and label is not None:
        if image.shape != label.shape:
            problems.append(f"{label_path}: shape {label.shape} differs from image {image_path.name} {image.shape}")
        elif not np.allclose(img.affine, lab.affine, atol=AFFINE_TOL_MM):
            problems.append(f"{label_path}: affine differs from image {image_path.name}")
    return problems
