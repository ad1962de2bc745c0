"""Every command keeps the memory it frees (common.cli.keep_freed_memory, through run_main): a tensor over
glibc's largest mmap threshold, freed and made again step after step, reuses the same pages instead of
faulting in new ones."""

import platform
import sys

import pytest

from conftest import run

CHILD = """
import resource, sys, torch
from common.cli import run_main

def main():
    faults = []
    for _ in range(8):  # a training loop's pattern: the same large tensors made and freed at every step
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.ones(16, 2**20)  # 64 MiB: glibc mmaps it and, by default, unmaps it on free
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        del x
    print(sum(faults[-3:]))  # the steady state, once the heap has found its layout

run_main(main) if sys.argv[1] == "command" else main()
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_commands_reuse_freed_memory_instead_of_faulting_it_in_again():
    pages = 64 * 2**20 // 4096
    plain = int(run([sys.executable, "-c", CHILD, "plain"]).stdout)
    command = int(run([sys.executable, "-c", CHILD, "command"]).stdout)
    assert plain >= 3 * pages // 2, f"glibc's default faults the 64 MiB in again at every step: {plain} faults in 3 steps"
    assert command < pages // 20, f"a command reuses the freed 64 MiB: {command} faults in 3 steps, expected almost none"
