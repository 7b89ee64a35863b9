"""Shared fixtures: a tiny synthetic cohort, the bundle, and helpers to damage NIfTI files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dpseg.bundle import Bundle
from dpseg.synthetic import write_cohort

REPO = Path(__file__).resolve().parents[1]
BUNDLE_DIR = REPO / "bundles" / "ct_liver_seg"


@pytest.fixture(scope="session", autouse=True)
def _grouped_on_one_worker(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` a test marked ``xdist_group`` must carry its group in its id (that is
    how pytest-xdist keeps the group on one worker); where it does not, every worker would set up the
    group's session fixtures again (the tiny study: minutes each). Checked once per worker, before any
    other session fixture: every test there then errors instead."""
    if not getattr(request.config.option, "loadgroup", False):  # set in pytest-xdist's workers
        return
    lost = [item.nodeid for item in request.session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        pytest.fail(f"--dist loadgroup does not group {lost[0]} with this pytest / pytest-xdist pair "
                    "(pytest-xdist issue 1386): install the versions pyproject.toml allows", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _calibration_cache(tmp_path_factory) -> None:
    """Noise calibrations kept for this test session only (shared by its workers and the processes
    they start), not in the user's cache."""
    from dpseg.privacy import CACHE_ENV

    os.environ[CACHE_ENV] = str(tmp_path_factory.getbasetemp().parent / "dpseg_cache")


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """Two sites of six patients each (seed 7), written once per test session; treat as read-only."""
    out = tmp_path_factory.mktemp("cohort")
    write_cohort(out, n_sites=2, patients=[6, 6], seed=7)
    return out


@pytest.fixture
def site_copy(cohort, tmp_path) -> Path:
    """A private, writable copy of site-1 of the tiny cohort (for tests that damage it)."""
    dst = tmp_path / "site-1"
    shutil.copytree(cohort / "site-1", dst)
    return dst


@pytest.fixture(scope="session")
def bundle() -> Bundle:
    return Bundle(BUNDLE_DIR)


def datalist_items(datalist: Path, split: str = "training") -> list[dict]:
    return json.loads(Path(datalist).read_text())[split]


def save_like(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> None:
    """Overwrite a NIfTI file with ``data`` (and optionally another affine), keeping its affine otherwise."""
    old = nib.load(str(path))
    nib.save(nib.Nifti1Image(data, old.affine if affine is None else affine), str(path))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``dpseg ARGS`` in a subprocess of this interpreter; returns the completed process."""
    return subprocess.run([sys.executable, "-m", "dpseg.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
