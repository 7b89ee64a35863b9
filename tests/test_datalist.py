import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from conftest import datalist_items, run_cli
from dpseg.checks import check_datalist
from dpseg.datalist import DatalistError, patient_id, resolve, split_msd, split_patients


def test_split_patients_is_a_seeded_partition():
    items = [{"image": f"imagesTr/p{i}.nii.gz", "label": f"labelsTr/p{i}.nii.gz"} for i in range(20)]
    a, b = split_patients(items, seed=1), split_patients(items, seed=1)
    assert a == b
    ids = [patient_id(it) for split in a.values() for it in split]
    assert sorted(ids) == sorted(f"p{i}" for i in range(20))
    assert (len(a["training"]), len(a["validation"]), len(a["test"])) == (14, 2, 4)
    assert split_patients(items, seed=2) != a


def test_resolve_makes_paths_absolute(cohort):
    items = resolve(cohort / "site-1" / "datalist.json", "training")
    assert all((cohort / "site-1" / "imagesTr").samefile(type(cohort)(it["image"]).parent) for it in items)


@pytest.fixture
def msd_task(cohort, tmp_path):
    """A small MSD-layout task (dataset.json, imagesTr, labelsTr with tumour class 2) from synthetic cases."""
    task = tmp_path / "Task03_Liver"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    sources = sorted((cohort / "site-1" / "imagesTr").glob("*.nii.gz")) + sorted((cohort / "site-2" / "imagesTr").glob("*.nii.gz"))
    for n, image in enumerate(sources[:9]):
        label = image.parent.parent / "labelsTr" / image.name
        shutil.copy(image, task / "imagesTr" / f"liver_{n}.nii.gz")
        lab = nib.load(str(label))
        data = np.asanyarray(lab.dataobj).copy()
        data[tuple(np.argwhere(data == 1)[:50].T)] = 2  # some tumour voxels
        nib.save(nib.Nifti1Image(data, lab.affine), str(task / "labelsTr" / f"liver_{n}.nii.gz"))
        training.append({"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"},
                                                   "training": training, "test": []}))
    return task


def test_split_msd_merges_tumour_and_splits_by_patient(msd_task, tmp_path):
    out = tmp_path / "sites"
    result = run_cli("split-msd", "--msd", str(msd_task), "--out", str(out), "--sites", "3", "--seed", "0")
    assert result.returncode == 0, result.stderr
    seen = []
    for s in (1, 2, 3):
        datalist = out / f"site-{s}" / "datalist.json"
        report = check_datalist(datalist)
        assert report.ok, report.problems
        for split in ("training", "validation", "test"):
            for it in resolve(datalist, split):
                seen.append(patient_id(it))
                assert set(np.unique(np.asanyarray(nib.load(it["label"]).dataobj))) <= {0, 1}
                assert nib.load(it["image"]).shape == nib.load(it["label"]).shape
        assert not any(item["image"].startswith("/") for item in datalist_items(datalist))
    assert sorted(seen) == sorted(f"liver_{n}" for n in range(9))
    # tumour voxels became liver, nothing else changed
    first = resolve(out / "site-1" / "datalist.json", "training")[0]
    original = np.asanyarray(nib.load(str(msd_task / "labelsTr" / (first["patient"] + ".nii.gz"))).dataobj)
    assert np.array_equal(np.asanyarray(nib.load(first["label"]).dataobj), (original > 0).astype(np.uint8))


def test_split_msd_names_the_bad_folder(msd_task, tmp_path):
    (msd_task / "imagesTr" / "liver_3.nii.gz").unlink()
    with pytest.raises(DatalistError, match="liver_3.nii.gz is listed but missing"):
        split_msd(msd_task, tmp_path / "out", 3)
    result = run_cli("split-msd", "--msd", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "dataset.json" in result.stderr
    with pytest.raises(DatalistError, match="cannot make 4 sites"):
        split_msd(msd_task, tmp_path / "out", 4)
