"""Every command keeps the memory it frees (common.cli.keep_freed_memory, through run_main): a tensor over
glibc's largest mmap threshold, freed and made again step after step, reuses the same pages instead of
faulting in new ones."""

import json
import platform
import sys

import datasets
import numpy as np
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


def _limited(limit_mib: int, *command: str):
    """A command under an address-space limit (tests/scripts/limited.py): (process, its peak virtual memory in MiB)."""
    proc = run([sys.executable, "tests/scripts/limited.py", str(limit_mib), *command])
    peak = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VmPeak ")]
    return proc, (peak[-1] / 1024 if peak else None)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status")
def test_features_extract_runs_in_less_memory_than_its_output(chain, tmp_path):
    """Features are written batch by batch: a split whose features are larger than the room a memory limit
    leaves is extracted under that limit, to the same rows as a run without one."""
    tok, room = str(chain["tokenizer"]), 48  # MiB above what a 500-image run peaks at
    args = ["features", "extract", "--tokenizer", tok, "--pyramid", "--batch-size", "500"]
    _, small = _limited(0, *args, "--max-train-samples", "500", "--output-dir", str(tmp_path / "small"))
    rows = 12000
    _, peak = _limited(int(small) + room, *args, "--max-train-samples", str(rows), "--output-dir", str(tmp_path / "large"))
    stored = datasets.load_from_disk(str(tmp_path / "large"))
    width = sum(v["shape"][0] for v in json.loads((tmp_path / "large" / "features.json").read_text())["features"].values())
    whole = rows * width * 4 / 2**20  # the float32 features of the split, held whole
    assert len(stored) == rows and whole > room, f"{whole:.0f} MiB of features would fit the {room} MiB of room"
    assert peak <= small + room
    first = datasets.load_from_disk(str(tmp_path / "small")).with_format("numpy")[:500]
    np.testing.assert_allclose(stored.with_format("numpy")[:500]["encoder"], first["encoder"], atol=1e-6)
