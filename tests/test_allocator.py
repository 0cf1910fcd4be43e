"""Freed memory is kept for reuse on glibc (parallel/allocator.py): a large block freed and allocated again costs no
fresh pages, where glibc's defaults map (and the kernel zeroes) it anew each time."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# the page faults of filling a 64 MB tensor, freed and allocated again, in a fresh process that went through a
# command's CPU set-up (set_threads): six rounds to settle (torch's 64-byte-aligned block may not fit the hole its
# predecessor left until holes merge; in 20% of fresh processes the second round still maps new pages), then two
# rounds counted
PROBE = """
import resource, torch
from lm_lightning.config.app import set_threads
set_threads(1)
def faults_of_a_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # allocated, filled, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([faults_of_a_round() for _ in range(8)][6:]))
"""


def repeat_fill_faults(**env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE],
                         env={**environ, **env}, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_freed_large_block_is_reused_without_fresh_pages_unless_the_defaults_are_asked_for():
    pages = 64 * 2**20 // 4096  # 16,384 pages of 4 kB
    assert repeat_fill_faults() < pages // 20
    assert repeat_fill_faults(LM_LIGHTNING_MALLOC="default") > pages  # each of the two rounds maps it afresh
