import json

import nibabel as nib
import numpy as np
import pytest

from conftest import datalist_items, run_cli, save_like
from dpseg.checks import check_datalist


def _first(site, split="training"):
    item = datalist_items(site / "datalist.json", split)[0]
    return site / item["image"], site / item["label"]


def _problems(site):
    report = check_datalist(site / "datalist.json")
    assert not report.ok
    return report.problems


def test_good_data_passes_with_a_summary(cohort):
    report = check_datalist(cohort / "site-1" / "datalist.json")
    assert report.ok, report.problems
    assert report.patients == {"training": 4, "validation": 1, "test": 1}
    text = report.summary()
    assert "training 4" in text and "spacing (mm)" in text and "-1024" in text


def test_truncated_nifti_is_named(site_copy):
    image, _ = _first(site_copy)
    raw = image.read_bytes()
    image.write_bytes(raw[: len(raw) // 2])
    problems = _problems(site_copy)
    assert len(problems) == 1 and str(image) in problems[0] and "truncated" in problems[0]


def test_missing_file_is_named(site_copy):
    _, label = _first(site_copy, "validation")
    label.unlink()
    problems = _problems(site_copy)
    assert problems == [f"{label}: file missing"]


def test_shape_mismatch(site_copy):
    image, label = _first(site_copy)
    data = np.asanyarray(nib.load(str(label)).dataobj)
    save_like(label, data[:, :, :-2])
    problems = _problems(site_copy)
    assert len(problems) == 1 and str(label) in problems[0] and "shape" in problems[0]


def test_affine_mismatch(site_copy):
    _, label = _first(site_copy)
    lab = nib.load(str(label))
    affine = lab.affine.copy()
    affine[0, 3] += 5.0
    save_like(label, np.asanyarray(lab.dataobj), affine)
    problems = _problems(site_copy)
    assert len(problems) == 1 and str(label) in problems[0] and "affine" in problems[0]


def test_label_values_outside_the_set(site_copy):
    _, label = _first(site_copy)
    data = np.asanyarray(nib.load(str(label)).dataobj).copy()
    data[data == 1] = 2  # an unmerged tumour class
    save_like(label, data)
    problems = _problems(site_copy)
    assert len(problems) == 1 and str(label) in problems[0] and "label values [2]" in problems[0]


def test_non_finite_voxels(site_copy):
    image, _ = _first(site_copy)
    data = np.asanyarray(nib.load(str(image)).dataobj).astype(np.float32)
    data[0, 0, 0] = np.nan
    save_like(image, data)
    problems = _problems(site_copy)
    assert len(problems) == 1 and str(image) in problems[0] and "non-finite" in problems[0]


@pytest.mark.parametrize("scale", ["unit", "bytes"])
def test_intensities_that_are_not_hu(site_copy, scale):
    image, _ = _first(site_copy)
    data = np.asanyarray(nib.load(str(image)).dataobj).astype(np.float32)
    data = (data - data.min()) / (data.max() - data.min())
    save_like(image, data if scale == "unit" else (data * 255).astype(np.uint8))
    problems = _problems(site_copy)
    assert len(problems) == 1 and str(image) in problems[0] and "Hounsfield" in problems[0]


def test_empty_split(site_copy):
    path = site_copy / "datalist.json"
    data = json.loads(path.read_text())
    data["validation"] = []
    path.write_text(json.dumps(data))
    assert _problems(site_copy) == [f"{path}: split 'validation' is missing or empty"]


def test_same_patient_in_two_splits(site_copy):
    path = site_copy / "datalist.json"
    data = json.loads(path.read_text())
    data["test"].append(data["training"][0])
    path.write_text(json.dumps(data))
    problems = _problems(site_copy)
    pid = data["training"][0]["patient"]
    assert problems[0] == f"{path}: patient {pid} is in both 'training' and 'test'"
    assert len(problems) == 2 and "lists image" in problems[1]  # and the same scan twice


def test_the_same_scan_listed_twice_in_one_split_is_refused(site_copy):
    path = site_copy / "datalist.json"
    data = json.loads(path.read_text())
    twin = dict(data["training"][0], patient="someone-else")  # even under another patient's name
    data["training"].append(twin)
    path.write_text(json.dumps(data))
    (problem,) = _problems(site_copy)
    assert problem.startswith(f"{path}: training[{len(data['training']) - 1}] lists image {twin['image']} again")


def test_a_patient_with_two_scans_is_one_patient(site_copy):
    path = site_copy / "datalist.json"
    data = json.loads(path.read_text())
    first, second = data["training"][:2]
    data["training"][1] = dict(second, patient=first["patient"])  # the second scan of the first patient
    path.write_text(json.dumps(data))
    report = check_datalist(path)
    assert report.ok and report.patients["training"] == len(data["training"]) - 1


def test_invalid_json(site_copy):
    path = site_copy / "datalist.json"
    path.write_text(path.read_text()[:-20])
    problems = _problems(site_copy)
    assert len(problems) == 1 and problems[0].startswith(f"{path}: not valid JSON")


def test_cli_exit_codes_and_one_line_per_problem(site_copy, cohort):
    good = run_cli("check-data", str(cohort / "site-2" / "datalist.json"))
    assert good.returncode == 0 and "OK" in good.stdout
    image, label = _first(site_copy)
    label.unlink()
    image.write_bytes(b"not a nifti")
    bad = run_cli("check-data", str(site_copy / "datalist.json"))
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert len(lines) == 2
    assert any(str(image) in line for line in lines) and any(str(label) in line for line in lines)
