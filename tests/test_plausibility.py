"""The plausibility check of a predicted liver (the bundle's scripts/plausibility.py, reached through
dpseg.plausibility): measures on hand-made masks, no flag on the synthetic sites' true livers, flags
on a head and a chest, and the report in the meta of the bundle's inference postprocessing."""

import json
import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dpseg.bundle import Bundle
from dpseg.cli import main
from dpseg.datalist import resolve, write_datalist
from dpseg.plausibility import case_record, checks, flagged, warning
from dpseg.synthetic import head_phantom, public_phantom, public_profiles, public_rng, write_cohort


@pytest.fixture(scope="module")
def P(bundle):
    return checks(bundle)


def chest_volume(shape=(96, 72, 20), spacing=(4.0, 4.0, 5.0)):
    """A chest-like CT in HU: a 40 HU trunk (320 x 230 mm) whose two lungs (-850 HU) fill about
    55 % of each slice, the mediastinum between them."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)]
    x, y, _ = np.meshgrid(*axes, indexing="ij", sparse=True)
    trunk = np.broadcast_to((x / 160) ** 2 + (y / 115) ** 2 < 1, shape)
    lungs = np.broadcast_to(((np.abs(x) - 78) / 58) ** 2 + (y / 88) ** 2 < 1, shape)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[trunk] = 40
    hu[lungs] = -850
    mediastinum = np.broadcast_to((np.abs(x) < 15) & (np.abs(y) < 60), shape)
    return hu, mediastinum, np.diag([*spacing, 1.0])


def box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_volume_extent_and_mean_hu_of_a_box(P):
    mask = box((20, 30, 12), (2, 3, 4), (12, 23, 8))  # 10 x 20 x 4 voxels
    spacing = (2.0, 2.0, 5.0)
    assert P.liver_volume_ml(mask, spacing) == pytest.approx(800 * 20 / 1000)  # 16 mL
    assert P.craniocaudal_extent_mm(mask, spacing, axis=2) == pytest.approx(4 * 5.0)
    assert P.craniocaudal_extent_mm(mask, spacing, axis=0) == pytest.approx(10 * 2.0)
    assert P.craniocaudal_extent_mm(np.zeros_like(mask), spacing, axis=2) == 0.0
    image = np.where(mask, 60.0, -1000.0)
    image[2, 3, 4] = 260.0  # one voxel of 800 raises the mean by 0.25 HU
    assert P.mean_hu(mask, image) == pytest.approx(60.25)
    assert P.mean_hu(np.zeros_like(mask), image) is None


def test_spacing_and_craniocaudal_axis_come_from_the_affine(P):
    lps = np.array([[-0.8, 0, 0, 0], [0, -0.8, 0, 0], [0, 0, 2.5, 0], [0, 0, 0, 1.0]])
    assert P.voxel_spacing(lps) == pytest.approx((0.8, 0.8, 2.5))
    assert P.craniocaudal_axis(lps) == 2
    stored_z_first = np.array([[0, 0, 0.7, 0], [0, 0.7, 0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1.0]])
    assert P.craniocaudal_axis(stored_z_first) == 0
    mask = box((10, 40, 40), (2, 5, 5), (8, 30, 30))
    m = P.measure(mask, np.full(mask.shape, 50.0), stored_z_first)
    assert m["extent_mm"] == pytest.approx(6 * 3.0) and m["craniocaudal_axis"] == 0
    assert m["volume_ml"] == pytest.approx(6 * 25 * 25 * 0.7 * 0.7 * 3.0 / 1000)


def test_largest_component_fraction_uses_full_connectivity(P):
    mask = box((30, 30, 30), (0, 0, 0), (6, 10, 10))  # 600 voxels
    mask |= box((30, 30, 30), (20, 20, 20), (22, 30, 30))  # 200 voxels, apart
    assert P.largest_component_fraction(mask) == pytest.approx(0.75)
    diagonal = np.zeros((5, 5, 5), dtype=bool)
    diagonal[1, 1, 1] = diagonal[2, 2, 2] = True  # corner-touching voxels are one component
    assert P.largest_component_fraction(diagonal) == 1.0
    assert P.largest_component_fraction(np.zeros((4, 4, 4), dtype=bool)) is None
    m = P.measure(mask, np.full(mask.shape, 50.0), np.eye(4))
    assert m["components"] == 2 and m["volume_ml"] == pytest.approx(0.6)  # volume: the largest one


def test_ranges_give_flags_and_notes(P):
    base = {"volume_ml": 1500.0, "extent_mm": 160.0, "mean_hu": 60.0, "largest_component_fraction": 0.98,
            "components": 3, "skull_slice_fraction": 0.0, "lung_slice_fraction": 0.02, "lung_slice_ml": 30.0}
    assert P.flags(base) == [] and P.notes(base) == []
    cases = {"volume_ml": (4500.0, "4500 mL"), "extent_mm": (320.0, "320 mm"), "mean_hu": (-400.0, "-400 HU"),
             "largest_component_fraction": (0.3, "30 %"), "skull_slice_fraction": (0.4, "skull"),
             "lung_slice_fraction": (0.7, "lung")}
    for key, (value, text) in cases.items():
        found = P.flags({**base, key: value, "lung_slice_ml": 1050.0 if key == "lung_slice_fraction" else 30.0})
        assert len(found) == 1 and text in found[0], (key, found)
    assert P.flags({**base, "mean_hu": 300.0})  # bone
    # unusual but possible: notes, no flag
    for key, value, text in (("volume_ml", 0.0, "no liver"), ("volume_ml", 300.0, "300 mL"),
                             ("volume_ml", 3500.0, "hepatomegaly"), ("extent_mm", 270.0, "270 mm")):
        measures = {**base, key: value}
        assert P.flags(measures) == [] and any(text in n for n in P.notes(measures)), (key, value)
    # the dome's tip at the bottom of a chest CT: all on lung slices, but a few mL
    tip = {**base, "volume_ml": 11.0, "lung_slice_fraction": 1.0, "lung_slice_ml": 11.0}
    assert P.flags(tip) == [] and any("dome" in n for n in P.notes(tip))


def test_synthetic_sites_true_livers_are_not_flagged(P, tmp_path):
    datalists = write_cohort(tmp_path, n_sites=3, patients=[3, 3, 3], seed=11)  # RAS/LPS, 3 phases, 3 spacings
    for datalist in datalists:
        for item in resolve(datalist, "training") + resolve(datalist, "validation") + resolve(datalist, "test"):
            img, lab = nib.load(item["image"]), nib.load(item["label"])
            report = P.assess(np.asanyarray(lab.dataobj) > 0, np.asanyarray(img.dataobj), img.affine)
            assert report["plausible"] and report["flags"] == [], (item["image"], report)
            assert report["measures"]["skull_slice_fraction"] == 0.0
            assert report["measures"]["lung_slice_fraction"] < 0.3


def test_public_cohort_true_labels_are_not_flagged_the_dome_tip_of_a_chest_is_a_note(P):
    """The public cohort's abdomens, chests (liver at most in the bottom slices), pelvises and heads
    (no liver) with their true labels (64 x 64 voxels in plane, for speed)."""
    profiles = public_profiles(in_plane=64)
    for j, profile in enumerate(profiles):
        for patient in (2 * j, 2 * j + 1):
            image, label = public_phantom(profile, public_rng(7, patient))
            report = P.assess(label, image, np.diag([*profile.spacing, 1.0]))
            assert report["flags"] == [], (profile.name, patient, report)
    chest = next(p for p in profiles if p.region == "chest")
    image, label = public_phantom(chest, public_rng(7, 19))
    report = P.assess(label, image, np.diag([*chest.spacing, 1.0]))
    assert 0 < report["measures"]["lung_slice_ml"] < 50, "public patient 19 (seed 7) no longer shows the dome's tip"
    assert report["flags"] == [] and any("dome" in n for n in report["notes"])


def test_half_of_a_head_labelled_liver_is_flagged(P):
    hu, brain, affine = head_phantom()
    half = np.zeros(hu.shape, dtype=bool)
    half[:, :, : hu.shape[2] // 2] = True
    report = P.assess(half, hu, affine)
    assert not report["plausible"]
    assert any("skull" in f for f in report["flags"]) and any("HU" in f for f in report["flags"])
    # brain alone (35 HU, a liver-like volume): the skull ring is what gives it away
    lower_brain = brain & half
    report = P.assess(lower_brain, hu, affine)
    assert 35 - 5 < report["measures"]["mean_hu"] < 35 + 5
    assert [f for f in report["flags"] if "skull" in f] == report["flags"] != []


def test_skull_ring_and_lung_slices_are_recognised(P):
    hu, _, _ = head_phantom()
    mid = hu[:, :, hu.shape[2] // 2]
    assert P.bone_enclosed_fraction(mid) > 0.6 and P.is_skull_slice(mid)
    broken = mid.copy()
    broken[:, 28:36] = np.minimum(broken[:, 28:36], 40)  # cut the ring on both sides
    assert P.bone_enclosed_fraction(broken) < 0.1
    chest, mediastinum, affine = chest_volume()
    assert P.is_lung_slice(chest[:, :, 0]) and not P.is_lung_slice(np.where(chest < -500, 40, chest)[:, :, 0])
    report = P.assess(mediastinum, chest, affine)
    assert report["measures"]["lung_slice_fraction"] == 1.0 and report["measures"]["lung_slice_ml"] > 300
    assert any("lung" in f for f in report["flags"])


def test_the_transform_puts_the_report_in_the_meta_and_the_result_and_logs(P, caplog):
    hu, _, affine = head_phantom()
    pred = np.zeros((1, *hu.shape), dtype=np.float32)
    pred[0, :, :, :20] = 1
    data = {"pred": MetaTensor(torch.as_tensor(pred), affine=torch.as_tensor(affine)),
            "hu": MetaTensor(torch.as_tensor(hu[None]), affine=torch.as_tensor(affine),
                             meta={"filename_or_obj": "head.nii.gz"})}
    with caplog.at_level(logging.WARNING, logger="ct_liver_seg.plausibility"):
        out = P.LiverPlausibilityd(keys="pred", image_key="hu", meta_key="liver_plausibility")(data)
    report = out["pred"].meta["liver_plausibility"]
    assert report["flags"] and out["result"]["liver_plausibility"] == report
    assert "hu" not in out  # the HU copy is dropped once checked
    assert any("implausible liver segmentation of head.nii.gz" in r.getMessage() for r in caplog.records)
    with pytest.raises(KeyError, match="'hu'"):
        P.LiverPlausibilityd(keys="pred")({"pred": data["pred"]})


def test_bundle_inference_postprocessing_adds_the_flag_to_the_meta(bundle, tmp_path):
    hu, _, affine = head_phantom()
    path = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(path))
    pre, _, post = bundle.inference_pipeline()
    data = pre({"image": str(path)})
    assert data["hu"].shape == (1, *hu.shape)  # the HU copy, in the input's own grid
    logits = torch.zeros((2, *data["image"].shape[1:]))
    logits[1, ..., : logits.shape[-1] // 2] = 10.0  # the lower half of the head "liver"
    data["pred"] = logits
    out = post(data)
    report = out["pred"].meta[bundle.plausibility_key()]
    assert not report["plausible"] and any("skull" in f for f in report["flags"])
    assert out["result"][bundle.plausibility_key()] == report  # what MONAI Label returns as params
    assert tuple(out["pred"].shape[1:]) == hu.shape


class ThresholdNet(torch.nn.Module):
    """A stand-in network whose answer on any CT is known: liver wherever the windowed intensity
    exceeds 0.45 (about 20 HU), so all of a head."""

    def forward(self, x):
        return torch.cat([0.45 - x, x - 0.45], 1) * 20


def test_dpseg_evaluate_flags_a_head_in_its_json_and_on_stderr(tmp_path, monkeypatch, capsys):
    hu, _, affine = head_phantom()
    (tmp_path / "images").mkdir()
    nib.save(nib.Nifti1Image(np.rint(hu).astype(np.int16), affine), str(tmp_path / "images" / "head.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros(hu.shape, np.uint8), affine), str(tmp_path / "images" / "head_label.nii.gz"))
    item = {"image": "images/head.nii.gz", "label": "images/head_label.nii.gz", "patient": "head"}
    datalist = write_datalist(tmp_path / "datalist.json", {"training": [], "validation": [], "test": [item]})
    monkeypatch.setattr(Bundle, "load_weights", lambda self, network, path=None: ThresholdNet())
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(datalist), "--json", str(out)]) == 0
    result = json.loads(out.read_text())[0]
    assert result["flagged"] == ["head"] and "volume_flag_above_ml" in result["plausibility_limits"]
    case = result["cases"][0]["plausibility"]
    assert not case["plausible"] and any("skull" in f for f in case["flags"]) and "limits" not in case
    captured = capsys.readouterr()
    assert "1 implausible" in captured.out
    assert "warning: implausible liver segmentation of head: " in captured.err


def test_evaluate_records_and_warnings():
    report = {"plausible": False, "flags": ["a", "b"], "notes": [], "measures": {}, "limits": {"x": 1}}
    cases = [{"patient": "p1", "plausibility": case_record(report)},
             {"patient": "p2", "plausibility": case_record({**report, "flags": []})}]
    assert "limits" not in cases[0]["plausibility"] and flagged(cases) == ["p1"]
    assert warning("p1", report) == "warning: implausible liver segmentation of p1: a; b"
