"""A site process's memory: its peak, and the C heap that caching a cohort would otherwise leave fragmented.

Caching preprocessed volumes (``dpseg.dptrain.PatientSlices``, the validation cache) allocates and
frees many arrays of a few MB (a scan at its own resolution, its resampled copies). With glibc's
default, whose mmap threshold rises to the size of the largest block freed, those blocks come from
the heap, and the holes they leave between the cached volumes stay part of the process's resident
memory: about 100-190 MB per site on the default cohort (measured). ``returned_when_freed`` makes
every block over 128 KiB its own mapping while the cache is built, so freeing it gives the memory
back. (1 MiB cached site-3 of the default cohort 15% faster alone, 13.6 against 15.7 s, but the
demo's site processes peaked higher: 1075 / 1053 MB at site-2 / 3 in one run, against 996 / 975
and 1017 / 960 in two runs at 128 KiB, measured.) Afterwards blocks up to 32 MiB come from the
heap again, where training reuses them step after step (a per-block mapping there costs page
faults on every step: twice the step time, measured). Values are numerically unchanged; off glibc
(no ``mallopt``) nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
from contextlib import contextmanager

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
CACHING_THRESHOLD = 128 * 1024  # bytes: glibc's starting threshold, held fixed while caching
TRAINING_THRESHOLD = 32 * 1024 * 1024  # bytes: the largest threshold glibc's own adjustment reaches (64-bit)


def _mallopt():
    """glibc's ``mallopt``, or None where the C library has none (not glibc)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.mallopt
    except (OSError, AttributeError):
        return None


def set_mmap_threshold(size: int) -> bool:
    """Blocks of ``size`` bytes or more get a mapping of their own; True where it took effect."""
    mallopt = _mallopt()
    return bool(mallopt and mallopt(M_MMAP_THRESHOLD, int(size)) == 1)


@contextmanager
def returned_when_freed():
    """Inside: large blocks (over 128 KiB) are mapped one by one, so freeing one returns it to the
    system; after: blocks up to 32 MiB come from the heap (fast reuse while training)."""
    set_mmap_threshold(CACHING_THRESHOLD)
    try:
        yield
    finally:
        set_mmap_threshold(TRAINING_THRESHOLD)


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
