"""The quantizer's share of one tokenizer training step (Fashion-MNIST preset, batch 128, real images),
and the cost of a step of the 14x14 preset and of the multi-level quantizers against it, all interleaved
step by step (what "equal CPU minutes" converts to in steps).

Forward hooks time the quantizer (assignment, EMA update, dead-code check) inside full training steps
(forward, backward, AdamW). Target: under 15%.

    python -m bench.tokenizer_step
"""

import time

import torch

from bench.common import flops, machine, report
from tokenizer import VQVAE, get_config
from common.cli import keep_freed_memory
from common.data import DataArguments, ImageTransform, image_loader, load_image_data

STEPS, WARMUP = 30, 5


def main():
    keep_freed_memory()  # as every vqgpt command runs (bench/cpu_memory.py)
    print(f"machine: {machine()}")
    data = load_image_data(DataArguments(max_train_samples=128 * (STEPS + WARMUP)))
    torch.manual_seed(0)
    model = VQVAE(get_config("fashion-mnist")).train()
    others = {  # name -> model whose step is reported against the flat 7x7 step
        "fashion-mnist-14 (14x14 codes)": VQVAE(get_config("fashion-mnist-14")).train(),
        "residual, 4 levels of 7x7": VQVAE(get_config("fashion-mnist", quantizer="residual", levels=4, quantizer_dropout=0.5)).train(),
        "multiscale, scales 1,2,4,7": VQVAE(get_config("fashion-mnist", quantizer="multiscale", scales=[1, 2, 4, 7], quantizer_dropout=0.5)).train(),
        "gumbel, 7x7": VQVAE(get_config("fashion-mnist", quantizer="gumbel")).train(),
    }
    models = [model, *others.values()]
    opts = {m: torch.optim.AdamW(m.parameters(), 1e-3) for m in models}
    q_time = [0.0]
    start = {}
    model.quantizer.register_forward_pre_hook(lambda m, a: start.__setitem__("t", time.perf_counter()))
    model.quantizer.register_forward_hook(lambda m, a, o: q_time.__setitem__(0, q_time[0] + time.perf_counter() - start["t"]))  # fmt: skip
    totals = {m: 0.0 for m in models}
    q_total = 0.0
    for i, batch in enumerate(image_loader(data.train, ImageTransform(1), 128, shuffle=False)):
        for m in models[i % len(models) :] + models[: i % len(models)]:  # rotate which goes first
            q_time[0] = 0.0
            t = time.perf_counter()
            m(batch["pixel_values"]).loss.backward()
            opts[m].step()
            opts[m].zero_grad()
            if i >= WARMUP:
                totals[m] += time.perf_counter() - t
                q_total += q_time[0] if m is model else 0.0
    step_total = totals[model]
    step_flops = flops(lambda: model(batch["pixel_values"]).loss.backward())
    gflops = step_flops / (step_total / STEPS) / 1e9  # forward and backward; AdamW's few FLOPs are not counted
    share = q_total / step_total
    n = STEPS
    print(f"step {step_total / n * 1e3:.0f} ms of {step_flops / 1e9:.1f} GFLOP ({gflops:.0f} GFLOP/s), "
          f"quantizer {q_total / n * 1e3:.1f} ms: {share:.1%} of the step")  # fmt: skip
    report("quantizer share of a tokenizer step (fashion-mnist, batch 128)", share * 100, "%",
           "whole training step", step_total / n * 1e3, ratio=share, target="< 15%", ok=share < 0.15, baseline_unit="ms",
           gflop_per_step=round(step_flops / 1e9, 1), gflop_per_s=round(gflops))  # fmt: skip
    for name, other in others.items():
        ratio = totals[other] / step_total
        print(f"{name} step {totals[other] / n * 1e3:.0f} ms: {ratio:.2f}x the fashion-mnist step")
        report(f"tokenizer step, {name}", totals[other] / n * 1e3, "ms", "fashion-mnist (7x7)", step_total / n * 1e3,
               ratio=ratio, target="(reported: docs/tokenizer.md's time at equal steps)", ok=None)  # fmt: skip

if __name__ == "__main__":
    main()
