"""Shared by the benchmarks: machine description, timing, and the one-line result format run_all reads."""

from __future__ import annotations

import json
import os
import platform

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores ({cpu})"
    return f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def flops(fn) -> int:
    """Floating-point operations of one call of ``fn`` (a training step: forward and backward), by torch's counter."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def report(name: str, value: float, unit: str, baseline: str = "", baseline_value: float | None = None,
           ratio: float | None = None, target: str = "", ok: bool | None = None, baseline_unit: str | None = None,
           **extra) -> None:  # fmt: skip
    """Print one result as a line run_all collects: BENCH {json}."""
    row = dict(name=name, value=value, unit=unit, baseline=baseline, baseline_value=baseline_value,
               baseline_unit=baseline_unit or unit, ratio=ratio, target=target, ok=ok, **extra)  # fmt: skip
    print("BENCH " + json.dumps(row), flush=True)

