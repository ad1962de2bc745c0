"""Prior training throughput in tokens per second: Fashion-MNIST preset, batch 128 sequences of 1 + 49.

    python -m bench.prior_throughput
"""

import time

import torch

from bench.common import flops, machine, report
from prior import PriorInfo, build_prior, prior_loss

STEPS, WARMUP, BATCH = 10, 3, 128


def main():
    print(f"machine: {machine()}")
    info = PriorInfo(512, 10, [str(i) for i in range(10)], (7, 7), None, (28, 28))
    torch.manual_seed(0)
    model = build_prior("fashion-mnist", info).train()
    opt = torch.optim.AdamW(model.parameters(), 6e-4)
    codes, labels = torch.randint(0, 512, (BATCH, 49)), torch.randint(0, 10, (BATCH,))
    step_flops = flops(lambda: prior_loss(model, codes, labels, info.layout, 0.1).backward())
    model.zero_grad()
    for i in range(STEPS + WARMUP):
        if i == WARMUP:
            t = time.perf_counter()
        prior_loss(model, codes, labels, info.layout, 0.1).backward()
        opt.step()
        opt.zero_grad()
    dt = (time.perf_counter() - t) / STEPS
    tokens = BATCH * 49 / dt
    params = sum(p.numel() for p in model.parameters())
    gflops = step_flops / dt / 1e9  # what the step achieves: how far it is from the machine's peak
    print(f"{params / 1e6:.1f}M parameters: {dt * 1e3:.0f} ms/step of {step_flops / 1e9:.1f} GFLOP ({gflops:.0f} GFLOP/s), {tokens:.0f} tokens/s")  # fmt: skip
    report("prior training throughput (fashion-mnist preset, batch 128)", tokens, "tokens/s", target="(reported)",
           gflop_per_step=round(step_flops / 1e9, 1), gflop_per_s=round(gflops))  # fmt: skip


if __name__ == "__main__":
    main()
