"""Is a predicted liver mask anatomically plausible? Measures, documented ranges, flags.

The network answers on any CT: given a head or a chest it still labels something "liver", with no
warning. This module measures the predicted liver and compares the measures with anatomical ranges.
A measure outside its range gives a *flag* (the output is implausible: look at it before any use);
a measure that is unusual but possible (a partial scan, a large liver) gives a *note*. The ranges
are conservative: a normal abdominal CT raises no flag.

It depends on numpy, scipy and MONAI only (no dpseg): every environment that runs the bundle
(MONAI's bundle runner, MONAI Label's own environment, dpseg) can import it.

Inputs of the functions: ``mask`` (X, Y, Z), the predicted liver (bool or 0/1) in the image's own
voxel grid; ``image`` (X, Y, Z), the CT in Hounsfield units (HU) on the same grid; ``affine`` (4, 4)
from voxel indices to world millimetres whose world axis 2 is the patient's inferior-superior axis
(NIfTI RAS+, MONAI LoadImage's RAS); ``spacing``: voxel size along the array axes in mm.

Ranges (``LIMITS``) and their rationale:

* Volume (mL, the largest connected component, which is what the bundle saves). The adult liver is
  about 1.5 L (CT volumetry: standard liver volume about 1.2-1.8 L, Heinemann et al., Liver Transpl
  1999; Urata et al., Hepatology 1995) and roughly 800-3000 mL across adults when the whole organ is
  in the field of view. Above 3000 mL is hepatomegaly (a note); above 4000 mL only massive
  hepatomegaly (polycystic liver disease, diffuse tumour) reaches, so it is a flag. Below 800 mL is a
  note only: a scan that holds part of the liver, a small or resected liver, or a partly missed one.
* Craniocaudal extent (mm, first to last axial slice of the liver). The liver's length in the
  midclavicular line is under about 160 mm (ultrasound: Gosink and Leymaster, J Clin Ultrasound
  1981; Kratzer et al., J Ultrasound Med 2003); the whole organ on CT, dome to the tip of the right
  lobe, spans about 150-200 mm, up to about 250 mm with a Riedel lobe. 250-300 mm is a note; above
  300 mm a flag (the mask runs into the chest or the pelvis).
* Mean HU inside the predicted liver. Parenchyma is 50-65 HU unenhanced, lower with steatosis (down
  to about 0 HU, slightly below in severe cases), higher with iron overload (up to about 130 HU) or
  contrast (portal phase about 100-130 HU); lesions are labelled liver too (cysts about 0-20 HU).
  A mean below -100 HU is fat (-100 HU) or air (-1000 HU); above 250 HU it is bone or dense contrast:
  both are flags.
* Fragmentation. The liver is one organ, one connected component in 3D (26-connectivity, as the
  bundle's KeepLargestConnectedComponentd). When the largest component holds under half of the
  predicted voxels the prediction is scattered: a flag. Measured before the bundle keeps only the
  largest component.
* Liver outside the abdomen's slices, per axial slice (the slices along the array axis closest to
  the world's inferior-superior axis) that holds predicted liver:

  - *skull-like slice*: bone (>= 300 HU: cortical bone is 700-1800 HU) closes a ring around at least
    half of the body's cross-section. Above the skull base the cranium encloses the brain, about
    70-85 % of the head's cross-section. In the abdomen and chest bone never does: a vertebra
    encloses its marrow and the spinal canal (a few % of the cross-section) and the ribs, cut
    obliquely, leave gaps in every axial slice. Flag when more than 10 % of the liver lies on such
    slices.
  - *lung slice*: air (< -500 HU: lung is -700 to -900 HU) fills at least 40 % of the body's
    cross-section (above the diaphragm the lungs fill about half of the thorax or more). The liver's
    dome lies against the lung bases, so the top slices of a normal liver can be lung slices (in the
    synthetic phantoms up to about 35 mL of liver). It is a flag when more than half of the liver,
    and more than 100 mL of it, lies on lung slices (a liver in the chest); a chest CT that catches
    only the dome's tip (a few mL, all on lung slices) gets a note.

  The body's cross-section is the largest connected region above -500 HU with its holes filled
  (lungs and bowel gas inside it count as body). A 3 x 3 closing of the bone mask bridges one-voxel
  gaps of a skull ring.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.transforms import MapTransform
from scipy import ndimage

logger = logging.getLogger("ct_liver_seg.plausibility")

AIR_HU = -500.0  # below: air or lung, above: body (fat is about -100 HU)
BONE_HU = 300.0  # at or above: bone (cortical bone 700-1800 HU, soft tissue below 100 HU)


@dataclass(frozen=True)
class Limits:
    """Documented ranges (see the module docstring for the rationale). Volumes in mL, lengths in mm,
    intensities in HU, the rest fractions in [0, 1]."""

    volume_note_below_ml: float = 800.0
    volume_note_above_ml: float = 3000.0
    volume_flag_above_ml: float = 4000.0
    extent_note_above_mm: float = 250.0
    extent_flag_above_mm: float = 300.0
    mean_hu_min: float = -100.0
    mean_hu_max: float = 250.0
    largest_component_min: float = 0.5
    skull_slices_max: float = 0.1
    lung_slices_max: float = 0.5
    lung_slices_min_ml: float = 100.0
    skull_enclosed_min: float = 0.5
    lung_air_min: float = 0.4


LIMITS = Limits()


def voxel_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along the three array axes: the lengths of the affine's columns."""
    return tuple(float(v) for v in np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0))


def craniocaudal_axis(affine: np.ndarray) -> int:
    """The array axis closest to the world's inferior-superior axis (world axis 2)."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    return int(np.argmax(np.abs(a[2]) / np.linalg.norm(a, axis=0)))


def liver_volume_ml(mask: np.ndarray, spacing) -> float:
    """Volume of ``mask`` in mL (1 mL = 1000 mm^3)."""
    return float(np.count_nonzero(mask) * np.prod(spacing) / 1000.0)


def craniocaudal_extent_mm(mask: np.ndarray, spacing, axis: int) -> float:
    """Length (mm) from the first to the last slice along ``axis`` that holds ``mask``, both included
    (a mask on one 5 mm slice spans 5 mm); 0 for an empty mask."""
    other = tuple(i for i in range(mask.ndim) if i != axis)
    slices = np.flatnonzero(np.any(mask, axis=other))
    return float((slices[-1] - slices[0] + 1) * spacing[axis]) if slices.size else 0.0


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, voxel count of each component, index 0 = background); full connectivity."""
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    return labels, np.bincount(labels.ravel())


def _largest_of(labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    if counts.size < 2:
        return np.zeros(labels.shape, dtype=bool)
    return labels == int(np.argmax(counts[1:]) + 1)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of ``mask`` (26-connectivity in 3D); empty stays empty."""
    return _largest_of(*_components(mask))


def largest_component_fraction(mask: np.ndarray) -> float | None:
    """Share of the mask's voxels in its largest connected component; None for an empty mask."""
    _, counts = _components(mask)
    total = int(counts[1:].sum())
    return float(counts[1:].max() / total) if total else None


def mean_hu(mask: np.ndarray, image: np.ndarray) -> float | None:
    """Mean of ``image`` (HU) inside ``mask``; None for an empty mask."""
    return float(np.mean(image[mask.astype(bool)])) if np.any(mask) else None


def _largest_2d(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    return labels == int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the slice's border added (as
    scipy's binary_fill_holes, in one labelling pass instead of an iterated dilation)."""
    labels, _ = ndimage.label(~mask)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return mask | ((labels > 0) & ~np.isin(labels, border))


def body_mask(slice_hu: np.ndarray) -> np.ndarray:
    """The body's cross-section on one axial slice (HU): the largest region above -500 HU, holes
    (lungs, bowel gas) filled."""
    return _largest_2d(_fill_holes(slice_hu > AIR_HU))


def air_fraction(slice_hu: np.ndarray, body: np.ndarray | None = None) -> float:
    """Share of the body's cross-section that is air or lung (< -500 HU); 0 without a body."""
    body = body_mask(slice_hu) if body is None else body
    area = np.count_nonzero(body)
    return float(np.count_nonzero(body & (slice_hu < AIR_HU)) / area) if area else 0.0


def bone_enclosed_fraction(slice_hu: np.ndarray, body: np.ndarray | None = None) -> float:
    """Share of the body's cross-section enclosed by a closed ring of bone (>= 300 HU), the bone
    itself excluded; 0 without a body. About 0.7-0.85 above the skull base, a few % in the trunk."""
    body = body_mask(slice_hu) if body is None else body
    area = np.count_nonzero(body)
    if not area:
        return 0.0
    bone = ndimage.binary_closing(slice_hu >= BONE_HU, structure=np.ones((3, 3), dtype=bool))
    enclosed = _fill_holes(bone) & ~bone & body
    return float(np.count_nonzero(enclosed) / area)


def is_skull_slice(slice_hu: np.ndarray, limits: Limits = LIMITS, body: np.ndarray | None = None) -> bool:
    """A ring of bone around at least ``skull_enclosed_min`` of the body's cross-section."""
    return bone_enclosed_fraction(slice_hu, body) >= limits.skull_enclosed_min


def is_lung_slice(slice_hu: np.ndarray, limits: Limits = LIMITS, body: np.ndarray | None = None) -> bool:
    """Air or lung over at least ``lung_air_min`` of the body's cross-section."""
    return air_fraction(slice_hu, body) >= limits.lung_air_min


def slice_counts(mask: np.ndarray, image: np.ndarray, axis: int, limits: Limits = LIMITS) -> tuple[int, int, int]:
    """Voxels of the mask in all, on skull-like slices and on lung slices along ``axis`` (only
    slices that hold the mask are looked at)."""
    m, img = np.moveaxis(np.asarray(mask, dtype=bool), axis, -1), np.moveaxis(image, axis, -1)
    per_slice = m.sum(axis=(0, 1))
    skull = lung = 0
    for k in np.flatnonzero(per_slice):
        body = body_mask(img[..., k])
        skull += int(per_slice[k]) if is_skull_slice(img[..., k], limits, body) else 0
        lung += int(per_slice[k]) if is_lung_slice(img[..., k], limits, body) else 0
    return int(per_slice.sum()), skull, lung


def measure(mask: np.ndarray, image: np.ndarray, affine: np.ndarray, limits: Limits = LIMITS) -> dict:
    """The measures of a predicted liver (see the module docstring); plain JSON types.

    ``volume_ml``, ``extent_mm``, ``mean_hu``, ``skull_slice_fraction``, ``lung_slice_fraction`` and
    ``lung_slice_ml`` are of the largest component (the liver the bundle keeps);
    ``largest_component_fraction`` and ``components`` of the whole mask. Shares are None for an
    empty mask.
    """
    mask = np.asarray(mask).astype(bool)
    image = np.asarray(image, dtype=np.float32)
    if mask.shape != image.shape or mask.ndim != 3:
        raise ValueError(f"mask {mask.shape} and image {image.shape} must be 3D volumes of the same shape")
    spacing, axis = voxel_spacing(affine), craniocaudal_axis(affine)
    labels, counts = _components(mask)
    liver = _largest_of(labels, counts)
    total, skull, lung = slice_counts(liver, image, axis, limits)
    return {
        "volume_ml": liver_volume_ml(liver, spacing),
        "extent_mm": craniocaudal_extent_mm(liver, spacing, axis),
        "mean_hu": mean_hu(liver, image),
        "largest_component_fraction": float(counts[1:].max() / counts[1:].sum()) if counts.size > 1 else None,
        "components": int(counts.size - 1),
        "skull_slice_fraction": skull / total if total else None,
        "lung_slice_fraction": lung / total if total else None,
        "lung_slice_ml": float(lung * np.prod(spacing) / 1000.0),
        "spacing_mm": list(spacing),
        "craniocaudal_axis": axis,
    }


def flags(measures: dict, limits: Limits = LIMITS) -> list[str]:
    """Human-readable reasons why the prediction is implausible; empty when it is plausible."""
    m, out = measures, []
    if m["volume_ml"] > limits.volume_flag_above_ml:
        out.append(f"liver volume {m['volume_ml']:.0f} mL above {limits.volume_flag_above_ml:.0f} mL "
                   "(adult livers are about 800-3000 mL)")
    if m["extent_mm"] > limits.extent_flag_above_mm:
        out.append(f"craniocaudal extent {m['extent_mm']:.0f} mm above {limits.extent_flag_above_mm:.0f} mm")
    if m["mean_hu"] is not None and not limits.mean_hu_min <= m["mean_hu"] <= limits.mean_hu_max:
        out.append(f"mean {m['mean_hu']:.0f} HU inside the predicted liver, outside the soft-tissue range "
                   f"[{limits.mean_hu_min:.0f}, {limits.mean_hu_max:.0f}] HU (air, fat or bone)")
    frac = m["largest_component_fraction"]
    if frac is not None and frac < limits.largest_component_min:
        out.append(f"scattered prediction: the largest of {m['components']} connected components holds "
                   f"{100 * frac:.0f} % of the predicted voxels (under {100 * limits.largest_component_min:.0f} %)")
    skull = m["skull_slice_fraction"]
    if skull is not None and skull > limits.skull_slices_max:
        out.append(f"{100 * skull:.0f} % of the predicted liver lies on slices with a skull-like ring of bone "
                   "(a head, not an abdomen)")
    if _mostly_on_lung_slices(m, limits) and m["lung_slice_ml"] > limits.lung_slices_min_ml:
        out.append(f"{100 * m['lung_slice_fraction']:.0f} % of the predicted liver ({m['lung_slice_ml']:.0f} mL) "
                   "lies on slices that are mostly lung or air (a chest, not an abdomen)")
    return out


def _mostly_on_lung_slices(m: dict, limits: Limits) -> bool:
    return m["lung_slice_fraction"] is not None and m["lung_slice_fraction"] > limits.lung_slices_max


def notes(measures: dict, limits: Limits = LIMITS) -> list[str]:
    """Unusual but possible measures (no flag): an empty or small liver, a large or long one."""
    m, out = measures, []
    if m["volume_ml"] == 0:
        out.append("no liver predicted (a scan without the liver, or a missed liver)")
    elif m["volume_ml"] < limits.volume_note_below_ml:
        out.append(f"liver volume {m['volume_ml']:.0f} mL below {limits.volume_note_below_ml:.0f} mL "
                   "(a partial scan, a small liver or a partly missed one)")
    elif limits.volume_note_above_ml < m["volume_ml"] <= limits.volume_flag_above_ml:
        out.append(f"liver volume {m['volume_ml']:.0f} mL above {limits.volume_note_above_ml:.0f} mL (hepatomegaly?)")
    if limits.extent_note_above_mm < m["extent_mm"] <= limits.extent_flag_above_mm:
        out.append(f"craniocaudal extent {m['extent_mm']:.0f} mm above {limits.extent_note_above_mm:.0f} mm")
    if _mostly_on_lung_slices(m, limits) and m["lung_slice_ml"] <= limits.lung_slices_min_ml:
        out.append(f"the predicted liver lies mostly on lung slices, {m['lung_slice_ml']:.0f} mL of it (the dome's "
                   "tip at the bottom of a chest CT, or a small prediction in the chest)")
    return out


def assess(mask: np.ndarray, image: np.ndarray, affine: np.ndarray, limits: Limits = LIMITS) -> dict:
    """The whole check: ``{"plausible", "flags", "notes", "measures", "limits"}`` in plain JSON types."""
    m = measure(mask, image, affine, limits)
    found = flags(m, limits)
    return {"plausible": not found, "flags": found, "notes": notes(m, limits), "measures": m,
            "limits": asdict(limits)}


def _numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class LiverPlausibilityd(MapTransform):
    """Checks the discrete prediction ``keys`` (1, X, Y, Z) against the CT in HU at ``image_key``
    (1, X, Y, Z, same grid, with its affine): the report of :func:`assess` goes into the prediction's
    meta dict under ``meta_key`` and into ``data[result_key][meta_key]`` (MONAI Label returns
    ``data["result"]`` as the infer response's params); a flagged prediction is logged as a warning.

    Place it after the argmax in the input's own grid and before KeepLargestConnectedComponentd
    (so that a scattered prediction shows). ``drop_image`` removes ``image_key`` afterwards (a copy
    of the input kept only for this check).
    """

    def __init__(self, keys="pred", image_key: str = "hu", meta_key: str = "liver_plausibility",
                 result_key: str | None = "result", label: int = 1, drop_image: bool = True,
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.image_key, self.meta_key, self.result_key = image_key, meta_key, result_key
        self.label, self.drop_image = label, drop_image

    def __call__(self, data):
        d = dict(data)
        if self.image_key not in d:
            raise KeyError(f"LiverPlausibilityd needs the CT in HU at '{self.image_key}' (copied from the input "
                           f"before preprocessing); the data holds {sorted(d)}")
        image = d[self.image_key]
        if not hasattr(image, "affine"):
            raise TypeError(f"LiverPlausibilityd: '{self.image_key}' has no affine (a MetaTensor is needed)")
        hu, affine = _numpy(image)[0], _numpy(image.affine)
        name = image.meta.get("filename_or_obj", "the input") if hasattr(image, "meta") else "the input"
        for key in self.key_iterator(d):
            pred = d[key]
            report = assess(_numpy(pred)[0] == self.label, hu, affine)
            if hasattr(pred, "meta"):
                pred.meta[self.meta_key] = report
            if self.result_key:
                d[self.result_key] = {**(d.get(self.result_key) or {}), self.meta_key: report}
            if report["flags"]:
                logger.warning("implausible liver segmentation of %s: %s", name, "; ".join(report["flags"]))
            for note in report["notes"]:
                logger.info("liver segmentation of %s: %s", name, note)
        if self.drop_image:
            d.pop(self.image_key)
        return d


class PlausibilityJsonWriter:
    """Ignite handler for the bundle's evaluator: after each iteration it writes each item's report
    (the prediction's meta ``meta_key``) to ``<output_dir>/<input name>_plausibility.json``, beside
    the ``<input name>_seg.nii.gz`` that SaveImaged writes there (NIfTI carries no such meta)."""

    def __init__(self, output_dir: str, key: str = "pred", meta_key: str = "liver_plausibility",
                 postfix: str = "plausibility"):
        self.output_dir, self.key, self.meta_key, self.postfix = output_dir, key, meta_key, postfix

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        import json

        from monai.data.utils import create_file_basename

        output = engine.state.output
        for item in output if isinstance(output, list) else [output]:
            meta = getattr(item[self.key], "meta", {})
            if self.meta_key not in meta:
                raise KeyError(f"PlausibilityJsonWriter: the prediction's meta has no '{self.meta_key}': "
                               "is LiverPlausibilityd in the postprocessing?")
            base = create_file_basename(self.postfix, str(meta["filename_or_obj"]), self.output_dir,
                                        separate_folder=False)
            with open(f"{base}.json", "w") as f:
                json.dump(meta[self.meta_key], f, indent=1)
                f.write("\n")
