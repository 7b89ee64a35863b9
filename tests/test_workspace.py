import json

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from dpseg.workspace import allow_dpseg


def test_allow_list_adds_dpseg_and_keeps_the_rest(tmp_path):
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "resources.json.default").write_text(json.dumps({"format_version": 2, "components": []}))
    path = allow_dpseg(tmp_path)
    data = json.loads(path.read_text())
    assert data["format_version"] == 2 and data["components"] == []
    assert "dpseg." in data["class_allow_list"]
    assert set(DEFAULT_CLASS_ALLOW_LIST) <= set(data["class_allow_list"])
    allow_dpseg(tmp_path)  # idempotent
    assert json.loads(path.read_text())["class_allow_list"].count("dpseg.") == 1
