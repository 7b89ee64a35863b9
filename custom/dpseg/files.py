"""Files written whole or not at all: a reader (or a job resumed after a crash) never sees half a
ledger, resume point, model or study result."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_whole(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a new temporary file in the same folder (``<name>.<random>.tmp``, its
    own for each writer), then put it in place of ``path`` in one step (``os.replace``). If
    ``write`` raises, ``path`` is left as it was and the temporary file is removed. Returns
    ``path``."""
    path = Path(path)
    handle, name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
