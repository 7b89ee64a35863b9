"""Datalists in Medical Segmentation Decathlon style, split by patient, one per site.

A datalist is a JSON object with the splits ``training``, ``validation`` and ``test``, each a list
of ``{"image": ..., "label": ..., "patient": ...}`` with paths relative to the datalist's folder.
``patient`` is optional; without it the image's file name identifies the patient.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

SPLITS = ("training", "validation", "test")


class DatalistError(ValueError):
    """A datalist that cannot be used; the message names the file."""


def split_patients(items: list[dict], seed: int = 0, validation: float = 0.1, test: float = 0.2) -> dict:
    """Shuffle patients (seeded) and split them into training / validation / test.

    Every split gets at least one patient; fractions are of the site's patients.
    """
    if len(items) < 3:
        raise ValueError(f"need at least 3 patients to split, got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_test = max(1, int(round(test * len(items))))
    n_val = max(1, int(round(validation * len(items))))
    shuffled = [items[i] for i in order]
    return {
        "test": sorted(shuffled[:n_test], key=patient_id),
        "validation": sorted(shuffled[n_test:n_test + n_val], key=patient_id),
        "training": sorted(shuffled[n_test + n_val:], key=patient_id),
    }


def patient_id(item: dict) -> str:
    """The patient an item belongs to: its ``patient`` key, else the image's file name stem."""
    if "patient" in item:
        return str(item["patient"])
    return Path(str(item.get("image", ""))).name.split(".nii")[0]


def write_datalist(path: Path, splits: dict, description: str = "") -> Path:
    """Write a datalist JSON (paths already relative to ``path``'s folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"description": description, "labels": {"0": "background", "1": "liver"}}
    body.update({k: splits[k] for k in SPLITS})
    path.write_text(json.dumps(body, indent=1) + "\n")
    return path


def read_datalist(path: Path) -> dict:
    """Parse a datalist; raises DatalistError naming the file if it is missing or not JSON."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatalistError(f"{path}: datalist not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatalistError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatalistError(f"{path}: not a datalist (expected a JSON object with {', '.join(SPLITS)})")
    return data


def resolve(datalist: Path, split: str) -> list[dict]:
    """Items of one split with ``image`` and ``label`` made absolute (relative to the datalist)."""
    base = Path(datalist).resolve().parent
    items = read_datalist(datalist).get(split) or []
    return [{**it, **{k: str(base / it[k]) for k in ("image", "label") if k in it}} for it in items]


def split_msd(msd_dir: Path, out: Path, n_sites: int, seed: int = 0) -> list[Path]:
    """Turn an MSD task folder (``dataset.json``, ``imagesTr``, ``labelsTr``) into per-site datalists.

    Labelled cases are shuffled (seeded) and dealt to sites round robin, then split by patient.
    Labels are rewritten binary (tumour merged into liver) under ``out/site-k/labelsTr``; images
    stay where they are and are referenced by relative paths.
    """
    msd_dir, out = Path(msd_dir), Path(out)
    meta_path = msd_dir / "dataset.json"
    meta = read_datalist(meta_path)
    cases = meta.get("training")
    if not cases:
        raise DatalistError(f"{meta_path}: no labelled cases under 'training'")
    if n_sites < 1 or len(cases) < 3 * n_sites:
        raise DatalistError(f"{meta_path}: {len(cases)} labelled cases cannot make {n_sites} sites of >= 3 patients")
    order = np.random.default_rng(seed).permutation(len(cases))
    datalists = []
    for s in range(n_sites):
        site_dir = out / f"site-{s + 1}"
        items = []
        for idx in order[s::n_sites]:
            image, label = msd_dir / cases[idx]["image"], msd_dir / cases[idx]["label"]
            for f in (image, label):
                if not f.exists():
                    raise DatalistError(f"{meta_path}: {f} is listed but missing")
            pid = image.name.split(".nii")[0]
            merged = site_dir / "labelsTr" / label.name
            _write_binary_label(label, merged)
            items.append({"image": _relpath(image, site_dir), "label": f"labelsTr/{label.name}", "patient": pid})
        datalists.append(write_datalist(site_dir / "datalist.json", split_patients(items, seed=seed),
                                        description=f"{meta.get('name', 'MSD task')}, site-{s + 1}"))
    return datalists


def _write_binary_label(src: Path, dst: Path) -> None:
    """Copy a label volume with every foreground class merged into 1 (same affine and header)."""
    img = nib.load(str(src))
    data = (np.asanyarray(img.dataobj) > 0).astype(np.uint8)
    dst.parent.mkdir(parents=True, exist_ok=True)
    out = nib.Nifti1Image(data, img.affine, img.header)
    out.set_data_dtype(np.uint8)
    nib.save(out, str(dst))


def _relpath(target: Path, start: Path) -> str:
    return os.path.relpath(Path(target).resolve(), Path(start).resolve())


def write_pooled(datalists: list[Path], out: Path, description: str = "all sites pooled") -> Path:
    """One datalist with every site's splits together (for centralised training), its paths made
    relative to ``out``'s folder (``pooled`` training in ``dpseg study``)."""
    base = out.parent
    pooled = {split: [{**it, **{k: _relpath(Path(it[k]), base) for k in ("image", "label") if k in it}}
                      for d in datalists for it in resolve(d, split)]
              for split in ("training", "validation", "test")}
    return write_datalist(out, pooled, description=description)
