"""What keeping freed memory (``common.cli.keep_freed_memory``, which every vqgpt command runs with) buys
a training step on the CPU: the tokenizer (fashion-mnist preset), the prior over 49 codes (fashion-mnist)
and over 196 codes (the fashion-mnist-14 tokenizer's grid, K=1024), batch 128 each. Every measurement is
a child process, with and without it, the two alternated; the ratio is the median step without over the
median step with. Also printed: the kernel's share of the step (page faults) and the peak memory.

    python -m bench.cpu_memory
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from bench.common import machine, report

ROUNDS = 3
STEPS = {"tokenizer": 10, "prior-49": 10, "prior-196": 3}  # timed steps per child, after 2 warm-up steps


def _step(workload: str):
    torch.manual_seed(0)
    if workload == "tokenizer":
        from tokenizer import VQVAE, get_config

        model = VQVAE(get_config("fashion-mnist")).train()
        images = torch.rand(128, 1, 28, 28) * 2 - 1
        loss = lambda: model(images).loss  # noqa: E731
    else:
        from prior import PriorInfo, build_prior, prior_loss

        side, k = {"prior-49": (7, 512), "prior-196": (14, 1024)}[workload]
        info = PriorInfo(k, 10, [str(i) for i in range(10)], (side, side), None, (28, 28))
        model = build_prior("fashion-mnist", info).train()
        codes, labels = torch.randint(0, k, (128, side * side)), torch.randint(0, 10, (128,))
        loss = lambda: prior_loss(model, codes, labels, info.layout, 0.1)  # noqa: E731
    opt = torch.optim.AdamW(model.parameters(), 1e-3)

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad()

    return step


def child(workload: str, keep: bool) -> dict:
    """One process's measurement: ms a step, the kernel's ms and the page faults of a step, peak MiB."""
    if keep:
        from common.cli import keep_freed_memory

        keep_freed_memory()
    step = _step(workload)
    for _ in range(2):
        step()
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(STEPS[workload]):
        step()
    dt, r1, n = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF), STEPS[workload]
    return dict(ms=dt / n * 1e3, sys_ms=(r1.ru_stime - r0.ru_stime) / n * 1e3,
                faults=(r1.ru_minflt - r0.ru_minflt) / n, peak_mib=r1.ru_maxrss / 1024)  # fmt: skip


def main():
    print(f"machine: {machine()}")
    for workload in STEPS:
        runs = {False: [], True: []}
        for i in range(ROUNDS):
            for keep in (False, True) if i % 2 == 0 else (True, False):  # alternate which goes first
                out = subprocess.run([sys.executable, "-m", "bench.cpu_memory", "--child", workload, str(int(keep))],
                                     check=True, capture_output=True, text=True).stdout  # fmt: skip
                runs[keep].append(json.loads(out.strip().splitlines()[-1]))
        med = {keep: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for keep, rs in runs.items()}
        ratio = med[False]["ms"] / med[True]["ms"]
        for keep in (False, True):
            m = med[keep]
            print(f"{workload:9s} {'kept' if keep else 'glibc':5s}: {m['ms']:6.0f} ms/step, kernel {m['sys_ms']:5.0f} ms, "
                  f"{m['faults']:8.0f} page faults/step, peak {m['peak_mib']:5.0f} MiB")  # fmt: skip
        print(f"{workload}: {ratio:.2f}x faster with freed memory kept")
        report(f"CPU training step, freed memory kept ({workload})", med[True]["ms"], "ms", "glibc's default",
               med[False]["ms"], ratio=ratio, target="> 1x, peak memory within 1.1x",
               ok=ratio > 1 and med[True]["peak_mib"] <= 1.1 * med[False]["peak_mib"],
               peak_mib=round(med[True]["peak_mib"]), peak_mib_glibc=round(med[False]["peak_mib"]))  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3] == "1")))
    else:
        main()
