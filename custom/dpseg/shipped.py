"""Where the folders shipped beside the package are: the MONAI bundle and the NVFlare jobs.

In a checkout (an editable install, or the package run from ``custom/``) they are the checkout's
``bundles/`` and ``jobs/``; after ``pip install .`` they are the copies the wheel puts into
``<prefix>/share/dpseg/`` (pyproject.toml's data-files).
"""

from __future__ import annotations

import site
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
SHARE = Path("share") / "dpseg"


def shipped(relative: str) -> Path:
    """The shipped folder ``relative`` (e.g. ``"jobs"``): the checkout's where it has one, else the
    installed copy under the interpreter's prefix (or the user base, for a ``--user`` install); the
    checkout's path where neither exists (so that an error names it)."""
    for root in (CHECKOUT, Path(sys.prefix) / SHARE, Path(site.getuserbase()) / SHARE):
        if (root / relative).exists():
            return root / relative
    return CHECKOUT / relative
