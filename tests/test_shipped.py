"""dpseg.shipped: the bundle and the jobs, in a checkout and after a non-editable install."""

import fnmatch
import subprocess
import sys
import tomllib

from conftest import REPO
from dpseg import shipped as shipped_module


def test_every_file_of_the_bundle_and_the_jobs_goes_into_the_wheel():
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    tracked = subprocess.run(["git", "ls-files", "bundles", "jobs"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked
    for path in tracked:  # each lands in share/dpseg/ at its own relative place
        target = [dest for dest, patterns in data_files.items() if any(fnmatch.fnmatch(path, p) for p in patterns)
                  and "/" not in path.removeprefix(patterns[0].rsplit("/", 1)[0] + "/")]
        assert target == [f"share/dpseg/{path.rsplit('/', 1)[0]}"], (path, target)


def test_outside_a_checkout_the_installed_copies_are_found(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped_module, "CHECKOUT", tmp_path / "no_checkout")
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "prefix"))
    (tmp_path / "prefix" / "share" / "dpseg" / "jobs" / "fed_dp").mkdir(parents=True)
    assert shipped_module.shipped("jobs") == tmp_path / "prefix" / "share" / "dpseg" / "jobs"
    # nowhere: the checkout's path, which the error then names
    assert shipped_module.shipped("bundles/x") == tmp_path / "no_checkout" / "bundles" / "x"
    assert shipped_module.shipped("jobs") != REPO / "jobs"
