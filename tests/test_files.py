"""dpseg.files: a file is replaced whole or left as it was."""

import pytest

from dpseg.files import write_whole


def test_a_write_replaces_the_file_whole(tmp_path):
    target = tmp_path / "ledger.json"
    target.write_text("old")
    assert write_whole(target, lambda tmp: tmp.write_text("new")) == target
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ledger.json"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_whole(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["ledger.json"]
