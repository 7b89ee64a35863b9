"""The MONAI Label check's own parts that need no server: the multipart infer answer, the
plausibility report in its params, the head study (the server itself: tests/e2e/test_monailabel.py)."""

import json

import nibabel as nib
import numpy as np
import pytest

from dpseg.tools.labelserver import HEAD_ID, LabelServerError, add_head_study, plausibility_flags, split_multipart


def multipart(boundary: str, fields: dict[str, tuple[str | None, bytes]]) -> bytes:
    body = b""
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n"
    return body + f"--{boundary}--\r\n".encode()


def test_multipart_answer_is_split_by_field_name_keeping_binary_bytes():
    label = b"\x1f\x8b\r\n\r\n--not-the-boundary\r\n\x00"
    params = json.dumps({"liver_plausibility": {"flags": []}}).encode()
    body = multipart("b0undary", {"params": (None, params), "image": ("pred.nii.gz", label)})
    parts = split_multipart(body, 'multipart/form-data; boundary="b0undary"')
    assert parts == {"params": params, "image": label}
    with pytest.raises(LabelServerError, match="multipart"):
        split_multipart(b"{}", "application/json")


def test_plausibility_flags_come_from_the_params_or_fail_naming_the_image():
    assert plausibility_flags({"liver_plausibility": {"flags": ["x"]}}, "liver_plausibility", "p1") == ["x"]
    with pytest.raises(LabelServerError, match="p1.*no 'liver_plausibility'"):
        plausibility_flags({"label_names": {}}, "liver_plausibility", "p1")


def test_head_study_is_a_nifti_in_hu(tmp_path):
    assert add_head_study(tmp_path) == HEAD_ID
    img = nib.load(str(tmp_path / "studies" / f"{HEAD_ID}.nii.gz"))
    hu = np.asanyarray(img.dataobj)
    assert hu.dtype == np.int16 and hu.max() > 900 and hu.min() < -900
    assert not (tmp_path / "studies" / "labels" / "final" / f"{HEAD_ID}.nii.gz").exists()
