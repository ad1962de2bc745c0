"""Run ``python -m MODULE ARGS...`` under an address-space limit and report its peak virtual memory.

    python tests/scripts/limited.py LIMIT_MIB MODULE ARGS...     # LIMIT_MIB 0: no limit

The limit is ``resource.RLIMIT_AS`` (every mapping counts: heap, threads, memory-mapped files); the last
line on stderr is ``VmPeak <KiB>`` from /proc/self/status, so a test can set a limit from a small run.
"""

import atexit
import resource
import runpy
import sys


def report_peak() -> None:
    with open("/proc/self/status") as f:
        peak = next(line.split()[1] for line in f if line.startswith("VmPeak:"))
    print(f"VmPeak {peak}", file=sys.stderr)


limit_mib, module, *args = sys.argv[1:]
if int(limit_mib):
    resource.setrlimit(resource.RLIMIT_AS, (int(limit_mib) << 20, int(limit_mib) << 20))
atexit.register(report_peak)
sys.argv = [module, *args]
runpy.run_module(module, run_name="__main__", alter_sys=True)
