"""Prior training throughput in tokens per second: the fashion-mnist preset, batch 128 sequences of 1 + 49
codes (the presets' 7x7 grid, K=512) and of 1 + 196 (fashion-mnist-14's grid, K=1024).

Each is stepped interleaved with the same network built with GPT2Config's default activation, "gelu_new"
(the tanh GELU in eight elementwise passes), against which the presets' "gelu_pytorch_tanh" (the same
function, torch's one kernel) is reported as a ratio.

    python -m bench.prior_throughput
"""

import time

import torch
from transformers.activations import ACT2FN

from bench.common import flops, machine, report
from common.cli import keep_freed_memory
from prior import PriorInfo, build_prior, prior_loss

BATCH = 128
GRIDS = {49: (7, 512, 10), 196: (14, 1024, 3)}  # codes -> grid side, K, timed steps (after 2 warm-up steps)


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    print(f"machine: {machine()}")
    for n_codes, (side, k, steps) in GRIDS.items():
        info = PriorInfo(k, 10, [str(i) for i in range(10)], (side, side), None, (28, 28))
        models = {}
        for act in ("gelu_pytorch_tanh", "gelu_new"):
            torch.manual_seed(0)
            models[act] = model = build_prior("fashion-mnist", info).train()
            for block in model.transformer.h:
                block.mlp.act = ACT2FN[act]
        opts = {act: torch.optim.AdamW(m.parameters(), 6e-4) for act, m in models.items()}
        codes, labels = torch.randint(0, k, (BATCH, n_codes)), torch.randint(0, 10, (BATCH,))
        model = models["gelu_pytorch_tanh"]
        step_flops = flops(lambda: prior_loss(model, codes, labels, info.layout, 0.1).backward())
        model.zero_grad()
        totals = dict.fromkeys(models, 0.0)
        for i in range(steps + 2):
            for act in models if i % 2 else reversed(models):  # alternate which goes first
                t = time.perf_counter()
                prior_loss(models[act], codes, labels, info.layout, 0.1).backward()
                opts[act].step()
                opts[act].zero_grad()
                if i >= 2:
                    totals[act] += time.perf_counter() - t
        dt, dt_new = totals["gelu_pytorch_tanh"] / steps, totals["gelu_new"] / steps
        tokens = BATCH * n_codes / dt
        params = sum(p.numel() for p in model.parameters())
        gflops = step_flops / dt / 1e9  # what the step achieves: how far it is from the machine's peak
        print(f"{n_codes} codes, {params / 1e6:.1f}M parameters: {dt * 1e3:.0f} ms/step of {step_flops / 1e9:.1f} GFLOP "
              f"({gflops:.0f} GFLOP/s), {tokens:.0f} tokens/s; with gelu_new {dt_new * 1e3:.0f} ms/step ({dt_new / dt:.2f}x)")  # fmt: skip
        report(f"prior training throughput (fashion-mnist preset, batch 128, {n_codes} codes)", tokens, "tokens/s",
               "the same with GPT-2's gelu_new", BATCH * n_codes / dt_new, ratio=dt_new / dt, target="(reported)",
               gflop_per_step=round(step_flops / 1e9, 1), gflop_per_s=round(gflops))  # fmt: skip


if __name__ == "__main__":
    main()
