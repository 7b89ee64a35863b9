"""dpseg.processmemory: blocks freed while a cache is built go back to the system (glibc)."""

import platform
import subprocess
import sys

import pytest

from dpseg.processmemory import peak_rss_mb

# a cache's pattern: 60 arrays of 4 MB freed between small arrays that stay (MB of resident memory
# left after freeing them, printed by a fresh process)
PATTERN = """
import numpy as np
from dpseg.processmemory import returned_when_freed

def rss():
    return next(int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS:"))

def cache():
    np.ones(2 ** 19).sum()  # one 4 MB block freed: glibc's threshold rises above 4 MB
    kept, scratch = [], []
    for _ in range(60):
        scratch.append(np.ones(2 ** 19))
        kept.append(np.ones(64))
    before_free = rss()
    del scratch
    return before_free - rss(), kept

if {inside}:
    with returned_when_freed():
        returned, kept = cache()
else:
    returned, kept = cache()
print(returned)
"""


def freed_mb(inside: bool) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN.format(inside=inside)], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc: no mallopt")
def test_blocks_freed_while_caching_go_back_to_the_system():
    assert freed_mb(inside=True) > 200  # 240 MB freed, returned
    assert freed_mb(inside=False) < 40  # glibc's default keeps them in the heap (why the module exists)


def test_peak_memory_is_in_mb():
    assert 10 < peak_rss_mb() < 100_000
